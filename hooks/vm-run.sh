# vm-run.sh — runs as the job's owner ON THE JOB'S VM, sent by the jobstarter as
# `ssh user@vm bash -s` preceded by
# `set -- JOBID WORKDIR SHELL NODES SCRIPT EXEC_WORD ARGS NAME=VALUE...`.
#
# Writes the job script to ~/.vmpool-jobs/<jobid>.SC, then runs the job's shell as pbs_mom runs
# it on a plain node: a login shell (argv[0] `-bash`: /etc/profile and /etc/profile.d are read;
# TORQUE's start_exec.c, source_login_shells_or_not), in a session of its own, with the default
# disposition of every signal, fed the line pbs_mom would feed it (`[exec ]<script> ARGS`), with
# the job's variables and a PBS_NODEFILE naming this VM, in WORKDIR. Records the session id in
# ~/.vmpool-jobs/<jobid>.sid for vm-kill.sh. Exits with the job shell's status (128+N when a
# signal N ended it). stdout/stderr are the ssh channel: streamed.

# shellcheck shell=bash
set -u
jobid=$1 workdir=$2 shell=$3 nodes=$4 script=$5 exec_word=$6 args=$7
shift 7
umask 077
state=$HOME/.vmpool-jobs
mkdir -p -- "$state" || exit 255
umask 022
sc=$state/$jobid.SC
printf '%s' "$script" >"$sc" && chmod 0700 -- "$sc" || exit 255
nodefile=$state/$jobid.nodes
for ((i = 0; i < nodes; i++)); do uname -n; done >"$nodefile"

if ! cd -- "$workdir" 2>/dev/null; then
    echo "vmpool: no directory $workdir on the VM; the job runs in $HOME" >&2
    cd || exit 255
fi
if [[ ! -x $shell ]]; then
    echo "vmpool: the job's shell $shell does not exist on the VM" >&2
    exit 127
fi
# vm-kill.sh came first (qdel before the job started): the job never starts.
if [[ -f $state/$jobid.cancelled ]]; then
    signal=$(cat -- "$state/$jobid.cancelled")
    rm -f -- "$state/$jobid.cancelled"
    exit $((128 + $(kill -l "${signal:-TERM}" 2>/dev/null || echo 15)))
fi

quote="'\\''"
line="$exec_word'${sc//\'/$quote}'${args:+ $args}"
# In the foreground, not `&`: a non-interactive bash starts asynchronous commands with SIGINT
# and SIGQUIT ignored, and the job would inherit that. setsid runs in place (this child of bash
# leads no process group), so the shell's pid is its session id; it writes it down itself.
# shellcheck disable=SC2016  # expanded by the inner bash
setsid bash -c 'echo "$$" >"$1"; shell=$2; shift 2
    for variable in "$@"; do export "$variable" 2>/dev/null; done
    exec -a "-${shell##*/}" "$shell"' vm-run "$state/$jobid.sid" "$shell" \
    "$@" "PBS_NODEFILE=$nodefile" <<<"$line"
status=$?
sid=$(cat -- "$state/$jobid.sid" 2>/dev/null)
# A forwarded signal (vm-kill.sh marks the job cancelled before it signals) ended the shell: what
# is left of the job (a script's TERM trap) has its grace, and vm-kill.sh SIGKILLs it after that.
if [[ -f $state/$jobid.cancelled && $sid =~ ^[0-9]+$ ]]; then
    for ((i = 0; i < 36000; i++)); do
        pgrep -s "$sid" >/dev/null || break
        sleep 0.1
    done
fi
# Like pbs_mom at the end of a job: what the job left running in its session goes too.
[[ $sid =~ ^[0-9]+$ ]] && pkill -KILL -s "$sid" 2>/dev/null
rm -f -- "$state/$jobid.sid" "$state/$jobid.cancelled"
exit "$status"
