# vm-prepare.sh — runs as root ON A POOL VM, sent by the prologue as `ssh root@vm bash -s`
# preceded by `set -- USER UID GROUP GID HOME WORKDIR PUBKEY JOBID`.
#
# Gives the VM the job owner's account (same uid/gid as on the worker node, password field `*`:
# sshd with UsePAM no refuses key logins to locked `!` accounts), the per-job public key as the
# only authorized key, and the job's working directory. Idempotent (a requeued job re-runs it).
# Exit 0 done; 97 the VM conflicts with the user (uid, name or gid taken), nothing changed;
# 1 failed part-way (useradd & co. exit 10 after partial changes: never mistaken for 97). Everything done inside the user's home is done AS the user (setpriv), so a
# symlink the user planted in an earlier run cannot make root write elsewhere.

# shellcheck shell=bash
set -euo pipefail
trap 'echo "vm-prepare failed at line $LINENO" >&2; exit 1' ERR
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 022
cd /
user=$1 uid=$2 group=$3 gid=$4 home=$5 workdir=$6 pubkey=$7 jobid=$8

conflict() {
    echo "conflict: $*" >&2
    exit 97
}

as_user() {
    setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
}

# --- checks, before any change ---

entry=$(getent passwd -- "$user" || true)
if [[ -n $entry ]]; then
    IFS=: read -r _ _ have_uid _ <<<"$entry"
    [[ $have_uid == "$uid" ]] || conflict "user $user exists on the VM with uid $have_uid, not $uid"
fi
owner=$(getent passwd -- "$uid" | cut -d: -f1 || true)
[[ -z $owner || $owner == "$user" ]] || conflict "uid $uid belongs to $owner on the VM, not $user"
gentry=$(getent group -- "$gid" || true)
if [[ -z $gentry ]] && getent group -- "$group" >/dev/null; then
    conflict "group $group exists on the VM with another gid than $gid"
fi
if [[ -n $gentry && ${gentry%%:*} != "$group" ]]; then
    conflict "gid $gid is group ${gentry%%:*} on the VM, not $group"
fi
if [[ -e $home && ! -L $home ]]; then
    [[ $(stat -c %u -- "$home") == "$uid" ]] || conflict "$home exists on the VM, not owned by uid $uid"
fi

# --- leftovers of an earlier run of this job (requeued without an epilogue) ---

for _ in $(seq 50); do
    pkill -KILL -U "$uid" || break
    sleep 0.1
done

# --- the account ---

[[ -n $gentry ]] || groupadd -g "$gid" -- "$group"
if [[ -z $entry ]]; then
    mkdir -p -- "$(dirname -- "$home")"
    useradd -u "$uid" -g "$gid" -d "$home" -M -s /bin/bash -p '*' -- "$user"
else
    usermod -g "$gid" -d "$home" -s /bin/bash -p '*' -- "$user"
fi
if [[ ! -d $home ]]; then
    mkdir -p -- "$(dirname -- "$home")"
    install -d -o "$uid" -g "$gid" -m 0700 -- "$home"
fi

# --- the per-job key: the only one that opens the account; no forwarding, no pty ---

as_user bash -c '
    set -eu
    umask 077
    mkdir -p -- "$1/.ssh"
    printf "restrict %s\n" "$2" >"$1/.ssh/authorized_keys.new"
    mv -f -- "$1/.ssh/authorized_keys.new" "$1/.ssh/authorized_keys"
' vm-prepare "$home" "$pubkey"

# An earlier attempt of this job on this VM (requeued without an epilogue) may have left its
# "cancelled" mark (vm-kill.sh): it must not stop this attempt.
as_user rm -f -- "$home/.vmpool-jobs/$jobid.cancelled" "$home/.vmpool-jobs/$jobid.sid"

# --- the working directory ---

# Only the user creates it, as the user: root creating directories where the user cannot (say
# in a root-owned tree) would hand the user a place root trusts. Without it the job runs in $HOME.
if [[ ! -d $workdir ]] && ! as_user mkdir -p -- "$workdir" 2>/dev/null; then
    echo "vmpool: cannot create $workdir on the VM as $user; the job will run in $home" >&2
fi
