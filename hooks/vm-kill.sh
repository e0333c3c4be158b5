# vm-kill.sh — runs as the job's owner ON THE JOB'S VM, sent by the jobstarter when it gets a
# signal, as `ssh user@vm bash -s` preceded by `set -- JOBID SIGNAL GRACE`.
#
# Marks the job cancelled with SIGNAL (so a vm-run.sh that has not started it yet never will;
# vm-run.sh removes the mark), sends SIGNAL to the job's session, and SIGKILL to whatever is left
# of it after GRACE seconds.

# shellcheck shell=bash
set -u
jobid=$1 signal=$2 grace=$3
state=$HOME/.vmpool-jobs
(umask 077 && mkdir -p -- "$state")
printf '%s\n' "$signal" >"$state/$jobid.cancelled"
sid=
for ((i = 0; i < grace * 10; i++)); do
    sid=$(cat -- "$state/$jobid.sid" 2>/dev/null) && [[ -n $sid ]] && break
    sleep 0.1
done
[[ $sid =~ ^[0-9]+$ ]] || exit 0
pkill "-$signal" -s "$sid"
for ((i = 0; i < grace * 10; i++)); do
    pgrep -s "$sid" >/dev/null || exit 0
    sleep 0.1
done
pkill -KILL -s "$sid"
exit 0
