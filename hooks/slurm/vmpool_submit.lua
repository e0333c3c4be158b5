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
--   * the script's first line `#!INTERP [ARG]` becomes `#!STARTER INTERP [ARG]`: slurmstepd then
--     starts vmpool's job starter as the job's owner, with the job's arguments, working directory,
--     environment and output files; the starter runs the original script on the job's VM.
-- A job may not be moved into or out of the pool's partition once submitted (its script would
-- not match where it runs).

local STARTER = "@STARTER@"          -- absolute path of hooks/slurm/jobstarter, installed
local PARTITION = "@PARTITION@"      -- the partition whose node fronts the pool
local IS_DEFAULT = @IS_DEFAULT@      -- true if jobs without -p land in it
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
