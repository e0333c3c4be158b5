# vmpool-hooks.sh — code shared by vmpool's batch-system hooks (Torque's prologue, jobstarter and
# epilogue; a Slurm prolog/epilog later).
#
# Sourced, never executed. One function per call to vmpool or to a VM (vh_acquire, vh_write_record,
# vh_prepare, vh_scrub, vh_release, vh_run_job, vh_kill_job) and for the "job ended" mark
# (vh_mark_ended, vh_ended_since): every hook uses these, none hand-rolls an SSH call or a
# release. They know nothing of Torque: the job id, user, uid, group, gid, home and working
# directory come as arguments. The hooks find it beside themselves (jobstarter, and every hook in
# the source tree) or in ./vmpool/ (prologue and epilogue installed in mom_priv). Its config,
# vmpool-hooks.conf, lies beside it: KEY=value lines written by `hooks/install`.
#
# Per-job record on the worker node, JOB_DIR/<jobid>/ (root:root 0711), written by the prologue
# right after `vmpool acquire` and removed by the epilogue once `vmpool release` has succeeded:
#   root.env, root_known_hosts   root 0600   what the epilogue needs (VM, root key, job owner)
#   job.env, known_hosts,        owner 0400  what the jobstarter needs: the VM's address, its
#   id_ed25519                               pinned host key, the per-job private key
# Root never reads a file the job owner owns: the owner may rewrite those.
#
# "Job ended" mark, JOB_DIR/.ended.<jobid> (root 0600): the time (ns since the epoch) an epilogue
# of the job ran. pbs_mom runs the epilogue of a job deleted while its prologue waits for a VM
# and leaves that prologue running; the prologue honours a mark newer than its own start (and
# then gives everything back), and removes an older one (a requeued job's earlier epilogue).

# shellcheck shell=bash disable=SC2034  # the variables are used by the hooks that source this

# --- constants ---

VH_CONF_KEYS=(VMPOOL VMPOOL_CONFIG JOB_DIR ACQUIRE_TIMEOUT PREPARE_TIMEOUT SCRUB_TIMEOUT
              RELEASE_TIMEOUT REQUEUE_BACKOFF SSH_CONNECT_TIMEOUT KILL_GRACE MIN_UID SCRUB_DIRS
              MAX_PREPARE_ATTEMPTS)
# Defaults; vmpool-hooks.conf overrides them.
VMPOOL=/usr/local/bin/vmpool
VMPOOL_CONFIG=/etc/vmpool/vmpool.conf
JOB_DIR=/var/spool/vmpool/jobs
ACQUIRE_TIMEOUT=120    # seconds the prologue waits for a VM
PREPARE_TIMEOUT=60     # seconds for creating the job owner's account on the VM
SCRUB_TIMEOUT=60       # seconds for the epilogue's scrub of the VM
RELEASE_TIMEOUT=30     # seconds for one `vmpool release`
REQUEUE_BACKOFF=60     # seconds the prologue sleeps before asking Torque to requeue
SSH_CONNECT_TIMEOUT=10
KILL_GRACE=5           # seconds between the forwarded signal and SIGKILL on the VM
MIN_UID=1000           # jobs of system accounts (and root) are refused
MAX_PREPARE_ATTEMPTS=3 # failed preparations of a job's VM before the job is aborted
SCRUB_DIRS="/tmp /var/tmp /dev/shm"

# Torque job ids (123, 123.server.domain, 123[4].server) and POSIX names, as vmpool checks them.
VH_JOBID_RE='^[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9][A-Za-z0-9-]*)*$'
VH_NAME_RE='^[A-Za-z_][A-Za-z0-9_.-]{0,31}$'

# Prologue exit codes, as pbs_mom reads them.
VH_RUN=0
VH_ABORT=1
VH_REQUEUE=2
# vm-prepare.sh: the VM conflicts with the job owner (uid or name taken); it changed nothing.
VH_PREPARE_CONFLICT=97
# jobstarter: the job could not be started on its VM (like ssh's own failures).
VH_STARTER_FAILED=255
# vmpool acquire: the job ended (its epilogue ran) while it waited; it holds nothing.
VH_ACQUIRE_JOB_ENDED=8

VH_HOOK=${VH_HOOK:-hook}
VH_JOBID=

# --- messages ---

# One line on stderr: pbs_mom appends it to the job's spool .ER, which TORQUE copies to the
# owner's .e after the epilogue (not when the prologue aborts the job: see vh_tell_user).
vh_say() {
    local where="vmpool $VH_HOOK"
    [[ -n $VH_JOBID ]] && where+=" $VH_JOBID"
    printf '%s: %s\n' "$where" "$*" >&2
}

# A value as the user typed it, safe to print: control characters shown escaped.
vh_show() {
    printf '%q' "$1"
}

# Best effort syslog line for the admin; never fails, never writes to the job's files.
vh_log() {
    logger -t "vmpool-$VH_HOOK" -- "${VH_JOBID:+job $VH_JOBID: }$*" >/dev/null 2>&1 || true
}

# --- validation ---

vh_valid_jobid() {
    [[ ${#1} -le 255 && $1 =~ $VH_JOBID_RE ]]
}

vh_valid_name() {
    [[ $1 =~ $VH_NAME_RE ]]
}

# An absolute path without `..` components or control characters.
vh_valid_path() {
    local path=$1
    [[ $path == /* && ${#path} -le 4096 ]] || return 1
    [[ $path != *[[:cntrl:]]* ]] || return 1
    [[ /$path/ != */../* ]] || return 1
}

vh_valid_uint() {
    [[ $1 =~ ^[0-9]{1,9}$ ]]
}

# --- config ---

# The directory this library lives in; the config and the VM-side scripts are beside it.
VH_LIB_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)

# Why vmpool-hooks.conf cannot be used (in VH_CONFIG_ERROR, for the hook's own message) on stderr.
vh_config_error() {
    VH_CONFIG_ERROR=$*
    vh_say "$*"
}

# Read vmpool-hooks.conf: known keys only, values checked; the file is parsed, never sourced.
# As root (the prologue, the epilogue, the Slurm prolog and epilog, hooks/install) the file, the
# scripts beside it, the VMPOOL it names and JOB_DIR must be root's alone (vh_root_only): whoever
# can change one of them is root on this node. False, with the reason in VH_CONFIG_ERROR.
vh_load_config() {
    local file=${1:-$VH_LIB_DIR/vmpool-hooks.conf} line key value known
    VH_CONFIG_ERROR=
    if [[ ! -r $file ]]; then
        vh_config_error "cannot read $file (are the hooks installed with 'make install-hooks'?)"
        return 1
    fi
    # With it, the libraries and the VM-side scripts installed beside it (root sends those to
    # the VM as root).
    if (( EUID == 0 )) && ! vh_root_only "$file" "${file%/*}"/*.sh; then
        vh_config_error "refusing $file: $VH_UNSAFE (whoever can change what root reads or runs is root here); make it root's and not group/other-writable (check with make check-hooks)"
        return 1
    fi
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        key=${line%%=*}
        value=${line#*=}
        known=0
        for k in "${VH_CONF_KEYS[@]}"; do [[ $key == "$k" ]] && known=1; done
        if [[ $line != *=* || $known == 0 ]]; then
            vh_config_error "$file: unknown line $(vh_show "$line") (keys: ${VH_CONF_KEYS[*]})"
            return 1
        fi
        printf -v "$key" '%s' "$value"
    done <"$file"
    vh_check_config "$file"
}

vh_check_config() {
    local file=$1 key path interpreter=
    for key in ACQUIRE_TIMEOUT PREPARE_TIMEOUT SCRUB_TIMEOUT RELEASE_TIMEOUT REQUEUE_BACKOFF \
               SSH_CONNECT_TIMEOUT KILL_GRACE MIN_UID MAX_PREPARE_ATTEMPTS; do
        if ! vh_valid_uint "${!key}"; then
            vh_config_error "$file: $key=$(vh_show "${!key}") is not a whole number of seconds"
            return 1
        fi
    done
    for key in VMPOOL VMPOOL_CONFIG JOB_DIR; do
        if ! vh_valid_path "${!key}"; then
            vh_config_error "$file: $key=$(vh_show "${!key}") is not an absolute path"
            return 1
        fi
    done
    for path in $SCRUB_DIRS; do
        if ! vh_valid_path "$path" || [[ $path == / ]]; then
            vh_config_error "$file: SCRUB_DIRS holds $(vh_show "$path"), not an absolute directory below /"
            return 1
        fi
    done
    (( EUID == 0 )) || return 0
    # What root runs: vmpool and the interpreter of its #! line (`make check-hooks` checks the
    # rest of its venv); JOB_DIR, where root writes.
    [[ -f $VMPOOL && -r $VMPOOL ]] && IFS=' ' read -r interpreter _ <"$VMPOOL" || true
    interpreter=${interpreter#\#!}
    vh_valid_path "$interpreter" || interpreter=
    if ! vh_root_only "$VMPOOL" ${interpreter:+"$interpreter"} "$JOB_DIR"; then
        vh_config_error "refusing what $file names: $VH_UNSAFE (whoever can change what root runs is root here); make it root's and not group/other-writable (check with make check-hooks)"
        return 1
    fi
}

# vh_root_only PATH...: each PATH and every directory above it, as named and as its symlinks
# resolve, is owned by root and not writable by group or others (a sticky directory such as /tmp
# is fine: no one else can replace root's entries in it); of a PATH not there (yet), the
# directories that are. False, with the first problem in VH_UNSAFE, otherwise.
vh_root_only() {
    local dir entries=() resolved owner raw mode name
    VH_UNSAFE=
    mapfile -t resolved < <(readlink -m -- "$@")
    for dir in "$@" "${resolved[@]}"; do
        while [[ -n $dir && $dir != / ]]; do
            entries+=("$dir")
            dir=${dir%/*}
        done
    done
    # One stat for all: owner, raw mode (hex: type and permissions), name.
    while IFS=' ' read -r owner raw name; do
        mode=$(( 16#$raw ))
        if [[ $owner != 0 ]]; then
            VH_UNSAFE="$name is owned by uid $owner, not root"
            return 1
        fi
        (( (mode & 8#170000) == 8#120000 )) && continue  # a symlink's own mode means nothing
        (( (mode & 8#170000) == 8#040000 && (mode & 8#1000) )) && continue
        if (( mode & 8#022 )); then
            VH_UNSAFE="$name is mode $(printf '%o' $(( mode & 8#7777 ))): writable by group or others"
            return 1
        fi
    done < <(stat -c '%u %f %n' -- / "${entries[@]}" 2>/dev/null)
}

# --- remote scripts ---

# A word quoted for any POSIX shell (single quotes; embedded ' as '\'').
vh_shquote() {
    local quote="'\\''"
    printf "'%s'" "${1//\'/$quote}"
}

# Print a VM-side script preceded by `set -- ARGS`, for `ssh ... bash -s`. The remote command
# is the constant `bash -s`: data travels only inside single quotes on stdin, so no remote
# shell ever parses a user-supplied string as code.
vh_remote_script() {
    local script=$1 arg words=()
    shift
    for arg in "$@"; do words+=("$(vh_shquote "$arg")"); done
    printf 'set -- %s\n' "${words[*]}"
    cat -- "$VH_LIB_DIR/$script"
}

# --- ssh ---

# Options every hook's ssh uses: the pinned host key only, no agent, no config files, no tty,
# bounded waits. $1 = known_hosts file (one VM, under the alias $2), $3 = private key.
vh_ssh_options() {
    local known_hosts=$1 alias=$2 key=$3
    VH_SSH_OPTS=(-F /dev/null -T -o BatchMode=yes -o StrictHostKeyChecking=yes
        -o "UserKnownHostsFile=$known_hosts" -o GlobalKnownHostsFile=/dev/null
        -o "HostKeyAlias=$alias" -o UpdateHostKeys=no -o CheckHostIP=no
        -o "IdentityFile=$key" -o IdentitiesOnly=yes -o IdentityAgent=none
        -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no
        -o "ConnectTimeout=$SSH_CONNECT_TIMEOUT" -o ServerAliveInterval=15
        -o ServerAliveCountMax=4 -o ControlMaster=no -o ControlPath=none
        -o ForwardAgent=no -o ForwardX11=no -o ClearAllForwardings=yes
        -o PermitLocalCommand=no -o LogLevel=ERROR)
}

# --- per-job record ---

vh_job_dir() {
    printf '%s/%s' "$JOB_DIR" "$1"
}

# Read KEY=value lines of a record into variables; only the keys named after the file.
vh_read_record() {
    local file=$1 line key
    shift
    while IFS= read -r line || [[ -n $line ]]; do
        key=${line%%=*}
        for k in "$@"; do
            [[ $key == "$k" ]] && printf -v "$key" '%s' "${line#*=}"
        done
    done <"$file"
}

# Run a command holding the lock of JOB_DIR (flock on the directory itself: no lock file to
# leave behind). Keeps "is there a record?" and "has the job ended?" apart from their writers.
vh_locked() {
    local rc=0 fd
    exec {fd}<"$JOB_DIR"
    flock "$fd"
    "$@" || rc=$?
    exec {fd}<&-
    return "$rc"
}

# --- the "job ended" mark ---

# Now, in nanoseconds since the epoch (a whole number bash can compare).
vh_now_ns() {
    date +%s%N
}

# ns as the float seconds vmpool takes (`--started`).
vh_ns_as_seconds() {
    printf '%s.%s' "${1:0:${#1}-9}" "${1: -9}"
}

vh_mark_file() {
    printf '%s/.ended.%s' "$JOB_DIR" "$1"
}

# vh_mark_ended JOBID: an epilogue of the job runs now (call it under vh_locked).
vh_mark_ended() {
    local mark
    mark=$(vh_mark_file "$1")
    vh_now_ns >"$mark.tmp" && mv -f -- "$mark.tmp" "$mark"
}

# vh_ended_since JOBID STARTED_NS: true if an epilogue of the job ran after STARTED_NS. An older
# mark (an earlier attempt's epilogue) is removed. Call it under vh_locked.
vh_ended_since() {
    local mark at=
    mark=$(vh_mark_file "$1")
    [[ -f $mark && ! -L $mark ]] || return 1
    read -r at <"$mark" || true
    if [[ $at =~ ^[0-9]{1,19}$ ]] && (( at > $2 )); then
        return 0
    fi
    rm -f -- "$mark"
    return 1
}

# Marks of jobs long gone (no prologue outlives a day): swept by every epilogue.
vh_sweep_marks() {
    find "$JOB_DIR" -maxdepth 1 -name '.ended.*' -type f -mmin +1440 -delete 2>/dev/null || true
}

# --- vmpool ---

# The job's resources for `vmpool acquire` (--cores, --mem, --gpus), set by vh_torque_resources;
# empty: one core, no memory, no GPU.
VH_RESOURCES=()

# vh_mib SIZE: a Torque size (6gb, 512mb, 1048576kb, 100b, 8w; a plain number is bytes) in MiB,
# rounded up; false if it is not one.
vh_mib() {
    local number unit bytes
    [[ ${1,,} =~ ^([0-9]{1,15})(b|kb|mb|gb|tb|w|kw|mw|gw|tw)?$ ]] || return 1
    number=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]:-b}
    case $unit in
        b|w) bytes=$number ;;
        kb|kw) bytes=$((number << 10)) ;;
        mb|mw) bytes=$((number << 20)) ;;
        gb|gw) bytes=$((number << 30)) ;;
        tb|tw) bytes=$((number << 40)) ;;
    esac
    [[ $unit == *w ]] && bytes=$((bytes * 8))  # a word: 8 bytes on the 64-bit nodes Torque runs on
    printf '%s\n' "$(((bytes + (1 << 20) - 1) >> 20))"
}

# vh_torque_resources LIST: the job's cores, memory and GPUs from the resource list pbs_mom gives
# the prologue (5th argument: "nodes=1:ppn=4:gpus=1,mem=6gb,walltime=01:00:00,neednodes=1:ppn=4"),
# into VH_RESOURCES. Cores: the first node's ppn, else ncpus or procs; memory: the largest of mem,
# vmem and pmem or pvmem times the cores; GPUs: the first node's gpus, else gpus. False (with
# VH_RESOURCES_ERROR) on a value it cannot read: the job must not land on a VM too small.
vh_torque_resources() {
    local item key value cores="" ncpus="" gpus="" mem=0 per_core=0 mib part parts=()
    VH_RESOURCES=() VH_RESOURCES_ERROR=
    local IFS=,
    for item in $1; do
        key=${item%%=*} value=${item#*=}
        case $key in
            nodes)
                IFS=: read -r -a parts <<<"${value%%+*}"
                for part in "${parts[@]:1}"; do
                    case $part in
                        ppn=*) cores=${part#ppn=} ;;
                        gpus=*) gpus=${part#gpus=} ;;
                    esac
                done ;;
            ncpus|procs) ncpus=$value ;;
            gpus) gpus=${gpus:-$value} ;;
            mem|vmem|pmem|pvmem)
                if ! mib=$(vh_mib "$value"); then
                    VH_RESOURCES_ERROR="$key=$(vh_show "$value") is not a size"
                    return 1
                fi
                if [[ $key == p* ]]; then
                    (( mib > per_core )) && per_core=$mib
                else
                    (( mib > mem )) && mem=$mib
                fi ;;
        esac
    done
    cores=${cores:-${ncpus:-1}} gpus=${gpus:-0}
    for value in "$cores" "$gpus"; do
        vh_valid_uint "$value" || { VH_RESOURCES_ERROR="$(vh_show "$value") is not a whole number of cores or GPUs"; return 1; }
    done
    (( cores >= 1 )) || cores=1
    (( per_core * cores > mem )) && mem=$((per_core * cores))
    VH_RESOURCES=(--cores "$cores" --mem "$mem" --gpus "$gpus")
}

# vh_acquire JOBID USER STARTED_NS OUT ERR: `vmpool acquire`, its answer (--format env) in OUT,
# its messages in ERR; returns vmpool's exit code (124/137: it did not finish in time). STARTED_NS:
# when this attempt of the job started: an epilogue of the job after that ends the wait (exit 8).
# The job's resources (VH_RESOURCES) choose the VM's class.
vh_acquire() {
    local jobid=$1 user=$2 started=$3 out=$4 err=$5 rc=0 args=()
    [[ -n $started ]] && args=(--started "$(vh_ns_as_seconds "$started")")
    timeout --foreground -k 5 "$((ACQUIRE_TIMEOUT + 15))" "$VMPOOL" --config "$VMPOOL_CONFIG" \
        acquire "$jobid" --user "$user" --timeout "$ACQUIRE_TIMEOUT" --format env "${args[@]}" "${VH_RESOURCES[@]}" \
        >"$out" 2>"$err" || rc=$?
    return "$rc"
}

# vh_read_acquired FILE: the VMPOOL_* variables from acquire's answer; false if incomplete.
vh_read_acquired() {
    VMPOOL_VM_NAME='' VMPOOL_SERVER_ID='' VMPOOL_ADDRESS='' VMPOOL_SSH_USER='' VMPOOL_SSH_PORT=''
    VMPOOL_SSH_KEY='' VMPOOL_KNOWN_HOSTS='' VMPOOL_ALREADY_HELD=''
    vh_read_record "$1" VMPOOL_VM_NAME VMPOOL_SERVER_ID VMPOOL_ADDRESS VMPOOL_SSH_USER \
        VMPOOL_SSH_PORT VMPOOL_SSH_KEY VMPOOL_KNOWN_HOSTS VMPOOL_ALREADY_HELD
    [[ $VMPOOL_ADDRESS =~ ^[A-Za-z0-9][A-Za-z0-9.:_-]*$ ]] && vh_valid_uint "$VMPOOL_SSH_PORT" \
        && vh_valid_name "$VMPOOL_SSH_USER" && vh_valid_path "$VMPOOL_SSH_KEY" \
        && vh_valid_path "$VMPOOL_KNOWN_HOSTS"
}

# vh_release JOBID [UNUSABLE_REASON]: `vmpool release` (--unusable with a reason), tried again
# while it fails for a reason that passes (a busy state lock, a slow disk); 0 once vmpool has
# recorded it. Bad input (2) and configuration (3) are not retried. Sets VH_RELEASE_ERROR.
vh_release() {
    local jobid=$1 reason=${2:-} rc=0 attempt args=() err
    [[ -n $reason ]] && args=(--unusable "$reason")
    err=$(mktemp)
    for attempt in 1 2 3; do
        rc=0
        timeout --foreground -k 5 "$RELEASE_TIMEOUT" "$VMPOOL" --config "$VMPOOL_CONFIG" \
            release "$jobid" "${args[@]}" >/dev/null 2>"$err" || rc=$?
        (( rc == 0 || rc == 2 || rc == 3 )) && break
        (( attempt < 3 )) && sleep $((attempt * 2))
    done
    VH_RELEASE_ERROR="exit $rc: $(grep -v '^$' "$err" | tail -n 1)"
    rm -f -- "$err"
    return "$rc"
}

# --- the per-job record (see the top of this file) ---

# Write a file atomically with an owner and mode.
vh_put_file() {
    local path=$1 owner=$2 mode=$3
    cat >"$path.tmp"
    chown "$owner" "$path.tmp"
    chmod "$mode" "$path.tmp"
    mv -f -- "$path.tmp" "$path"
}

# The VM's pinned host key from vmpool's known_hosts, under the alias the hooks connect with.
vh_pinned_host_key() {
    local host line found=0 type key
    for host in "$VMPOOL_ADDRESS" "[$VMPOOL_ADDRESS]:$VMPOOL_SSH_PORT"; do
        while read -r line; do
            [[ -z $line || $line == \#* ]] && continue
            [[ $line == @* ]] && return 1    # @revoked or @cert-authority: not ours to handle
            read -r _ type key _ <<<"$line"
            printf '%s %s %s\n' "$VMPOOL_ADDRESS" "$type" "$key"
            found=1
        done < <(ssh-keygen -F "$host" -f "$VMPOOL_KNOWN_HOSTS" 2>/dev/null || true)
    done
    (( found ))
}

# vh_write_record JOBID USER UID GROUP GID HOME WORKDIR: the record of the VM in VMPOOL_*, fresh.
# Returns 3 if vmpool pinned no host key for the VM (the record then holds root's part only).
vh_write_record() {
    local jobid=$1 user=$2 uid=$3 group=$4 gid=$5 home=$6 workdir=$7 dir host_keys
    dir=$(vh_job_dir "$jobid")
    [[ -d $JOB_DIR ]] || install -d -m 0711 -- "$JOB_DIR"
    rm -rf -- "$dir"
    mkdir -m 0711 -- "$dir"
    vh_put_file "$dir/root.env" root 0600 <<EOF2
VM_NAME=$VMPOOL_VM_NAME
SERVER_ID=$VMPOOL_SERVER_ID
ADDRESS=$VMPOOL_ADDRESS
SSH_PORT=$VMPOOL_SSH_PORT
SSH_USER=$VMPOOL_SSH_USER
SSH_KEY=$VMPOOL_SSH_KEY
JOB_USER=$user
JOB_UID=$uid
JOB_GROUP=$group
JOB_GID=$gid
JOB_HOME=$home
WORKDIR=$workdir
EOF2
    host_keys=$(vh_pinned_host_key) || return 3
    vh_put_file "$dir/root_known_hosts" root 0600 <<<"$host_keys"
    vh_put_file "$dir/known_hosts" "$uid:$gid" 0400 <<<"$host_keys"
    ssh-keygen -q -t ed25519 -N '' -C "vmpool job $jobid" -f "$dir/id_ed25519"
    chown "$uid:$gid" "$dir/id_ed25519"
    chmod 0400 "$dir/id_ed25519"
    chmod 0644 "$dir/id_ed25519.pub"
    vh_put_file "$dir/job.env" "$uid:$gid" 0400 <<EOF2
VM_NAME=$VMPOOL_VM_NAME
ADDRESS=$VMPOOL_ADDRESS
SSH_PORT=$VMPOOL_SSH_PORT
JOB_USER=$user
EOF2
}

# vh_read_root_record JOBID USER: root's part of the record, checked (owned by root, for USER,
# sane values); sets VM_NAME ADDRESS SSH_PORT SSH_USER SSH_KEY JOB_USER JOB_UID JOB_GROUP JOB_GID
# JOB_HOME WORKDIR.
vh_read_root_record() {
    local file
    file=$(vh_job_dir "$1")/root.env
    [[ -f $file && ! -L $file && $(stat -c %u -- "$file") == 0 ]] || return 1
    vh_read_record "$file" VM_NAME ADDRESS SSH_PORT SSH_USER SSH_KEY JOB_USER JOB_UID JOB_GROUP \
        JOB_GID JOB_HOME WORKDIR
    [[ ${JOB_USER:-} == "$2" ]] || { vh_say "record is for user ${JOB_USER:-?}, not $2"; return 1; }
    [[ ${ADDRESS:-} =~ ^[A-Za-z0-9][A-Za-z0-9.:_-]*$ ]] && vh_valid_uint "${SSH_PORT:-}" \
        && vh_valid_name "${SSH_USER:-}" && vh_valid_path "${SSH_KEY:-}" \
        && vh_valid_uint "${JOB_UID:-}" && vh_valid_uint "${JOB_GID:-}" \
        && vh_valid_name "${JOB_GROUP:-}" && vh_valid_path "${JOB_HOME:-}" \
        && vh_valid_path "${WORKDIR:-}"
}

# vh_drop_owner_files JOBID: what the job's owner could use to reach the VM (key, address).
vh_drop_owner_files() {
    local dir
    dir=$(vh_job_dir "$1")
    rm -f -- "$dir/id_ed25519" "$dir/id_ed25519.pub" "$dir/job.env" "$dir/known_hosts"
}

# --- on the VM, as root (the record's root part) ---

# vh_prepare JOBID USER UID GROUP GID HOME WORKDIR ERR: vm-prepare.sh on the VM in VMPOOL_*;
# its messages in ERR; returns its exit code (124/137: no answer within PREPARE_TIMEOUT).
vh_prepare() {
    local jobid=$1 user=$2 uid=$3 group=$4 gid=$5 home=$6 workdir=$7 err=$8 dir rc=0
    dir=$(vh_job_dir "$jobid")
    vh_ssh_options "$dir/root_known_hosts" "$VMPOOL_ADDRESS" "$VMPOOL_SSH_KEY"
    vh_remote_script vm-prepare.sh "$user" "$uid" "$group" "$gid" "$home" "$workdir" \
            "$(cat "$dir/id_ed25519.pub")" "$jobid" \
        | timeout --foreground -k 5 "$PREPARE_TIMEOUT" ssh "${VH_SSH_OPTS[@]}" -p "$VMPOOL_SSH_PORT" \
            -l "$VMPOOL_SSH_USER" "$VMPOOL_ADDRESS" bash -s >/dev/null 2>"$err" || rc=$?
    return "$rc"
}

# vh_scrub JOBID: vm-scrub.sh on the VM of the record read by vh_read_root_record. Prints the
# reason on failure.
vh_scrub() {
    local dir rc=0 err
    dir=$(vh_job_dir "$1")
    err=$(mktemp)
    vh_ssh_options "$dir/root_known_hosts" "$ADDRESS" "$SSH_KEY"
    # shellcheck disable=SC2086  # SCRUB_DIRS is a list of checked absolute paths
    vh_remote_script vm-scrub.sh "$JOB_USER" "$JOB_UID" "$JOB_GROUP" "$JOB_GID" "$JOB_HOME" \
            "$WORKDIR" $SCRUB_DIRS \
        | timeout --foreground -k 5 "$SCRUB_TIMEOUT" ssh "${VH_SSH_OPTS[@]}" -p "$SSH_PORT" \
            -l "$SSH_USER" "$ADDRESS" bash -s >/dev/null 2>"$err" || rc=$?
    case $rc in
        0) ;;
        124|137) echo "no answer within ${SCRUB_TIMEOUT}s" ;;
        255) echo "ssh failed: $(grep -v '^$' "$err" | tail -n 1)" ;;
        *) grep -v '^$' "$err" | paste -sd ';' ;;
    esac
    rm -f -- "$err"
    return $(( rc != 0 ))
}

# --- on the VM, as the job's owner (the record's owner part) ---

# vh_job_ssh JOBID ADDRESS PORT USER: VH_SSH_OPTS and VH_SSH_TARGET for the owner's login.
vh_job_ssh() {
    local dir
    dir=$(vh_job_dir "$1")
    vh_ssh_options "$dir/known_hosts" "$2" "$dir/id_ed25519"
    VH_SSH_TARGET=(-p "$3" -l "$4" "$2")
}

# vh_run_job JOBID WORKDIR SHELL NODES SCRIPT EXEC_WORD ARGS NAME=VALUE...: vm-run.sh over the
# owner's ssh (vh_job_ssh first); the job's output is ssh's. The ssh client runs in a session of
# its own: a batch system's signals to the job's session on the node (pbs_mom's qdel) must not
# cut the job's output short, the hook forwards them (vh_kill_job). It execs: run it in a
# subshell, `(vh_run_job ...) &`, and $! is the ssh client.
vh_run_job() {
    exec setsid ssh "${VH_SSH_OPTS[@]}" "${VH_SSH_TARGET[@]}" bash -s < <(vh_remote_script vm-run.sh "$@")
}

# vh_kill_job JOBID SIGNAL: vm-kill.sh over the owner's ssh (vh_job_ssh first): SIGNAL to the
# job's session on the VM, SIGKILL after KILL_GRACE. In a session of its own, so that the batch
# system's SIGKILL to the job's session does not stop it. It execs: `(vh_kill_job ...) &`.
vh_kill_job() {
    exec setsid timeout -k 2 "$((KILL_GRACE + SSH_CONNECT_TIMEOUT + 15))" \
        ssh "${VH_SSH_OPTS[@]}" "${VH_SSH_TARGET[@]}" bash -s \
        < <(vh_remote_script vm-kill.sh "$1" "$2" "$KILL_GRACE") >/dev/null
}

# --- the job starters (Torque's and Slurm's) ---

# The job's exported variables NOT passed to the job on its VM, and why:
#   HOME USER LOGNAME SHELL MAIL   the node's account: the VM's login sets its own
#   PWD OLDPWD SHLVL _             the starter's own shell's, not the job's
#   TMPDIR                         a directory on the node (pbs_mom's per-job one); the VM has its own
#   TERM DISPLAY LS_COLORS XDG_*   the submitter's terminal and desktop session
#   SSH_*                          the node's ssh session (agent socket, connection), not the VM's
#   BASH_* ENV                     what bash and sh run at start (BASH_ENV, ENV): not a job's variable
#   BASHOPTS SHELLOPTS UID EUID PPID   read-only in bash: exporting them on the VM fails
#   PBS_NODEFILE                   a file on the node; vm-run.sh passes one naming the VM
#   SLURM_CONF                     the node's slurm.conf; the VM runs no Slurm
VH_ENV_SKIP='^(HOME|USER|LOGNAME|SHELL|MAIL|PWD|OLDPWD|SHLVL|_|TMPDIR|TERM|DISPLAY|LS_COLORS|XDG_.*|SSH_.*|BASH_.*|ENV|BASHOPTS|SHELLOPTS|UID|EUID|PPID|PBS_NODEFILE|SLURM_CONF)$'

# The job's environment for the VM: NAME=VALUE of each exported variable but VH_ENV_SKIP's, in
# VH_JOB_ENV. Call it before the starter exports or changes any variable of its own.
vh_job_environment() {
    local vh_env_name  # not `name`: a job may export that, and the local would hide its value
    VH_JOB_ENV=()
    while IFS= read -r vh_env_name; do
        [[ $vh_env_name =~ $VH_ENV_SKIP || ! $vh_env_name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && continue
        VH_JOB_ENV+=("$vh_env_name=${!vh_env_name}")
    done < <(compgen -e)
}

# vh_read_owner_record JOBID PROLOGUE: the owner's part of the job's record (job.env), as the job
# starter reads it, running as the owner; sets VM_NAME ADDRESS SSH_PORT JOB_USER. False, with the
# reason in VH_RECORD_ERROR, if there is none (PROLOGUE, the batch system's name for the hook that
# writes it, did not run or failed), or it is another user's or incomplete.
vh_read_owner_record() {
    local dir me
    dir=$(vh_job_dir "$1")
    if [[ ! -r $dir/job.env ]]; then
        VH_RECORD_ERROR="this job has no VM (no record in $dir): the vmpool $2 did not run or failed"
        return 1
    fi
    vh_read_record "$dir/job.env" VM_NAME ADDRESS SSH_PORT JOB_USER
    me=$(id -un)
    if [[ ${JOB_USER:-} != "$me" ]]; then
        VH_RECORD_ERROR="the job's VM record is for ${JOB_USER:-nobody}, not $me"
        return 1
    fi
    if ! [[ ${ADDRESS:-} =~ ^[A-Za-z0-9][A-Za-z0-9.:_-]*$ ]] || ! vh_valid_uint "${SSH_PORT:-}"; then
        VH_RECORD_ERROR="the job's VM record $dir/job.env is incomplete"
        return 1
    fi
}

VH_GOT_SIGNAL=  # the first of TERM INT HUP the starter got, forwarded to the VM
VH_KILLER=      # the process forwarding it (vh_kill_job)

# A signal from the batch system (qdel, scancel, the time limit) reaches the starter; the job's
# ssh client runs in a session of its own and does not get it: forward it, once, to the job's
# session on VM_NAME, from a process outside the job's session on the node.
vh_forward_signal() {
    [[ -n $VH_GOT_SIGNAL ]] && return 0
    VH_GOT_SIGNAL=$1
    trap '' TERM INT HUP
    vh_say "got SIG$1: ending the job on VM $VM_NAME"
    (vh_kill_job "$VH_JOBID" "$1") &
    VH_KILLER=$!
}

# vh_run_job_to_end ARGS...: the job on its VM (vh_run_job ARGS..., after vh_job_ssh) until its
# ssh client is gone, TERM INT HUP forwarded meanwhile; its exit status in VH_JOB_STATUS (the
# job's, or 255 when ssh failed).
vh_run_job_to_end() {
    local ssh_pid
    trap 'vh_forward_signal TERM' TERM
    trap 'vh_forward_signal INT' INT
    trap 'vh_forward_signal HUP' HUP
    (vh_run_job "$@") &
    ssh_pid=$!
    # `wait` returns early when a trapped signal arrives; wait again until ssh is really gone.
    while :; do
        VH_JOB_STATUS=0
        wait "$ssh_pid" || VH_JOB_STATUS=$?
        kill -0 "$ssh_pid" 2>/dev/null || break
    done
}

# After vh_run_job_to_end: if a signal was forwarded, wait for the forwarding, then end as the job
# ended: by its signal N (status 128+N), so the batch system records a signal as on a plain node
# (pbs_mom: 256+N), else with its status. Returns only if no signal came.
vh_exit_if_signalled() {
    local status=$VH_JOB_STATUS
    [[ -n $VH_GOT_SIGNAL ]] || return 0
    if [[ -n $VH_KILLER ]]; then
        wait "$VH_KILLER" || true
    fi
    if (( status > 128 && status <= 128 + 64 )); then
        trap - "$((status - 128))"
        kill -s "$((status - 128))" "$$"
    fi
    exit "$status"
}

# --- telling the job's owner ---

# vh_tell_user JOBID USER UID GID DIR MESSAGE: append "<date> <jobid>: MESSAGE" to
# DIR/vmpool-<jobid>.log (else the same file in USER's home), AS the user: TORQUE delivers no .o/.e
# of a job its prologue aborts, and replaces a requeued attempt's .e with the rerun's. Best effort,
# bounded in time; root never opens a path in the user's directories itself. Never as root (uid
# 0 writes anywhere, through any symlink); a system account (below MIN_UID, its job refused)
# only into a directory it owns: in one others control (/tmp, a shared project directory) a
# planted symlink could make it append to one of the system's files it owns.
vh_tell_user() {
    local jobid=$1 user=$2 uid=$3 gid=$4 dir=$5 line home owner_only=
    (( uid != 0 )) || return 0
    (( uid >= MIN_UID )) || owner_only=$uid
    line="$(date '+%F %T') vmpool $VH_HOOK $jobid: $6"
    home=$(getent passwd -- "$user" | cut -d: -f6)
    for dir in "$dir" "$home"; do
        [[ -n $dir ]] || continue
        # shellcheck disable=SC2016  # expanded by that sh
        timeout -k 1 10 setpriv --reuid="$uid" --regid="$gid" --clear-groups -- \
            sh -c '[ -z "$3" ] || [ "$(stat -c %u -- "$2")" = "$3" ] || exit 1
                   printf "%s\n" "$1" >>"$2/$4"' vmpool-tell "$line" "$dir" "$owner_only" \
                   "vmpool-$jobid.log" 2>/dev/null && return 0
    done
    return 0
}
