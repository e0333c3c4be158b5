# slurm-hooks.sh — what vmpool's Slurm prolog and epilog share, on top of vmpool-hooks.sh.
#
# Sourced, never executed, first of all (vh_slurm_is_pool_job needs nothing else), then
# vmpool-hooks.sh. Tells the pool's jobs from the rest of the cluster's, reads the job from
# slurmd's environment, runs TORQUE's prologue/epilogue (found beside the Slurm hooks once
# installed, one directory up in the source tree), tells Slurm what became of the job (requeue,
# cancel) and logs.

# shellcheck shell=bash disable=SC2034  # the variables are used by the hooks that source this

VH_SLURM_USER=
VH_SLURM_GROUP=
VH_SLURM_WORKDIR=
VH_SLURM_SCRATCH=
VH_SLURM_CMD_TIMEOUT=30   # seconds for one scontrol/scancel call
VH_SLURM_COMMENT_MAX=250  # AdminComment is for one line
VH_SLURM_PARTITION=
VH_SLURM_NODES=
VH_SLURM_RESOURCES=       # the job's allocation, as TORQUE's prologue reads it (vh_slurm_resources)
VH_SLURM_RESOURCES_ERROR=

# --- the pool's jobs only ---

# vh_slurm_is_pool_job DIR: true if slurmd runs this hook for a job of the pool's partition on one
# of the pool's nodes, as DIR/vmpool-slurm.conf names them (PARTITION=NAME, NODES="NAME..."; no
# NODES: any node of the partition). slurm.conf is the whole cluster's: every node runs the
# Prolog and Epilog it names, for every job. Builtins only, so that an ordinary job pays for
# nothing more than bash's start; no file (the source tree, an unfinished install): no job is.
vh_slurm_is_pool_job() {
    local line node
    [[ -r $1/vmpool-slurm.conf ]] || return 1
    while IFS= read -r line || [[ -n $line ]]; do
        case $line in
            PARTITION=*) VH_SLURM_PARTITION=${line#*=} ;;
            NODES=*) VH_SLURM_NODES=${line#*=} ;;
        esac
    done <"$1/vmpool-slurm.conf"
    [[ -n $VH_SLURM_PARTITION && ${SLURM_JOB_PARTITION:-} == "$VH_SLURM_PARTITION" ]] || return 1
    [[ -z $VH_SLURM_NODES ]] && return 0
    for node in $VH_SLURM_NODES; do
        [[ ${SLURMD_NODENAME:-} == "$node" ]] && return 0
    done
    return 1
}

# The longest the Prolog and the Epilog can take (seconds; in VH_SLURM_PROLOG_WORST and
# VH_SLURM_EPILOG_WORST), from the configuration loaded: PrologEpilogTimeout must be above both,
# or slurmd kills the hook and drains the node. Each term is one bounded call on the longest path
# (`timeout -k K N` counts N + K); test_slurm.py runs that path and checks the sum against these.
vh_slurm_worst_case() {
    local tell=$(( 2 * (10 + 1) ))                             # vh_tell_user: two tries
    local release=$(( 3 * (RELEASE_TIMEOUT + 5) + 2 + 4 ))    # vh_release: three tries, two pauses
    local slurm=$(( VH_SLURM_CMD_TIMEOUT + 5 ))                # one scontrol or scancel
    # the job's memory (scontrol), acquire, prepare (fails), the owner told, the VM released, the
    # back-off, then AdminComment, requeue (refused), AdminComment and scancel.
    VH_SLURM_PROLOG_WORST=$(( slurm + ACQUIRE_TIMEOUT + 15 + 5 + PREPARE_TIMEOUT + 5 + tell + release
                              + REQUEUE_BACKOFF + 4 * slurm ))
    # the scrub (fails), the VM released.
    VH_SLURM_EPILOG_WORST=$(( SCRUB_TIMEOUT + 5 + release ))
}

# The job from slurmd's environment; false (logged) if Slurm gave no usable job id. The user and
# group are not checked here: TORQUE's prologue checks them (and aborts the job if they are bad).
vh_slurm_job_from_env() {
    local entry
    if ! [[ ${SLURM_JOB_ID:-} =~ ^[0-9]{1,19}$ ]]; then
        vh_log "SLURM_JOB_ID is missing or invalid: $(vh_show "${SLURM_JOB_ID:-}"); nothing done"
        return 1
    fi
    VH_JOBID=$SLURM_JOB_ID
    VH_SLURM_USER=${SLURM_JOB_USER:-}
    VH_SLURM_GROUP=
    if vh_valid_uint "${SLURM_JOB_GID:-}" && entry=$(getent group -- "$SLURM_JOB_GID"); then
        VH_SLURM_GROUP=${entry%%:*}
    fi
    VH_SLURM_WORKDIR=${SLURM_JOB_WORK_DIR:-}
    if [[ -z $VH_SLURM_WORKDIR ]] && vh_valid_name "$VH_SLURM_USER"; then
        VH_SLURM_WORKDIR=$(getent passwd -- "$VH_SLURM_USER" | cut -d: -f6)
    fi
    vh_load_config 2>/dev/null || vh_log "the hooks' configuration is unusable: $VH_CONFIG_ERROR"
    VH_SLURM_SCRATCH=$(mktemp -d)
    trap 'rm -rf -- "$VH_SLURM_SCRATCH"' EXIT
}

# vh_slurm_mib SIZE: a Slurm memory size (6G, 1500M, 0; scontrol's units, M = MiB) in MiB, rounded
# up; false if it is not one.
vh_slurm_mib() {
    [[ $1 =~ ^([0-9]{1,12})([KMGTP]?)$ ]] || return 1
    local number=$((10#${BASH_REMATCH[1]}))
    case ${BASH_REMATCH[2]} in
        K) printf '%s\n' "$(( (number + 1023) / 1024 ))" ;;
        ''|M) printf '%s\n' "$number" ;;
        G) printf '%s\n' "$(( number << 10 ))" ;;
        T) printf '%s\n' "$(( number << 20 ))" ;;
        P) printf '%s\n' "$(( number << 30 ))" ;;
    esac
}

# vh_slurm_gpus TRES: the GPUs a TRES request names ("gres:gpu:2", "gres:gpu:a100:1", others
# beside them), on stdout; false if a GPU count is not a number.
vh_slurm_gpus() {
    local item count=0 items=()
    IFS=, read -r -a items <<<"$1"
    for item in "${items[@]}"; do
        [[ $item == gres[:/]gpu || $item == gres[:/]gpu:* ]] || continue
        item=${item#gres?gpu}
        item=${item:-:1}
        [[ ${item##*:} =~ ^[0-9]{1,6}$ ]] || return 1
        count=$(( count + 10#${item##*:} ))
    done
    printf '%s\n' "$count"
}

# The job's allocation on this node, as the resource list TORQUE's prologue reads (pbs_mom's 5th
# argument), in VH_SLURM_RESOURCES: "nodes=1:ppn=CPUS:gpus=GPUS,mem=MIBmb". The Prolog's
# environment (PrologFlags=Alloc; verified on 22.05) holds the CPUs (SLURM_JOB_CPUS_PER_NODE), not
# the memory, and the GPUs only where gres.conf names device files: both come from `scontrol -o
# show job` (the job is on one node): MinMemoryNode, or MinMemoryCPU times the CPUs (the TRES show
# memory only where it is a consumable resource); the GPUs of TresPerNode, TresPerJob, or
# TresPerTask times NumTasks. The job's owner controls free-text fields of that line (its name,
# comment, working directory): a field found twice is not read. Returns 1 if scontrol does not
# answer (VH_SLURM_RESOURCES_ERROR says why: the job is requeued), 2 if a value cannot be read
# (the job must not land on a VM too small).
vh_slurm_resources() {
    local cpus=${SLURM_JOB_CPUS_PER_NODE:-} gpus=0 line field key mib count words=()
    local -A found=()
    VH_SLURM_RESOURCES='' VH_SLURM_RESOURCES_ERROR=''
    if ! line=$(timeout -k 5 "$VH_SLURM_CMD_TIMEOUT" scontrol -o show job "$VH_JOBID" 2>"$VH_SLURM_SCRATCH/slurm.err"); then
        VH_SLURM_RESOURCES_ERROR="scontrol cannot tell the job's memory and GPUs: $(tail -n 1 "$VH_SLURM_SCRATCH/slurm.err")"
        return 1
    fi
    if ! vh_valid_uint "$cpus" || (( cpus < 1 )); then
        VH_SLURM_RESOURCES_ERROR="the job's CPUs on this node, SLURM_JOB_CPUS_PER_NODE=$(vh_show "$cpus"), are not a whole number"
        return 2
    fi
    read -r -a words <<<"$line"
    for field in "${words[@]}"; do
        key=${field%%=*}
        case $key in
            MinMemoryNode|MinMemoryCPU|TresPerNode|TresPerJob|TresPerTask|NumTasks)
                if [[ -v found[$key] || ( $key == MinMemory* && -n ${found[memory]:-} ) ]]; then
                    VH_SLURM_RESOURCES_ERROR="scontrol shows the job's $key twice: not reading what its owner may have written"
                    return 2
                fi
                found[$key]=${field#*=}
                [[ $key == MinMemory* ]] && found[memory]=$key ;;
        esac
    done
    if [[ -z ${found[memory]:-} ]] || ! mib=$(vh_slurm_mib "${found[${found[memory]}]}"); then
        VH_SLURM_RESOURCES_ERROR="cannot read the job's memory from scontrol (MinMemoryNode or MinMemoryCPU: $(vh_show "${found[${found[memory]:-MinMemoryNode}]:-}"))"
        return 2
    fi
    [[ ${found[memory]} == MinMemoryCPU ]] && mib=$(( mib * cpus ))
    for key in TresPerNode TresPerJob TresPerTask; do
        [[ -n ${found[$key]:-} ]] || continue
        if ! count=$(vh_slurm_gpus "${found[$key]}"); then
            VH_SLURM_RESOURCES_ERROR="cannot read the job's GPUs from scontrol ($key=$(vh_show "${found[$key]}"))"
            return 2
        fi
        if [[ $key == TresPerTask ]] && (( count > 0 )); then
            vh_valid_uint "${found[NumTasks]:-}" || {
                VH_SLURM_RESOURCES_ERROR="cannot read the job's tasks from scontrol (NumTasks=$(vh_show "${found[NumTasks]:-}"))"
                return 2
            }
            count=$(( count * 10#${found[NumTasks]} ))
        fi
        (( count > gpus )) && gpus=$count
    done
    VH_SLURM_RESOURCES="nodes=1:ppn=$cpus:gpus=$gpus,mem=${mib}mb"
}

# vh_slurm_torque_hook NAME DIR: the TORQUE hook NAME (prologue, epilogue) the Slurm hook in DIR
# runs: beside it once installed, one directory up in the source tree.
vh_slurm_torque_hook() {
    local dir
    for dir in "$2" "$2/.."; do
        if [[ -f $dir/$1 && -x $dir/$1 ]]; then
            printf '%s/%s' "$dir" "$1"
            return 0
        fi
    done
    return 1
}

# One line for the admin: syslog and JOB_DIR/slurm-hooks.log (root 0600; Slurm keeps no output
# of a Prolog or Epilog).
vh_slurm_log() {
    local log=$JOB_DIR/slurm-hooks.log
    vh_log "$*"
    [[ -d $JOB_DIR ]] || install -d -m 0711 -- "$JOB_DIR" 2>/dev/null || return 0
    printf '%s vmpool %s %s: %s\n' "$(date '+%F %T')" "$VH_HOOK" "$VH_JOBID" "$*" >>"$log" 2>/dev/null || true
}

vh_slurm() {
    timeout -k 5 "$VH_SLURM_CMD_TIMEOUT" "$@" >/dev/null 2>>"$VH_SLURM_SCRATCH/slurm.err"
}

# The job's AdminComment (shown by `scontrol show job`; only admins can set it): why vmpool
# requeued or cancelled it.
vh_slurm_comment() {
    local text=${1//[[:cntrl:]]/ }
    vh_slurm scontrol update "JobId=$VH_JOBID" "AdminComment=${text:0:$VH_SLURM_COMMENT_MAX}" \
        || vh_slurm_log "could not set the job's AdminComment: $(tail -n 1 "$VH_SLURM_SCRATCH/slurm.err")"
}

vh_slurm_cancel() {
    vh_slurm_comment "$1"
    vh_slurm scancel "$VH_JOBID" \
        || vh_slurm_log "scancel failed: $(tail -n 1 "$VH_SLURM_SCRATCH/slurm.err"); the job starts without a VM"
}

# Requeue the job. Slurm makes a requeued job eligible again only after CredExpire (120 s by
# default; `scontrol update StartTime=now` does not shorten it): that is the back-off, without
# holding a CPU of the node (hooks/slurm/install sets REQUEUE_BACKOFF=0 unless told otherwise).
# A job that cannot be requeued (--no-requeue) is cancelled instead.
vh_slurm_requeue() {
    vh_slurm_comment "$1"
    vh_slurm scontrol requeue "$VH_JOBID" && return 0
    vh_slurm_log "scontrol requeue failed: $(tail -n 1 "$VH_SLURM_SCRATCH/slurm.err"); cancelling the job"
    vh_slurm_cancel "$1 (the job cannot be requeued: cancelled)"
}
