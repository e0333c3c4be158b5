# vmpool-hooks.sh — code shared by vmpool's Torque hooks (prologue, jobstarter, epilogue).
#
# Sourced, never executed. The hooks find it beside themselves (jobstarter, and every hook in
# the source tree) or in ./vmpool/ (prologue and epilogue installed in mom_priv). Its config,
# vmpool-hooks.conf, lies beside it: KEY=value lines written by `hooks/install`.
#
# Per-job record on the worker node, JOB_DIR/<jobid>/ (root:root 0711), written by the prologue
# right after `vmpool acquire` and removed by the epilogue:
#   root.env, root_known_hosts   root 0600   what the epilogue needs (VM, root key, job owner)
#   job.env, known_hosts,        owner 0400  what the jobstarter needs: the VM's address, its
#   id_ed25519                               pinned host key, the per-job private key
# Root never reads a file the job owner owns: the owner may rewrite those.

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

VH_HOOK=${VH_HOOK:-hook}
VH_JOBID=

# --- messages ---

# One line on stderr: pbs_mom appends it to the job's .e file (or the mom log for epilogues).
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

# Read vmpool-hooks.conf: known keys only, values checked; the file is parsed, never sourced.
vh_load_config() {
    local file=${1:-$VH_LIB_DIR/vmpool-hooks.conf} line key value known
    if [[ ! -r $file ]]; then
        vh_say "cannot read $file (are the hooks installed with 'make install-hooks'?)"
        return 1
    fi
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        key=${line%%=*}
        value=${line#*=}
        known=0
        for k in "${VH_CONF_KEYS[@]}"; do [[ $key == "$k" ]] && known=1; done
        if [[ $line != *=* || $known == 0 ]]; then
            vh_say "$file: unknown line $(vh_show "$line") (keys: ${VH_CONF_KEYS[*]})"
            return 1
        fi
        printf -v "$key" '%s' "$value"
    done <"$file"
    vh_check_config "$file"
}

vh_check_config() {
    local file=$1 key path
    for key in ACQUIRE_TIMEOUT PREPARE_TIMEOUT SCRUB_TIMEOUT RELEASE_TIMEOUT REQUEUE_BACKOFF \
               SSH_CONNECT_TIMEOUT KILL_GRACE MIN_UID MAX_PREPARE_ATTEMPTS; do
        if ! vh_valid_uint "${!key}"; then
            vh_say "$file: $key=$(vh_show "${!key}") is not a whole number of seconds"
            return 1
        fi
    done
    for key in VMPOOL VMPOOL_CONFIG JOB_DIR; do
        if ! vh_valid_path "${!key}"; then
            vh_say "$file: $key=$(vh_show "${!key}") is not an absolute path"
            return 1
        fi
    done
    for path in $SCRUB_DIRS; do
        if ! vh_valid_path "$path" || [[ $path == / ]]; then
            vh_say "$file: SCRUB_DIRS holds $(vh_show "$path"), not an absolute directory below /"
            return 1
        fi
    done
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
