# vm-run.sh — runs as the job's owner ON THE JOB'S VM, sent by the jobstarter as
# `ssh user@vm bash -s` preceded by
# `set -- JOBID WORKDIR SHELL NODES SCRIPT EXEC_WORD ARGS NAME=VALUE...`.
#
# Writes the job script to ~/.vmpool-jobs/<jobid>.SC, then runs the job's shell in a session of
# its own, fed the line pbs_mom would feed it (`[exec ]<script> ARGS`), with the job's variables,
# a PBS_NODEFILE naming this VM, in WORKDIR. Records the session id in ~/.vmpool-jobs/<jobid>.sid
# for vm-kill.sh. Exits with the job shell's status. stdout/stderr are the ssh channel: streamed.

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
[[ -e $state/$jobid.cancelled ]] && exit 143

quote="'\\''"
line="$exec_word'${sc//\'/$quote}'${args:+ $args}"
setsid env -- "$@" "PBS_NODEFILE=$nodefile" "$shell" <<<"$line" &
sid=$!
echo "$sid" >"$state/$jobid.sid"
wait "$sid"
status=$?
# Like pbs_mom at the end of a job: what the job left running in its session goes too.
pkill -KILL -s "$sid" 2>/dev/null
rm -f -- "$state/$jobid.sid"
exit "$status"
