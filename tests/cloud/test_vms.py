"""Tests of the stand-in VM supervisor (tests/cloud/vms.py).

Needs root (namespaces, overlayfs, iptables).  Every VM listens on 127.0.5.x only.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import paramiko
import pytest

from tests.cloud.vms import VmError, VmSupervisor, pids_in_pidns
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[2]

# one worker: the addresses 127.0.5.x are counted here, not leased as the bed leases its VMs'
pytestmark = [
    pytest.mark.xdist_group("vms-127.0.5"),
    pytest.mark.skipif(os.geteuid() != 0, reason="stand-in VMs need root"),
]

_addresses = itertools.count(10)


def next_address() -> str:
    return f"127.0.5.{next(_addresses)}"


def read_banner(address: str, port: int = 22, timeout: float = 3.0) -> bytes:
    with socket.create_connection((address, port), timeout=timeout) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        return data


def proc_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def mounts_mentioning(path: str) -> list[str]:
    hits = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/mountinfo").read_text()
        except OSError:  # gone, or a zombie (EINVAL)
            continue
        hits += [f"{name}: {line}" for line in text.splitlines() if path in line]
    return hits


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vms")


@pytest.fixture(scope="module")
def sup(base_dir):
    s = VmSupervisor(base_dir)
    try:
        yield s
    finally:
        s.close()  # stop_all() + end the supervisor thread
        out = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True, text=True).stdout
        assert "vmpool-vm:" + s._tag not in out


@pytest.fixture(scope="module")
def client_key(tmp_path_factory):
    d = tmp_path_factory.mktemp("clientkey")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(d / "id")), (d / "id.pub").read_text(), d / "id"


@pytest.fixture
def new_vm(sup, client_key):
    """Factory: boot a fresh VM with client_key authorized; all are destroyed after the test."""
    started = []

    def boot(authorized: bool = True):
        vm_id = f"t-{uuid.uuid4().hex[:8]}"
        address = next_address()
        started.append(vm_id)
        sup.start(vm_id, address, client_key[1] if authorized else "")
        return vm_id, address

    yield boot
    for vm_id in started:
        sup.destroy(vm_id)


@pytest.fixture(scope="module")
def vm_a(sup, client_key):
    address = next_address()
    sup.start("vm-a", address, client_key[1])
    yield "vm-a", address
    sup.destroy("vm-a")


@pytest.fixture(scope="module")
def vm_b(sup, client_key):
    address = next_address()
    sup.start("vm-b", address, client_key[1])
    yield "vm-b", address
    sup.destroy("vm-b")


def ssh(address, host_key_lines, pkey, username="root", timeout=5.0) -> paramiko.SSHClient:
    """paramiko client with the given host keys pinned (RejectPolicy for anything else)."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    known = client.get_host_keys()
    for line in host_key_lines:
        keytype, b64 = line.split()[:2]
        known.add(address, keytype, paramiko.PKey.from_type_string(keytype, base64.b64decode(b64)))
    try:
        client.connect(
            address,
            username=username,
            pkey=pkey,
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
    except BaseException:
        client.close()  # a refused login must not leave the VM's sshd waiting on an open socket
        raise
    return client


def run(client: paramiko.SSHClient, command: str) -> tuple[int, str]:
    _, stdout, _ = client.exec_command(command, timeout=10)
    out = stdout.read().decode()
    return stdout.channel.recv_exit_status(), out


# ---------------------------------------------------------------- tests


def test_prepare_is_idempotent_and_console_has_cloud_init_block(sup):
    keys = sup.prepare("vm-console")
    assert [k.split()[0] for k in keys] == ["ecdsa-sha2-nistp256", "ssh-ed25519", "ssh-rsa"]
    assert sup.prepare("vm-console") == keys
    text = sup.console_text("vm-console")
    block = "-----BEGIN SSH HOST KEY KEYS-----\n" + "\n".join(keys) + "\n-----END SSH HOST KEY KEYS-----\n"
    assert block in text
    before, after = text.split(block)
    assert "Cloud-init" in before and "Cloud-init" in after
    assert "vm-console" in sup.list()
    sup.destroy("vm-console")
    assert "vm-console" not in sup.list()


def test_root_ssh_with_pinned_host_key(sup, vm_a, vm_b, client_key):
    vm_id, address = vm_a
    with ssh(address, sup.prepare(vm_id), client_key[0]) as c:
        assert run(c, "hostname") == (0, sup.hostname_for(vm_id) + "\n")
        assert run(c, "true") == (0, "")
        assert run(c, "id -u") == (0, "0\n")
    # the pin is real: VM b's host keys do not match VM a
    with pytest.raises(paramiko.BadHostKeyException):
        ssh(address, sup.prepare(vm_b[0]), client_key[0]).close()


def test_openssh_cli_logs_in_with_known_hosts(sup, vm_a, client_key, tmp_path):
    vm_id, address = vm_a
    kh = tmp_path / "known_hosts"
    kh.write_text("".join(f"{address} {line}\n" for line in sup.prepare(vm_id)))
    p = subprocess.run(
        [
            "/usr/bin/ssh",
            "-i",
            str(client_key[2]),
            "-o",
            f"UserKnownHostsFile={kh}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-F",
            "/dev/null",
            f"root@{address}",
            "cat /etc/hostname",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == sup.hostname_for(vm_id) + "\n"


def test_useradd_in_vm_stays_in_vm_and_user_can_log_in(sup, vm_a, vm_b, client_key):
    vm_id, address = vm_a
    user = "alice"
    r = sup.exec(vm_id, ["useradd", "-m", "-p", "*", "-s", "/bin/sh", user])
    assert r.returncode == 0, r.stderr
    assert sup.exec(vm_id, ["getent", "passwd", user]).stdout.startswith(b"alice:")
    assert "\nalice:" not in "\n" + Path("/etc/passwd").read_text()
    assert sup.exec(vm_b[0], ["getent", "passwd", user]).returncode == 2  # not in the other VM
    assert not Path("/home/alice").exists()
    setup = (
        f"mkdir -p ~{user}/.ssh && cat > ~{user}/.ssh/authorized_keys && chmod 700 ~{user}/.ssh && "
        f"chmod 600 ~{user}/.ssh/authorized_keys && chown -R {user}: ~{user}/.ssh"
    )
    r = sup.exec(vm_id, ["sh", "-c", setup], input=client_key[1].encode())
    assert r.returncode == 0, r.stderr
    with ssh(address, sup.prepare(vm_id), client_key[0], username=user) as c:
        assert run(c, "id -un; echo $HOME") == (0, "alice\n/home/alice\n")


def test_locked_account_is_refused(sup, vm_a, client_key):
    """UsePAM no: a '!' password field (useradd's default) means no key login either."""
    vm_id, address = vm_a
    assert sup.exec(vm_id, ["useradd", "-m", "-s", "/bin/sh", "bob"]).returncode == 0
    assert sup.exec(vm_id, ["getent", "shadow", "bob"]).stdout.split(b":")[1].startswith(b"!")
    r = sup.exec(
        vm_id,
        ["sh", "-c", "mkdir -m 700 ~bob/.ssh && cat > ~bob/.ssh/authorized_keys && chown -R bob: ~bob/.ssh"],
        input=client_key[1].encode(),
    )
    assert r.returncode == 0, r.stderr
    with pytest.raises(paramiko.AuthenticationException):
        ssh(address, sup.prepare(vm_id), client_key[0], username="bob").close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_ps_in_vm_shows_only_vm_processes(sup, vm_a):
    ns = sup.pidns(vm_a[0])

    def settled() -> bool:  # sshd children of earlier tests' sessions take a moment to exit
        cmds = [_cmdline(p) for p in pids_in_pidns(ns)]
        return not any(c == "" or (c.startswith("sshd:") and "[listener]" not in c) for c in cmds)

    wait_until(settled, 10, "vm-a to have no SSH session left (nor zombie)")
    host_view = pids_in_pidns(ns)
    r = sup.exec(vm_a[0], ["ps", "-eo", "pid=,ppid=,args="])
    assert r.returncode == 0, r.stderr
    rows = [line.split(None, 2) for line in r.stdout.decode().splitlines()]
    by_pid = {int(pid): args for pid, _, args in rows}
    assert by_pid[1].endswith("vmpool-init")
    assert any("sshd" in args and "[listener]" in args for args in by_pid.values())
    assert not any("pytest" in args or "python" in args for args in by_pid.values())
    # Exactly the namespace's processes as the host sees them, plus the ps itself.
    assert len(rows) == len(host_view) + 1
    assert [args for args in by_pid.values() if args.startswith("ps ")] == ["ps -eo pid=,ppid=,args="]


def test_orphans_are_reaped_by_vm_init(sup, vm_a):
    r = sup.exec(vm_a[0], ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"])
    pid = r.stdout.decode().strip()
    ppid = sup.exec(vm_a[0], ["ps", "-o", "ppid=", "-p", pid]).stdout.decode().strip()
    assert ppid == "1"  # reparented to the VM's init, as on a real VM
    assert sup.exec(vm_a[0], ["kill", pid]).returncode == 0
    wait_until(
        lambda: sup.exec(vm_a[0], ["ps", "-o", "stat=", "-p", pid]).returncode == 1,
        5,
        "killed orphan to be reaped (no zombie)",
    )


def test_tmp_root_and_repo_are_not_shared_with_host(sup, vm_a, vm_b, base_dir):
    name = f"vmfile-{uuid.uuid4().hex}"
    assert sup.exec(vm_a[0], ["sh", "-c", f"echo hello > /tmp/{name}"]).returncode == 0
    assert sup.exec(vm_a[0], ["cat", f"/tmp/{name}"]).stdout == b"hello\n"
    assert not Path("/tmp", name).exists()
    assert name.encode() not in sup.exec(vm_b[0], ["ls", "-A", "/tmp"]).stdout
    host_file = Path("/tmp", f"hostfile-{uuid.uuid4().hex}")
    host_file.write_text("host")
    try:
        assert sup.exec(vm_a[0], ["test", "-e", str(host_file)]).returncode == 1
    finally:
        host_file.unlink()
    assert sup.exec(vm_a[0], ["ls", "-A", "/root"]).stdout == b".ssh\n"
    assert sup.exec(vm_a[0], ["ls", "-A", "/work"]).stdout == b""
    assert sup.exec(vm_a[0], ["test", "-e", str(base_dir)]).returncode == 1
    assert sup.exec(vm_a[0], ["test", "-e", str(REPO / "tests" / "cloud" / "vms.py")]).returncode == 1


def _assert_healthy(sup, vm, client_key):
    with ssh(vm[1], sup.prepare(vm[0]), client_key[0]) as c:
        assert run(c, "true") == (0, "")


def test_fault_refuse_then_ok(sup, new_vm, vm_b, client_key):
    vm = new_vm()
    sup.set_fault(vm[0], "refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((vm[1], 22), timeout=2).close()
    assert read_banner(vm_b[1]).startswith(b"SSH-2.0-")  # no leak to other VMs
    assert sup.is_running(vm[0])
    sup.set_fault(vm[0], "ok")
    _assert_healthy(sup, vm, client_key)


def test_fault_hang_then_ok(sup, new_vm, vm_b, client_key):
    vm = new_vm()
    sup.set_fault(vm[0], "hang")
    with socket.create_connection((vm[1], 22), timeout=2) as s:  # TCP connect works ...
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):  # ... but no SSH banner comes
            s.recv(100)
    transport = paramiko.Transport(socket.create_connection((vm[1], 22), timeout=2))
    transport.banner_timeout = 1.0
    try:
        with pytest.raises(paramiko.SSHException, match="banner"):
            transport.start_client(timeout=5)
    finally:
        transport.close()
    assert read_banner(vm_b[1]).startswith(b"SSH-2.0-")
    sup.set_fault(vm[0], "ok")
    _assert_healthy(sup, vm, client_key)
    # a hung (SIGSTOPped) VM can still be stopped
    sup.set_fault(vm[0], "hang")
    ns = sup.pidns(vm[0])
    sup.stop(vm[0])
    assert pids_in_pidns(ns) == []


def test_fault_drop_then_ok(sup, new_vm, vm_b, client_key):
    vm = new_vm()
    sup.set_fault(vm[0], "drop")
    with pytest.raises(TimeoutError):
        socket.create_connection((vm[1], 22), timeout=1.0).close()
    assert read_banner(vm_b[1]).startswith(b"SSH-2.0-")
    sup.set_fault(vm[0], "ok")
    _assert_healthy(sup, vm, client_key)
    # a drop rule left in place is removed by stop()
    sup.set_fault(vm[0], "drop")
    sup.stop(vm[0])
    out = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True, text=True, check=True).stdout
    assert sup._comment(vm[0]) not in out


def test_faults_can_switch_directly(sup, new_vm, client_key):
    vm = new_vm()
    for mode, symptom in (
        ("hang", "banner-timeout"),
        ("refuse", "refused"),
        ("drop", "timeout"),
        ("hang", "banner-timeout"),
        ("ok", "banner"),
    ):
        sup.set_fault(vm[0], mode)
        # a healthy sshd forks and re-executes itself before its banner: give it time under load
        patience = 5.0 if mode == "ok" else 1.0
        try:
            s = socket.create_connection((vm[1], 22), timeout=1.0)
        except ConnectionRefusedError:
            got = "refused"
        except TimeoutError:
            got = "timeout"
        else:
            with s:
                s.settimeout(patience)
                try:
                    got = "banner" if s.recv(100).startswith(b"SSH-2.0-") else "garbage"
                except TimeoutError:
                    got = "banner-timeout"
        assert got == symptom, mode
    _assert_healthy(sup, vm, client_key)


def test_stop_leaves_no_process_and_no_mount(sup, new_vm, base_dir):
    vm_id, address = new_vm()
    ns = sup.pidns(vm_id)
    init = sup.init_pid(vm_id)
    unshare = sup._vms[vm_id].proc.pid
    assert len(pids_in_pidns(ns)) >= 3
    assert mounts_mentioning(str(base_dir / vm_id))  # the overlay exists while running
    sup.stop(vm_id)
    assert not sup.is_running(vm_id)
    assert pids_in_pidns(ns) == []
    assert not proc_alive(init) and not proc_alive(unshare)
    assert mounts_mentioning(str(base_dir / vm_id)) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, 22), timeout=2).close()
    sup.stop(vm_id)  # idempotent


def test_start_twice_is_idempotent_and_reboot_keeps_disk(sup, new_vm, base_dir, client_key):
    vm_id, address = new_vm()
    init = sup.init_pid(vm_id)
    sup.start(vm_id, address)  # same address/port: no-op
    assert sup.init_pid(vm_id) == init
    with pytest.raises(VmError):
        sup.start(vm_id, next_address())  # different address while running: refused
    # a second supervisor (e.g. another process) cannot start the same VM: its lock is held
    other = VmSupervisor(base_dir)
    try:
        with pytest.raises(VmError, match="lock"):
            other.start(vm_id, next_address())
    finally:
        other.close()
    assert sup.is_running(vm_id) and sup.init_pid(vm_id) == init
    # stop + start again: the upper layer (the VM's disk) persists
    assert sup.exec(vm_id, ["sh", "-c", "echo persisted > /etc/vmpool-marker"]).returncode == 0
    sup.stop(vm_id)
    sup.start(vm_id, address)
    assert sup.exec(vm_id, ["cat", "/etc/vmpool-marker"]).stdout == b"persisted\n"
    assert not Path("/etc/vmpool-marker").exists()
    _assert_healthy(sup, (vm_id, address), client_key)  # authorized_keys kept when start() gets ""


def test_start_from_other_threads(sup, new_vm, client_key):
    import threading

    results = []
    threads = [threading.Thread(target=lambda: results.append(new_vm())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3
    for vm in results:
        assert read_banner(vm[1]).startswith(b"SSH-2.0-")
    # those threads are gone, yet their VMs live on (forks happen on the supervisor thread)
    assert all(sup.is_running(vm[0]) for vm in results)


def test_kill_9_of_supervisor_process_leaves_no_vm_behind(base_dir, client_key, tmp_path):
    address = next_address()
    ak = tmp_path / "ak"
    ak.write_text(client_key[1])
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.cloud.vms",
            "start",
            str(base_dir),
            "vm-k9",
            address,
            "--authorized-keys",
            str(ak),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        info = json.loads(line)
        assert read_banner(address).startswith(b"SSH-2.0-")
        assert pids_in_pidns(info["pidns"])
        os.kill(p.pid, signal.SIGKILL)
        p.wait(5)
        wait_until(lambda: not pids_in_pidns(info["pidns"]), 5, "VM processes to die")
        wait_until(lambda: not proc_alive(info["unshare_pid"]), 5, "unshare to die")
        wait_until(lambda: not mounts_mentioning(str(base_dir / "vm-k9")), 5, "VM mounts to go")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, 22), timeout=2).close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        subprocess.run([sys.executable, "-m", "tests.cloud.vms", "destroy", str(base_dir), "vm-k9"], cwd=REPO)


def test_rejects_non_loopback_address(sup):
    with pytest.raises(VmError):
        sup.start("vm-bad", "10.0.0.1")
