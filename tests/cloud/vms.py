"""Stand-in VMs for vmpool's tests: real sshd processes in their own namespaces.

Each stand-in VM is an ``sshd`` running in its own mount + PID + UTS + IPC
namespace, chrooted (``pivot_root``) into an overlay of the host's ``/``
(``lowerdir=/``, ``upperdir=VM/upper``), listening on its own loopback address
(``127.0.0.0/8`` routes to ``lo`` without aliases).  The VM therefore has its
own ``/etc/passwd`` (copy-up on write), its own empty ``/root``, ``/home``,
``/tmp``, ``/var/tmp``, ``/run``, ``/dev`` and its own process table, but the
host's binaries, uids and network.  It is a *test bed*, not a sandbox: there is
no user namespace and root in the VM is root on the host.

This module is stdlib-only: it is imported both by the fake nova (in
``.cloud-venv``) and by pytest (in ``.venv``).

Layout of ``base_dir/<vm_id>/``::

    keys/      the VM's own SSH host keys (ssh-keygen: ecdsa, ed25519, rsa)
    upper/     overlay upper layer: everything the VM wrote (persists across stop/start)
    work/      overlay work dir
    root/      mount point of the VM's root (only mounted inside the VM's namespace)
    lock       flock()ed while the VM runs (held by the supervisor *and* the VM's
               pid 1, so a VM can never run twice, not even from two processes)
    boot.sh    the boot script (mounts, pivot_root, exec init) run by unshare
    sshd.log   stderr of the VM's boot script, init and sshd (LogLevel VERBOSE)
    state.json pids of a running VM (for ``python -m tests.cloud.vms stop``)

Process tree of a running VM (host view)::

    <supervisor thread>
      └─ unshare --mount --pid --fork --kill-child ...   (setpriv --pdeathsig KILL)
           └─ /bin/sh /usr/local/sbin/vmpool-init        pid 1 in the VM
                ├─ sleep 2147483647                      keeps init's `wait` blocking
                └─ /usr/sbin/sshd -D -e                  the listener
                     └─ sshd: root@notty ...             one per connection

Why a tiny init as pid 1 rather than sshd itself: on a real VM orphaned
processes (a user's ``nohup`` job, the children of a killed shell) are
reparented to init, which reaps them; sshd as pid 1 does not reap children it
did not spawn, so zombies would pile up in ``ps`` and ``kill``-then-wait logic
in vmpool would behave differently than on a real VM.  The init is a ``dash``
script (about 1 MB, no Python per VM): ``wait`` without operands calls
``wait3(-1)`` and so reaps *any* child, including reparented orphans; a
never-ending ``sleep`` job keeps that ``wait`` blocking even while sshd is
stopped.  The init also lets the "refuse" fault stop and restart the sshd
listener (SIGUSR1 / SIGUSR2 to pid 1) without tearing down the VM.

Lifetime: every VM process is forked by ONE long-lived supervisor thread
(``setpriv --pdeathsig KILL`` is tied to the forking *thread*), ``unshare
--kill-child`` kills the VM's pid 1 when unshare dies, and the kernel kills the
whole PID namespace when its pid 1 dies.  So ``kill -9`` of the process holding
a :class:`VmSupervisor` removes all its VMs (and their mounts) within ~0.3 s.
(iptables rules of a "drop" fault do survive a ``kill -9``; :meth:`start` and
:meth:`stop_all` remove stale ones for their VMs.)

Users created in a VM: sshd runs with ``UsePAM no``, which refuses key logins to
*locked* accounts, i.e. a password field starting with ``!``.  ``useradd``
without ``-p`` creates exactly that, so whatever creates users on a VM (vmpool's
hooks) must set the password field to ``*`` (``useradd -p '*' ...`` or
``usermod -p '*' ...``) -- which is also what cloud-init does for key-only users.
"""

from __future__ import annotations

import argparse
import atexit
import builtins
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FAULT_MODES", "VmError", "VmSupervisor"]

SSHD = "/usr/sbin/sshd"
KEY_TYPES = ("ecdsa", "ed25519", "rsa")  # glob order of /etc/ssh/ssh_host_*_key.pub, as cloud-init prints them
FAULT_MODES = ("ok", "refuse", "hang", "drop")
INIT_PATH = "/usr/local/sbin/vmpool-init"
SSHD_PIDFILE = "/run/vmpool-sshd.pid"  # written by the VM's init (sshd itself runs with PidFile none)
# Host directories the VM must not see (opaque dirs in the upper layer); base_dir and this
# checkout (wherever it was cloned, e.g. a CI runner's /check/...) are added.
HIDDEN_DIRS = ("/root", "/home", "/work", "/mnt", "/media", "/srv")
CHECKOUT_DIR = str(Path(__file__).resolve().parents[2])
# Paths that get a fresh tmpfs / proc / ... inside the VM anyway.
VOLATILE_DIRS = ("/tmp", "/var/tmp", "/run", "/dev", "/proc", "/sys")
VM_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/sh",
}
_VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Runs as pid 1 of the new namespaces, still in the host's root (after `unshare`).
# $1 = VM dir, $2 = hostname.
_BOOT_SCRIPT = r"""
set -eu
vm=$1
r=$vm/root
mount -t overlay "vmpool-$2" -o "lowerdir=/,upperdir=$vm/upper,workdir=$vm/work" "$r"
mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys"
mount --bind "$r/proc/sys" "$r/proc/sys"
mount -o remount,bind,ro "$r/proc/sys"
mount -t tmpfs -o mode=755,nosuid,noexec,size=1m vmpool-dev "$r/dev"
cd "$r/dev"
mknod -m 666 null c 1 3
mknod -m 666 zero c 1 5
mknod -m 666 full c 1 7
mknod -m 666 random c 1 8
mknod -m 666 urandom c 1 9
mknod -m 666 tty c 5 0
ln -s /proc/self/fd fd
ln -s /proc/self/fd/0 stdin
ln -s /proc/self/fd/1 stdout
ln -s /proc/self/fd/2 stderr
mkdir -m 755 pts
mkdir -m 1777 shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts pts
ln -s pts/ptmx ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev vmpool-shm shm
mount -t tmpfs -o mode=1777,nosuid,nodev vmpool-tmp "$r/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev vmpool-vartmp "$r/var/tmp"
mount -t tmpfs -o mode=755,nosuid,nodev vmpool-run "$r/run"
mkdir -m 755 "$r/run/sshd" "$r/run/.oldroot"
mkdir -m 1777 "$r/run/lock"
hostname "$2"
cd "$r"
pivot_root . run/.oldroot
cd /
umount -l /run/.oldroot
rmdir /run/.oldroot
exec {init}
""".replace("{init}", INIT_PATH)

# pid 1 of the VM (dash).  See the module docstring for why it exists.
_INIT_SCRIPT = r"""#!/bin/sh
# pid 1 of a vmpool stand-in VM (tests/cloud/vms.py): reaps orphans like a real
# init and runs sshd.  SIGUSR1: stop the sshd listener; SIGUSR2: (re)start it.
sshd_pid=
keeper=
start_sshd() {
    if [ -n "$sshd_pid" ] && kill -0 "$sshd_pid" 2>/dev/null; then return 0; fi
    /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config </dev/null &
    sshd_pid=$!
    echo "$sshd_pid" > {pidfile}
}
stop_sshd() {
    rm -f {pidfile}
    if [ -n "$sshd_pid" ]; then kill -TERM "$sshd_pid" 2>/dev/null || true; fi
    sshd_pid=
}
trap start_sshd USR2
trap stop_sshd USR1
echo "vmpool-init: booted $(hostname)" >&2
start_sshd
while :; do
    # `wait` (no operands) reaps any child, reparented orphans included, as long
    # as some job runs: the sleep keeps it blocking even while sshd is stopped.
    if [ -z "$keeper" ] || ! kill -0 "$keeper" 2>/dev/null; then
        sleep 2147483647 </dev/null &
        keeper=$!
    fi
    wait || true
done
""".replace("{pidfile}", SSHD_PIDFILE)

_SSHD_CONFIG = """\
# sshd_config of a vmpool stand-in VM (generated by tests/cloud/vms.py)
ListenAddress {address}:{port}
HostKey /etc/ssh/ssh_host_ecdsa_key
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_rsa_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes yes
PidFile none
AuthorizedKeysFile .ssh/authorized_keys
Subsystem sftp internal-sftp
UseDNS no
LogLevel VERBOSE
PrintMotd no
PrintLastLog no
X11Forwarding no
AcceptEnv LANG LC_*
"""


class VmError(RuntimeError):
    """A stand-in VM could not be started, stopped or faulted as asked."""


@dataclass
class _Vm:
    vm_id: str
    dir: Path
    address: str
    port: int
    proc: subprocess.Popen
    lock_fd: int
    init_pid: int | None = None
    fault: str = "ok"
    log_offset: int = 0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- /proc helpers


def _proc_stat(pid: int | None) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a host pid, or None if it does not exist."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data[data.rindex(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[19])


def _alive(pid: int | None) -> bool:
    """True if pid exists and is not a zombie (``kill -0`` would say yes to zombies)."""
    if not pid:
        return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x")


def _children(pid: int | None) -> list[int]:
    if not pid:
        return []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _nspid(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except FileNotFoundError:
        pass
    return []


def rule_tag(base_dir: str | Path) -> str:
    """The tag in the iptables comments of the VMs under base_dir (``vmpool-vm:<tag>:<vm id>``)."""
    return hashlib.sha1(str(Path(base_dir).resolve()).encode()).hexdigest()[:10]


def _pidns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def pids_in_pidns(ns: str) -> list[int]:
    """Host pids of all processes in the PID namespace ``ns`` (a readlink of /proc/PID/ns/pid)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _pidns(int(name)) == ns:
            out.append(int(name))
    return out


def _connect(address: str, port: int, timeout: float) -> str:
    """'ok', 'refused' or 'timeout' for one TCP connect."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((address, port))
        return "ok"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        if e.errno == errno.ECONNREFUSED:
            return "refused"
        return "timeout"
    finally:
        s.close()


def _check_loopback(address: str) -> None:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise VmError(f"stand-in VM address must be an IPv4 address in 127.0.0.0/8, got {address!r}") from None
    if not ip.is_loopback:
        raise VmError(f"stand-in VM address must be in 127.0.0.0/8, got {address}")


# ---------------------------------------------------------------- iptables (fault "drop")


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("iptables") or "/usr/sbin/iptables"
    p = subprocess.run([exe, "-w", "10", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise VmError(f"iptables {' '.join(args)} failed: {p.stderr.strip()}")
    return p


def _drop_rule(address: str, port: int, comment: str) -> list[str]:
    return [
        "-d",
        f"{address}/32",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        str(port),
        "-m",
        "comment",
        "--comment",
        comment,
        "-j",
        "DROP",
    ]


def _remove_drop_rules(match) -> None:
    """Delete every INPUT rule whose comment satisfies ``match(comment)``."""
    if not (shutil.which("iptables") or os.path.exists("/usr/sbin/iptables")):
        return
    p = _iptables("-S", "INPUT", check=False)
    if p.returncode != 0:
        return
    for line in p.stdout.splitlines():
        toks = shlex.split(line)
        if len(toks) < 2 or toks[0] != "-A" or "--comment" not in toks:
            continue
        comment = toks[toks.index("--comment") + 1]
        if match(comment):
            _iptables("-D", *toks[1:], check=False)


# ---------------------------------------------------------------- the supervisor

_live_supervisors: weakref.WeakSet[VmSupervisor] = weakref.WeakSet()


def _os_threading():
    """(threading, queue) modules with *real* OS threads, even if eventlet monkey-patched them.

    The fake nova runs under eventlet: a green "supervisor thread" would not be a
    thread of its own, and green queues/events must not be touched from real OS
    threads (e.g. eventlet.tpool workers).  Using the original modules keeps the
    one-forking-thread rule in both worlds.  (eventlet is only used if already imported.)
    """
    if "eventlet" in sys.modules:
        try:
            from eventlet import patcher

            if patcher.is_monkey_patched("thread"):
                return patcher.original("threading"), patcher.original("queue")
        except Exception:
            pass
    return threading, queue


@atexit.register
def _stop_all_at_exit() -> None:
    for sup in list(_live_supervisors):
        try:
            sup.stop_all()
        except Exception:
            pass


def nsenter_argv(init_pid: int, argv: list[str]) -> list[str]:
    """Run argv inside a VM: its mount, PID, UTS and IPC namespaces, its root and cwd."""
    return ["nsenter", f"--target={init_pid}", "--mount", "--pid", "--uts", "--ipc", "--root", "--wd", "--", *argv]


class VmSupervisor:
    """Starts, stops and faults stand-in VMs below ``base_dir`` (one subdir per VM).

    Thread-safe.  All VM processes are forked by one long-lived supervisor thread
    (parent-death signals are per thread), so :meth:`start` may be called from any
    thread.  If the process holding the supervisor dies, all its VMs die with it.
    """

    def __init__(self, base_dir: str | Path, sshd_options: str = ""):
        """``sshd_options``: lines added to every VM's sshd_config (a benchmark whose one sshd plays
        many VMs raises ``MaxStartups`` with it, as each of those VMs would have its own sshd)."""
        self.sshd_options = sshd_options
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._tag = rule_tag(self.base_dir)
        self._vms: dict[str, _Vm] = {}
        self._lock = threading.Lock()
        self._vm_locks: dict[str, threading.RLock] = {}
        self._threading, q = _os_threading()
        self._queue = q.Queue()
        self._closed = False
        self._thread = self._threading.Thread(target=self._thread_main, name=f"vm-supervisor-{self._tag}", daemon=True)
        self._thread.start()
        _live_supervisors.add(self)

    # ------------------------------------------------------------ supervisor thread

    def _thread_main(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, box, done = item
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed back to the caller
                box.append((False, e))
            done.set()

    def _on_thread(self, fn):
        """Run fn() on the supervisor thread and return its result (or raise its exception)."""
        if self._threading.current_thread() is self._thread:
            return fn()
        if self._closed:
            raise VmError("VmSupervisor is closed")
        box: list = []
        done = self._threading.Event()
        self._queue.put((fn, box, done))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """stop_all() and end the supervisor thread (not needed at interpreter exit)."""
        self.stop_all()
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=5)
        _live_supervisors.discard(self)

    def __enter__(self) -> VmSupervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ paths & helpers

    def _dir(self, vm_id: str) -> Path:
        if not _VM_ID_RE.match(vm_id):
            raise VmError(f"invalid VM id {vm_id!r}")
        return self.base_dir / vm_id

    def _vm_lock(self, vm_id: str) -> threading.RLock:
        with self._lock:
            return self._vm_locks.setdefault(vm_id, threading.RLock())

    def _comment(self, vm_id: str) -> str:
        return f"vmpool-vm:{self._tag}:{vm_id}"

    @staticmethod
    def hostname_for(vm_id: str) -> str:
        hn = re.sub(r"[^A-Za-z0-9-]", "-", vm_id)[:63].strip("-")
        return hn or "vm"

    def vm_dir(self, vm_id: str) -> Path:
        return self._dir(vm_id)

    def log_path(self, vm_id: str) -> Path:
        """The VM's boot/init/sshd log (sshd runs with -e and LogLevel VERBOSE)."""
        return self._dir(vm_id) / "sshd.log"

    # ------------------------------------------------------------ prepare / console

    def prepare(self, vm_id: str) -> list[str]:
        """Create the VM's dir and SSH host keys if missing; return the public host key lines.

        Lines are the ``.pub`` files as ``cat`` prints them (``"ssh-ed25519 AAAA... root@HOST"``),
        in the order cloud-init prints them (ecdsa, ed25519, rsa).  Idempotent.
        """
        d = self._dir(vm_id)
        with self._vm_lock(vm_id):
            keys = d / "keys"
            for sub in ("keys", "upper", "work", "root"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(keys, 0o700)
            hn = self.hostname_for(vm_id)
            procs = []
            for t in KEY_TYPES:
                final = keys / f"ssh_host_{t}_key"
                if final.exists() and final.with_name(final.name + ".pub").exists():
                    continue
                tmp = keys / f".tmp.{t}.{os.getpid()}"
                for p in (tmp, tmp.with_name(tmp.name + ".pub")):
                    p.unlink(missing_ok=True)
                procs.append(
                    (
                        t,
                        tmp,
                        final,
                        subprocess.Popen(
                            ["ssh-keygen", "-q", "-t", t, "-N", "", "-C", f"root@{hn}", "-f", str(tmp)],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                        ),
                    )
                )
            for t, tmp, final, kg in procs:
                out = kg.communicate()[0]
                if kg.returncode != 0:
                    raise VmError(f"ssh-keygen -t {t} failed: {out.decode(errors='replace')}")
                os.replace(tmp.with_name(tmp.name + ".pub"), final.with_name(final.name + ".pub"))
                os.replace(tmp, final)
            return [(keys / f"ssh_host_{t}_key.pub").read_text().strip() for t in KEY_TYPES]

    def host_keys(self, vm_id: str) -> list[str]:
        """Alias of prepare(): the public host key lines."""
        return self.prepare(vm_id)

    def console_text(self, vm_id: str) -> str:
        """A cloud-init style console log with the SSH host key block (prepares the VM if needed)."""
        keys = self.prepare(vm_id)
        hn = self.hostname_for(vm_id)
        fps = []
        for t in KEY_TYPES:
            p = subprocess.run(
                ["ssh-keygen", "-l", "-f", str(self._dir(vm_id) / "keys" / f"ssh_host_{t}_key.pub")],
                capture_output=True,
                text=True,
            )
            if p.returncode == 0:
                fps.append(p.stdout.strip())
        stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
        sl = time.strftime("%b %d %H:%M:%S", time.gmtime())
        lines = [
            "[    0.000000] Linux version 6.1.0-vmpool (stand-in VM) #1 SMP PREEMPT_DYNAMIC Debian 6.1.0",
            "[    0.000000] Command line: BOOT_IMAGE=/boot/vmlinuz root=LABEL=cloudimg-rootfs ro console=ttyS0",
            "[    1.234567] EXT4-fs (vda1): mounted filesystem with ordered data mode. Quota mode: none.",
            f"Cloud-init v. 22.4.2 running 'init-local' at {stamp}. Up 3.10 seconds.",
            f"Cloud-init v. 22.4.2 running 'init' at {stamp}. Up 4.20 seconds.",
            "ci-info: ++++++++++++++++++++++++++++++++++++++Net device info++++++++++++++++++++++++++++++++++++++",
            "ci-info: | Device |  Up  |   Address   |    Mask   | Scope  |     Hw-Address    |",
            "ci-info: |   lo   | True |  127.0.0.1  | 255.0.0.0 |  host  |         .         |",
            "Generating public/private rsa key pair.",
            f"Cloud-init v. 22.4.2 running 'modules:config' at {stamp}. Up 6.50 seconds.",
            f"<14>{sl} cloud-init: #############################################################",
            f"<14>{sl} cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----",
            *[f"<14>{sl} cloud-init: {fp}" for fp in fps],
            f"<14>{sl} cloud-init: -----END SSH HOST KEY FINGERPRINTS-----",
            f"<14>{sl} cloud-init: #############################################################",
        ]
        text = "\n".join(lines) + "\n"
        text += "-----BEGIN SSH HOST KEY KEYS-----\n" + "\n".join(keys) + "\n-----END SSH HOST KEY KEYS-----\n"
        text += (
            f"Cloud-init v. 22.4.2 running 'modules:final' at {stamp}. Up 8.00 seconds.\n"
            f"Cloud-init v. 22.4.2 finished at {stamp}. Datasource DataSourceOpenStackLocal "
            f"[net,ver=2].  Up 8.10 seconds\n\n"
            f"Debian GNU/Linux 12 {hn} ttyS0\n\n{hn} login: \n"
        )
        return text

    # ------------------------------------------------------------ upper-layer files

    def _upper_dir(self, upper: Path, path: str, *, opaque: bool = False, mode: int | None = None) -> Path:
        """mkdir -p ``path`` in the upper layer, copying modes/owners of the lower (host) dirs.

        Refuses to shadow a host symlink (``/sbin`` -> ``usr/sbin``) with a directory.
        """
        cur_lower = Path("/")
        cur_upper = upper
        parts = Path(path).parts[1:]
        for part in parts:
            cur_lower = cur_lower / part
            cur_upper = cur_upper / part
            if cur_lower.is_symlink():
                raise VmError(f"refusing to shadow host symlink {cur_lower} in the VM")
            if not cur_upper.is_dir():
                cur_upper.mkdir()
                try:
                    st = cur_lower.stat()
                    os.chown(cur_upper, st.st_uid, st.st_gid)
                    os.chmod(cur_upper, st.st_mode & 0o7777)
                except FileNotFoundError:
                    os.chmod(cur_upper, 0o755)
        if mode is not None:
            os.chmod(cur_upper, mode)
        if opaque:
            os.setxattr(cur_upper, "trusted.overlay.opaque", b"y")
        return cur_upper

    @staticmethod
    def _write(path: Path, data: str | bytes, mode: int) -> None:
        if isinstance(data, str):
            data = data.encode()
        tmp = path.with_name(f".{path.name}.vmpool-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
            os.fchown(fd, 0, 0)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _hidden_dirs(self) -> list[str]:
        out: list[str] = []
        for p in (*HIDDEN_DIRS, CHECKOUT_DIR, str(self.base_dir)):
            if any(p == h or p.startswith(h.rstrip("/") + "/") for h in (*out, *VOLATILE_DIRS)):
                continue
            out.append(p)
        return out

    def _write_boot_files(self, vm_id: str, address: str, port: int, authorized_keys: str) -> None:
        d = self._dir(vm_id)
        upper = d / "upper"
        hn = self.hostname_for(vm_id)
        for h in self._hidden_dirs():
            self._upper_dir(upper, h, opaque=True, mode=0o700 if h == "/root" else None)
        ssh_dir = self._upper_dir(upper, "/root/.ssh", mode=0o700)
        ak = ssh_dir / "authorized_keys"
        if authorized_keys or not ak.exists():
            text = authorized_keys if not authorized_keys or authorized_keys.endswith("\n") else authorized_keys + "\n"
            self._write(ak, text, 0o600)
        etc_ssh = self._upper_dir(upper, "/etc/ssh")
        for t in KEY_TYPES:
            src = d / "keys" / f"ssh_host_{t}_key"
            self._write(etc_ssh / src.name, src.read_bytes(), 0o600)
            self._write(etc_ssh / (src.name + ".pub"), (d / "keys" / (src.name + ".pub")).read_bytes(), 0o644)
        self._write(etc_ssh / "sshd_config", _SSHD_CONFIG.format(address=address, port=port) + self.sshd_options, 0o644)
        etc = self._upper_dir(upper, "/etc")
        self._write(etc / "hostname", hn + "\n", 0o644)
        hosts = Path("/etc/hosts").read_text() if not (etc / "hosts").exists() else (etc / "hosts").read_text()
        hosts = "".join(ln for ln in hosts.splitlines(True) if not ln.rstrip().endswith("# vmpool-vm"))
        self._write(etc / "hosts", hosts + f"{address}\t{hn}\t# vmpool-vm\n", 0o644)
        self._write(self._upper_dir(upper, str(Path(INIT_PATH).parent)) / Path(INIT_PATH).name, _INIT_SCRIPT, 0o755)

    # ------------------------------------------------------------ start / stop

    def start(
        self, vm_id: str, address: str, authorized_keys: str = "", port: int = 22, *, timeout: float = 20.0
    ) -> None:
        """Boot the VM; return once its sshd accepts TCP on address:port.

        ``authorized_keys`` (if non-empty) replaces the VM's /root/.ssh/authorized_keys;
        if empty, an existing file (from an earlier boot) is kept.

        Starting a VM that is already running is idempotent when address and port are
        the same (nothing happens, authorized_keys is not rewritten) and raises
        :class:`VmError` otherwise.  A VM held by another process (its lock file is
        locked) is refused with :class:`VmError`.
        """
        _check_loopback(address)
        port = int(port)
        d = self._dir(vm_id)
        with self._vm_lock(vm_id):
            vm = self._vms.get(vm_id)
            if vm is not None:
                if self._is_running(vm):
                    if (vm.address, vm.port) == (address, port):
                        return
                    raise VmError(f"VM {vm_id} is already running on {vm.address}:{vm.port}")
                self._teardown(vm)
            with self._lock:
                for other in self._vms.values():
                    if other.vm_id != vm_id and (other.address, other.port) == (address, port):
                        raise VmError(f"{address}:{port} is used by VM {other.vm_id}")
            self.prepare(vm_id)
            lock_fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                raise VmError(f"VM {vm_id} is already running (its lock {d / 'lock'} is held)") from None
            vm = None
            try:
                _remove_drop_rules(lambda c: c == self._comment(vm_id))
                if _connect(address, port, 0.3) == "ok":
                    raise VmError(f"something already listens on {address}:{port}")
                self._write_boot_files(vm_id, address, port, authorized_keys)
                self._write(d / "boot.sh", _BOOT_SCRIPT, 0o644)
                log = d / "sshd.log"
                with open(log, "ab") as f:
                    f.write(f"--- vmpool: booting {vm_id} on {address}:{port} at {time.ctime()}\n".encode())
                    offset = f.tell()
                proc = self._on_thread(lambda: self._spawn(d, self.hostname_for(vm_id), lock_fd))
                vm = _Vm(vm_id=vm_id, dir=d, address=address, port=port, proc=proc, lock_fd=lock_fd, log_offset=offset)
                with self._lock:
                    self._vms[vm_id] = vm
                self._wait_ready(vm, timeout)
                (d / "state.json").write_text(
                    json.dumps(
                        {
                            "vm_id": vm_id,
                            "address": address,
                            "port": port,
                            "supervisor_pid": os.getpid(),
                            "unshare_pid": proc.pid,
                            "init_pid": vm.init_pid,
                            "init_starttime": (_proc_stat(vm.init_pid) or ("", 0, 0))[2],
                            "comment": self._comment(vm_id),
                        }
                    )
                )
            except BaseException:
                if vm is not None:
                    with self._lock:
                        self._vms.pop(vm_id, None)
                    self._teardown(vm)
                else:
                    os.close(lock_fd)
                raise

    def _spawn(self, d: Path, hostname: str, lock_fd: int) -> subprocess.Popen:
        # Runs on the supervisor thread: the pdeathsig of setpriv/unshare is tied to it.
        with open(d / "sshd.log", "ab") as log:
            return subprocess.Popen(
                [
                    "setpriv",
                    "--pdeathsig",
                    "KILL",
                    "--",
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--uts",
                    "--ipc",
                    "--",
                    "/bin/sh",
                    str(d / "boot.sh"),
                    str(d),
                    hostname,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=VM_ENV,
                cwd="/",
                start_new_session=True,
                pass_fds=(lock_fd,),
            )

    def _log_since(self, vm: _Vm) -> str:
        try:
            with open(vm.dir / "sshd.log", "rb") as f:
                f.seek(vm.log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_ready(self, vm: _Vm, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        want = f"Server listening on {vm.address} port {vm.port}."
        while True:
            if vm.proc.poll() is not None:
                raise VmError(
                    f"VM {vm.vm_id} died while booting (exit {vm.proc.returncode}):\n{self._log_since(vm)[-3000:]}"
                )
            if vm.init_pid is None:
                kids = _children(vm.proc.pid)
                if kids:
                    vm.init_pid = kids[0]
            log = self._log_since(vm)
            if "Cannot bind any address" in log:
                raise VmError(f"sshd of VM {vm.vm_id} failed:\n{log[-3000:]}")
            if vm.init_pid and want in log and _connect(vm.address, vm.port, 0.5) == "ok":
                return
            if time.monotonic() > deadline:
                raise VmError(f"VM {vm.vm_id} not accepting on {vm.address}:{vm.port} after {timeout}s:\n{log[-3000:]}")
            time.sleep(0.01)

    def _teardown(self, vm: _Vm) -> None:
        """Kill the VM's namespace, wait for unshare, release the lock, remove fault rules."""
        proc = vm.proc
        if proc.poll() is None:
            init = vm.init_pid or next(iter(_children(proc.pid)), None)
            st = _proc_stat(init) if init else None
            if init and st is not None and st[1] == proc.pid:
                try:
                    os.kill(init, signal.SIGKILL)  # the kernel then kills the whole PID namespace
                except ProcessLookupError:
                    pass
            else:  # still booting (no pid 1 yet): unshare --kill-child takes the child with it
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if vm.lock_fd >= 0:
            os.close(vm.lock_fd)
            vm.lock_fd = -1
        _remove_drop_rules(lambda c: c == self._comment(vm.vm_id))
        try:
            (vm.dir / "state.json").unlink()
        except FileNotFoundError:
            pass

    def stop(self, vm_id: str) -> None:
        """SIGKILL the VM's pid 1 (all its processes and mounts go with it) and wait. Idempotent."""
        with self._vm_lock(vm_id):
            with self._lock:
                vm = self._vms.pop(vm_id, None)
            if vm is not None:
                self._teardown(vm)
            else:
                _remove_drop_rules(lambda c: c == self._comment(vm_id))

    def destroy(self, vm_id: str) -> None:
        """stop() and remove the VM's directory (keys, upper layer, logs)."""
        with self._vm_lock(vm_id):
            self.stop(vm_id)
            shutil.rmtree(self._dir(vm_id), ignore_errors=True)

    def stop_all(self) -> None:
        """Stop every VM of this supervisor and remove all its iptables rules (also stale ones)."""
        for vm_id in list(self._vms):
            try:
                self.stop(vm_id)
            except Exception:
                pass
        prefix = f"vmpool-vm:{self._tag}:"
        _remove_drop_rules(lambda c: c.startswith(prefix))

    # ------------------------------------------------------------ state

    def _is_running(self, vm: _Vm) -> bool:
        if vm.proc.poll() is not None or not vm.init_pid:
            return False
        st = _proc_stat(vm.init_pid)
        return st is not None and st[0] not in ("Z", "X", "x") and st[1] == vm.proc.pid

    def is_running(self, vm_id: str) -> bool:
        vm = self._vms.get(vm_id)
        return vm is not None and self._is_running(vm)

    def _running(self, vm_id: str) -> _Vm:
        vm = self._vms.get(vm_id)
        if vm is None or not self._is_running(vm):
            raise VmError(f"VM {vm_id} is not running")
        return vm

    def list(self) -> builtins.list[str]:
        """Ids of all VMs that have a directory under base_dir (running or not)."""
        return sorted(
            p.name for p in self.base_dir.iterdir() if p.is_dir() and _VM_ID_RE.match(p.name) and (p / "keys").is_dir()
        )

    def running(self) -> builtins.list[str]:
        """Ids of the VMs this supervisor is running."""
        return sorted(v for v in list(self._vms) if self.is_running(v))

    def init_pid(self, vm_id: str) -> int:
        """Host pid of the VM's pid 1."""
        return self._running(vm_id).init_pid  # type: ignore[return-value]

    def pidns(self, vm_id: str) -> str:
        """The VM's PID namespace (readlink of /proc/PID/ns/pid), e.g. to find its processes."""
        ns = _pidns(self.init_pid(vm_id))
        if ns is None:
            raise VmError(f"VM {vm_id} is not running")
        return ns

    def address(self, vm_id: str) -> tuple[str, int]:
        vm = self._running(vm_id)
        return vm.address, vm.port

    # ------------------------------------------------------------ faults

    def _sshd_host_pid(self, vm: _Vm) -> int | None:
        """Host pid of the VM's sshd listener, or None if it is not running."""
        try:
            nspid = int(Path(f"/proc/{vm.init_pid}/root{SSHD_PIDFILE}").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        for child in _children(vm.init_pid):
            ns = _nspid(child)
            if ns and ns[-1] == nspid and _alive(child):
                return child
        return None

    def _wait(self, cond, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise VmError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def fault(self, vm_id: str) -> str:
        return self._running(vm_id).fault

    def set_fault(self, vm_id: str, mode: str) -> None:
        """Put the VM in fault ``mode``; every call first undoes any previous fault.

        - ``ok``: normal (sshd running, no drop rule, not stopped); waits until TCP accepts.
        - ``refuse``: sshd listener stopped -> connect() is refused.  (Existing sessions live on.)
        - ``hang``: listener SIGSTOPped -> TCP connects (kernel backlog) but no SSH banner.
        - ``drop``: iptables INPUT DROP for address:port (unique comment per VM) -> connect() hangs.
        """
        if mode not in FAULT_MODES:
            raise ValueError(f"fault mode must be one of {FAULT_MODES}, got {mode!r}")
        with self._vm_lock(vm_id):
            vm = self._running(vm_id)
            comment = self._comment(vm_id)
            _remove_drop_rules(lambda c: c == comment)
            sshd = self._sshd_host_pid(vm)
            if sshd is not None and (_proc_stat(sshd) or ("",))[0] == "T":
                os.kill(sshd, signal.SIGCONT)
            init = vm.init_pid
            assert init is not None
            if mode == "refuse":
                if sshd is not None:
                    os.kill(init, signal.SIGUSR1)
                self._wait(
                    lambda: _connect(vm.address, vm.port, 1.0) == "refused",
                    f"{vm.address}:{vm.port} to refuse connections",
                )
            else:
                if sshd is None:
                    vm.log_offset = os.path.getsize(vm.dir / "sshd.log")
                    os.kill(init, signal.SIGUSR2)
                    self._wait(lambda: self._sshd_host_pid(vm) is not None, "sshd to restart")
                    self._wait_ready(vm, 10.0)
                    sshd = self._sshd_host_pid(vm)
                    if sshd is None:
                        raise VmError(f"sshd of VM {vm_id} died right after its restart:\n{self._log_since(vm)}")
                if mode == "hang":
                    os.kill(sshd, signal.SIGSTOP)
                    self._wait(lambda: (_proc_stat(sshd) or ("",))[0] == "T", "sshd to stop")
                elif mode == "drop":
                    _iptables("-A", "INPUT", *_drop_rule(vm.address, vm.port, comment))
                else:
                    self._wait(lambda: _connect(vm.address, vm.port, 1.0) == "ok", f"{vm.address}:{vm.port} to accept")
            vm.fault = mode

    # ------------------------------------------------------------ exec

    def exec(
        self, vm_id: str, argv: builtins.list[str], input: bytes | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        """Run argv inside the VM (nsenter into its mount/pid/uts/ipc namespaces, root in the VM).

        Returns a CompletedProcess with bytes stdout/stderr; does not raise on a non-zero exit.
        On timeout the whole process group (inside the VM too) is killed and TimeoutExpired raised.
        """
        vm = self._running(vm_id)
        assert vm.init_pid is not None
        cmd = nsenter_argv(vm.init_pid, argv)
        p = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=VM_ENV,
            start_new_session=True,
        )
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.communicate()
            raise
        return subprocess.CompletedProcess(list(argv), p.returncode, out, err)


# ---------------------------------------------------------------- CLI


def _stop_from_state(vm_dir: Path) -> bool:
    """Stop a VM started by another process, using its state.json. True if something was killed."""
    try:
        state = json.loads((vm_dir / "state.json").read_text())
    except FileNotFoundError:
        return False
    killed = False
    pid = state.get("init_pid")
    st = _proc_stat(pid) if pid else None
    if st is not None and st[2] == state.get("init_starttime") and st[1] == state.get("unshare_pid"):
        os.kill(pid, signal.SIGKILL)
        killed = True
        deadline = time.monotonic() + 10
        while (_proc_stat(state["unshare_pid"]) or ("Z",))[0] not in "ZX":
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
    comment = state.get("comment")
    if comment:
        _remove_drop_rules(lambda c: c == comment)
    return killed


def main(argv: builtins.list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cloud.vms", description="vmpool stand-in VMs (manual use)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="boot a VM and hold it in the foreground (Ctrl-C stops it)")
    s.add_argument("base_dir")
    s.add_argument("vm_id")
    s.add_argument("address")
    s.add_argument("--port", type=int, default=22)
    s.add_argument("--authorized-keys", metavar="FILE")
    s.add_argument("--fault", choices=FAULT_MODES, default="ok")
    for name, hlp in (
        ("stop", "stop a VM held by another `start`"),
        ("console", "print the console log"),
        ("destroy", "stop a VM and remove its dir"),
    ):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("base_dir")
        p.add_argument("vm_id")
    e = sub.add_parser("exec", help="run a command in a running VM (held by another `start`)")
    e.add_argument("base_dir")
    e.add_argument("vm_id")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)

    if a.cmd == "start":
        sup = VmSupervisor(a.base_dir)
        keys = Path(a.authorized_keys).read_text() if a.authorized_keys else ""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
        try:
            sup.start(a.vm_id, a.address, keys, port=a.port)
            if a.fault != "ok":
                sup.set_fault(a.vm_id, a.fault)
            vm = sup._vms[a.vm_id]
            print(
                json.dumps(
                    {
                        "vm_id": a.vm_id,
                        "address": a.address,
                        "port": a.port,
                        "pid": os.getpid(),
                        "unshare_pid": vm.proc.pid,
                        "init_pid": vm.init_pid,
                        "pidns": sup.pidns(a.vm_id),
                        "host_keys": sup.prepare(a.vm_id),
                        "log": str(sup.log_path(a.vm_id)),
                    }
                ),
                flush=True,
            )
            while not stop.wait(0.5):
                if not sup.is_running(a.vm_id):
                    print(f"VM {a.vm_id} is gone", file=sys.stderr)
                    return 1
            return 0
        finally:
            sup.close()
    if a.cmd == "stop":
        _stop_from_state(Path(a.base_dir).resolve() / a.vm_id)
        return 0
    if a.cmd == "destroy":
        d = Path(a.base_dir).resolve() / a.vm_id
        _stop_from_state(d)
        shutil.rmtree(d, ignore_errors=True)
        return 0
    if a.cmd == "console":
        sup = VmSupervisor(a.base_dir)
        sys.stdout.write(sup.console_text(a.vm_id))
        sup.close()
        return 0
    if a.cmd == "exec":
        state = json.loads((Path(a.base_dir).resolve() / a.vm_id / "state.json").read_text())
        argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
        return subprocess.call(
            nsenter_argv(state["init_pid"], argv or ["/bin/bash", "-l"]),
            env=VM_ENV,
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())
