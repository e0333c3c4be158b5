# vm-scrub.sh — runs as root ON A POOL VM, sent by the epilogue as `ssh root@vm bash -s`
# preceded by `set -- USER UID GROUP GID HOME WORKDIR SCRUB_DIR...`.
#
# Removes every trace of the job owner: the per-job key, every process (killed until none is
# left), the account, its home, crontab and mail, its files in SCRUB_DIRS (/tmp, /var/tmp,
# /dev/shm) and the working directory the prologue created. Then checks that it all worked.
# Exit 0: the VM is clean; 1: something is left (one line per problem on stderr), the VM must
# not serve another job. Idempotent; fine when the prologue never created the account.

# shellcheck shell=bash
set -uo pipefail
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /
user=$1 uid=$2 group=$3 gid=$4 home=$5 workdir=$6
shift 6
scrub_dirs=("$@")
problems=0

problem() {
    echo "$*" >&2
    problems=$((problems + 1))
}

owned_by_user() {
    [[ -e $1 || -L $1 ]] && [[ $(stat -c %u -- "$1" 2>/dev/null) == "$uid" ]]
}

# No new logins: the per-job key goes first. Removed as the user: a symlink the user planted
# in the home must not make root delete anything else.
# First shut the door, as root and without touching the user's files: a locked, expired account
# takes no new login even if the user made the key file undeletable.
if getent passwd -- "$user" >/dev/null; then
    usermod -L -e 1 -- "$user" 2>/dev/null || problem "cannot lock account $user"
fi
setpriv --reuid="$uid" --regid="$gid" --clear-groups -- rm -f -- "$home/.ssh/authorized_keys" 2>/dev/null

# Every process of the uid, until none is left (a fork bomb needs a few rounds).
for _ in $(seq 100); do
    pkill -KILL -U "$uid" 2>/dev/null
    pkill -KILL -u "$uid" 2>/dev/null
    pgrep -U "$uid" >/dev/null || pgrep -u "$uid" >/dev/null || break
    sleep 0.1
done
if pgrep -U "$uid" >/dev/null || pgrep -u "$uid" >/dev/null; then
    problem "processes of uid $uid survive SIGKILL: $(pgrep -d, -U "$uid")"
fi

crontab -r -u "$user" >/dev/null 2>&1
if command -v atq >/dev/null; then  # at jobs of the user
    for at_job in $(atq 2>/dev/null | awk -v u="$user" '$NF == u {print $1}'); do atrm "$at_job"; done
fi
# System V IPC the user created (sshd here runs without PAM: no session manager removes them)
if command -v ipcrm >/dev/null; then
    for kind in m q s; do
        ipcs -"$kind" 2>/dev/null | awk -v u="$user" '$3 == u {print $2}' | while read -r id; do
            ipcrm -"$kind" "$id" 2>/dev/null
        done
    done
fi
rm -f -- "/var/spool/cron/crontabs/$user" "/var/mail/$user" "/var/spool/mail/$user"

# The account (and its own group, if no one else uses it).
entry=$(getent passwd -- "$user")
if [[ -n $entry ]]; then
    if [[ $(cut -d: -f3 <<<"$entry") != "$uid" ]]; then
        problem "user $user on the VM has another uid than $uid: not removed"
    elif ! userdel -- "$user" 2>/dev/null; then
        problem "userdel $user failed"
    fi
fi
gentry=$(getent group -- "$gid")
if [[ -n $gentry && $(cut -d: -f1 <<<"$gentry") == "$group" && -z $(cut -d: -f4 <<<"$gentry") ]] \
        && (( gid >= 1000 )) && ! cut -d: -f4 /etc/passwd | grep -qx -- "$gid"; then
    groupdel -- "$group" 2>/dev/null || problem "groupdel $group failed"
fi

# The home, if it is the user's (never follow a symlink out of it).
if owned_by_user "$home"; then
    rm -rf --one-file-system -- "$home" || problem "cannot remove $home"
fi

# The working directory: its topmost component owned by the user (the prologue made it so).
top=
path=$workdir
while [[ $path != / && -n $path ]]; do
    owned_by_user "$path" && top=$path
    path=$(dirname -- "$path")
done
if [[ -n $top ]]; then
    rm -rf --one-file-system -- "$top" || problem "cannot remove $top"
fi

# Files left in the shared temporary directories (anywhere below them).
for dir in "${scrub_dirs[@]}"; do
    [[ -d $dir && ! -L $dir ]] || continue
    find "$dir" -xdev -mindepth 1 -uid "$uid" -prune -exec rm -rf --one-file-system -- {} + 2>/dev/null
    left=$(find "$dir" -xdev -mindepth 1 -uid "$uid" -print -quit 2>/dev/null)
    [[ -z $left ]] || problem "cannot remove $left"
done

# Check, independently of how the steps above went.
getent passwd -- "$user" >/dev/null && problem "account $user still exists"
[[ -e $home ]] && owned_by_user "$home" && problem "home $home still exists"
if pgrep -U "$uid" >/dev/null || pgrep -u "$uid" >/dev/null; then
    problem "processes of uid $uid still run"
fi
(( problems == 0 ))
