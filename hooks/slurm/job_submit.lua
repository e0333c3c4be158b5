-- vmpool-hooks: slurm job_submit.lua
--
-- slurmctld's job_submit/lua plugin (JobSubmitPlugins=lua; this file beside slurm.conf), written
-- by hooks/slurm/install where the site has no job_submit.lua of its own: it only calls vmpool's
-- submit filter, the module beside it. A site with its own job_submit.lua calls the module from
-- there instead (see vmpool_submit.lua); the install never replaces such a file without --force.

local vmpool = dofile("@MODULE@")

function slurm_job_submit(job_desc, part_list, submit_uid)
   return vmpool.job_submit(job_desc, part_list, submit_uid)
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return vmpool.job_modify(job_desc, job_rec, part_list, modify_uid)
end

return slurm.SUCCESS
