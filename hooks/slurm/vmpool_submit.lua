-- vmpool-hooks: slurm vmpool_submit.lua
--
-- vmpool's submit filter, a Lua module for slurmctld's job_submit/lua plugin: hooks/slurm/install
-- writes it beside slurm.conf with the values below filled in. Slurm loads one job_submit.lua;
-- that file (the site's own, or vmpool's) loads this one and calls it, last, for every job:
--
--   local vmpool = dofile("/etc/slurm/vmpool_submit.lua")
--   function slurm_job_submit(job_desc, part_list, submit_uid)
--      ...the site's own checks...
--      return vmpool.job_submit(job_desc, part_list, submit_uid)
--   end
--   function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
--      return vmpool.job_modify(job_desc, job_rec, part_list, modify_uid)
--   end
--
-- It leaves every job not of the pool's partition alone. For the pool's:
--   * batch jobs only, on one node: salloc, srun (without sbatch) and multi-node or heterogeneous
--     jobs are refused at submit time with a message, as they cannot run on a VM;
--   * with CLASSES (the pool's VM classes, as `vmpool capacity` lists them), a job whose CPUs,
--     memory or GPUs no class has is refused, naming the largest class (what `vmpool acquire`
--     would say at the prolog);
--   * the script's first line `#!INTERP [ARG]` becomes `#!STARTER INTERP [ARG]`: slurmstepd then
--     starts vmpool's job starter as the job's owner, with the job's arguments, working directory,
--     environment and output files; the starter runs the original script on the job's VM.
-- A job may not be moved into or out of the pool's partition once submitted (its script would
-- not match where it runs). Lua 5.1: what Debian's Slurm links.

local STARTER = "@STARTER@"          -- absolute path of hooks/slurm/jobstarter, installed
local PARTITION = "@PARTITION@"      -- the partition whose node fronts the pool
local IS_DEFAULT = @IS_DEFAULT@      -- true if jobs without -p land in it
local CLASSES = "@CLASSES@"          -- NAME:CORES:MEMORY_MIB:GPUS joined by '+' ("": not checked)
local SHEBANG_MAX = 255              -- the kernel reads at most this much of a `#!` line

local function says(fmt, ...)
   slurm.log_user("vmpool: " .. string.format(fmt, ...))
end

-- "pool": the job asks for the pool's partition only; "other": not at all; "mixed": both.
local function target(partition)
   if partition == nil or partition == "" then
      return IS_DEFAULT and "pool" or "other"
   end
   local pool, other = false, false
   for name in string.gmatch(partition, "[^,]+") do
      if name == PARTITION then pool = true else other = true end
   end
   if pool and other then return "mixed" end
   return pool and "pool" or "other"
end

local function is_set(value)
   return value ~= nil and value ~= slurm.NO_VAL and value ~= slurm.NO_VAL16 and value ~= 0
end

-- A count the job set (the plugin gives NO_VAL, NO_VAL16, NO_VAL64 or nil for one it did not).
local function given(value)
   if type(value) ~= "number" or value < 0 or value == slurm.NO_VAL16 or value >= slurm.NO_VAL then
      return nil
   end
   return value
end

-- GPUs in a TRES request: "gres:gpu:2" or "gres:gpu:a100:2" (0 without GPUs).
local function gpus_in(tres)
   local count = 0
   for item in string.gmatch(tres or "", "[^,]+") do
      local n = string.match(item, "^gres[:/]gpu:(%d+)$") or string.match(item, "^gres[:/]gpu:[^:]+:(%d+)$")
      if string.match(item, "^gres[:/]gpu$") then n = 1 end
      if n then count = count + tonumber(n) end
   end
   return count
end

-- The job's CPUs, memory (MiB) and GPUs on its one node, as submitted.
local function job_size(job_desc)
   local cores = math.max(given(job_desc.min_cpus) or 1, given(job_desc.pn_min_cpus) or 1)
   local memory = given(job_desc.min_mem_per_node)
   if memory == nil then memory = (given(job_desc.min_mem_per_cpu) or 0) * cores end
   local tasks = given(job_desc.num_tasks) or 1
   local gpus = math.max(gpus_in(job_desc.tres_per_job), gpus_in(job_desc.tres_per_node),
                         gpus_in(job_desc.tres_per_task) * tasks)
   return cores, memory, gpus
end

-- As vmpool says it: 16 cores, 64G memory, 1 GPU(s).
local function size_text(cores, memory, gpus)
   local text = string.format("%d cores", cores)
   if memory > 0 then
      if memory % 1024 == 0 then
         text = text .. string.format(", %dG memory", math.floor(memory / 1024))
      else
         text = text .. string.format(", %dM memory", memory)
      end
   end
   if gpus > 0 then text = text .. string.format(", %d GPU(s)", gpus) end
   return text
end

-- Why no class of the pool fits the job, or nil if one does (or the classes are not known).
local function no_class_fits(job_desc)
   local cores, memory, gpus = job_size(job_desc)
   local largest
   for name, c, m, g in string.gmatch(CLASSES, "([^:+]+):(%d+):(%d+):(%d+)") do
      c, m, g = tonumber(c), tonumber(m), tonumber(g)
      if cores <= c and memory <= m and gpus <= g then return nil end
      if largest == nil or c > largest[2] or (c == largest[2] and (m > largest[3]
            or (m == largest[3] and g > largest[4]))) then
         largest = { name, c, m, g }
      end
   end
   if largest == nil then return nil end
   return string.format("this job asks for %s: more than any class of the pool behind the partition %s"
      .. " offers (the largest, %s, has %s); ask for less, or use another partition (-p)",
      size_text(cores, memory, gpus), PARTITION, largest[1], size_text(largest[2], largest[3], largest[4]))
end

local function job_submit(job_desc, part_list, submit_uid)
   local where = target(job_desc.partition)
   if where == "other" then return slurm.SUCCESS end
   if where == "mixed" then
      says("partition %s cannot be listed with other partitions: its jobs run on cloud VMs", PARTITION)
      return slurm.ERROR
   end
   if job_desc.script == nil or job_desc.script == "" then
      says("interactive jobs (salloc, srun outside a batch job) cannot run on partition %s; submit a batch script with sbatch", PARTITION)
      return slurm.ERROR
   end
   if (is_set(job_desc.min_nodes) and job_desc.min_nodes > 1)
         or (is_set(job_desc.max_nodes) and job_desc.max_nodes > 1 and job_desc.max_nodes ~= slurm.NO_VAL)
         or (job_desc.het_job_offset ~= nil and job_desc.het_job_offset ~= slurm.NO_VAL) then
      says("jobs on partition %s run on one VM: multi-node and heterogeneous jobs are not supported", PARTITION)
      return slurm.ERROR
   end
   local refusal = no_class_fits(job_desc)
   if refusal then
      says("%s", refusal)
      return slurm.ERROR
   end
   local script = job_desc.script
   local first, rest = string.match(script, "^#!([^\n]*)\n?(.*)$")
   if first == nil then
      says("the batch script must start with #! (a line naming its interpreter)")
      return slurm.ERROR
   end
   if string.sub(first, 1, #STARTER + 1) == STARTER .. " " then
      return slurm.SUCCESS  -- already rewritten (a job submitted again from its own script)
   end
   local interp = string.match(first, "^%s*(.-)%s*$")
   if string.sub(interp, 1, 1) ~= "/" then
      says("the batch script's #! line must name an absolute interpreter path, not '%s'", interp)
      return slurm.ERROR
   end
   local line = "#!" .. STARTER .. " " .. interp
   if #line > SHEBANG_MAX then
      says("the batch script's #! line is too long (%d characters with vmpool's job starter, at most %d)", #line, SHEBANG_MAX)
      return slurm.ERROR
   end
   job_desc.script = line .. "\n" .. rest
   return slurm.SUCCESS
end

local function job_modify(job_desc, job_rec, part_list, modify_uid)
   if job_desc.partition == nil then return slurm.SUCCESS end
   local before = target(job_rec.partition)
   local after = target(job_desc.partition)
   if before ~= after then
      says("a job cannot move into or out of partition %s after submission; submit it again", PARTITION)
      return slurm.ERROR
   end
   return slurm.SUCCESS
end

return { job_submit = job_submit, job_modify = job_modify }
