# vm-prepare.sh — runs as root ON A POOL VM, sent by the prologue as `ssh root@vm bash -s`
# preceded by `set -- USER UID GROUP GID HOME WORKDIR PUBKEY`.
#
# Gives the VM the job owner's account (same uid/gid as on the worker node, password field `*`:
# sshd with UsePAM no refuses key logins to locked `!` accounts), the per-job public key as the
# only authorized key, and the job's working directory. Idempotent (a requeued job re-runs it).
# Exit 0 done; 10 the VM conflicts with the user (uid or name taken), nothing changed; other:
# failed part-way. Everything done inside the user's home is done AS the user (setpriv), so a
# symlink the user planted in an earlier run cannot make root write elsewhere.

# shellcheck shell=bash
set -euo pipefail
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 022
cd /
user=$1 uid=$2 group=$3 gid=$4 home=$5 workdir=$6 pubkey=$7

conflict() {
    echo "conflict: $*" >&2
    exit 10
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

# --- the working directory ---

# Below the home, or anywhere the user may create it: as the user. Elsewhere (e.g. /scratch/x)
# root creates the missing components one by one, each owned by the user, never through a
# symlink that root does not own. The epilogue removes the topmost component the user owns.
make_workdir_as_root() {
    local path=/ part parts
    IFS=/ read -r -a parts <<<"${workdir#/}"
    for part in "${parts[@]}"; do
        [[ -z $part ]] && continue
        path=${path%/}/$part
        if [[ -L $path && $(stat -c %u -- "$path") != 0 ]]; then
            echo "refusing to follow $path, a symlink not owned by root" >&2
            return 1
        fi
        if [[ ! -e $path ]]; then
            mkdir -- "$path"
            chown -h "$uid:$gid" -- "$path"
        fi
    done
}

if [[ ! -d $workdir ]]; then
    as_user mkdir -p -- "$workdir" 2>/dev/null || make_workdir_as_root
fi
[[ -d $workdir ]]
