"""Tests of the local cloud test bed itself: real Keystone + Nova over HTTP, sshd VMs, the proxy.

Everything goes through the real python-novaclient + keystoneauth1 (as vmpool does), and the
servers are reached with real SSH (paramiko).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paramiko
import pytest
from keystoneauth1 import exceptions as ks_exc
from novaclient import exceptions as nova_exc

from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(300)

SUBNET = ipaddress.ip_network("127.0.1.0/24")


@pytest.fixture(autouse=True)
def _clean_bed(bed: Any) -> Iterator[None]:
    """Each test leaves the (session) bed as it found it."""
    yield
    bed.clear_faults()
    bed.clear_behaviours()
    bed.set_quota(instances=100)
    bed.delete_all_servers()


@pytest.fixture
def nova(bed: Any) -> Any:
    return bed.nova()


def _name(tag: str) -> str:
    return f"bedtest-{tag}-{uuid.uuid4().hex[:6]}"


def _create(bed: Any, nova: Any, name: str, flavor: str | None = None) -> Any:
    return nova.servers.create(
        name,
        image=bed.info["image_id"],
        flavor=flavor or bed.info["flavor_id"],
        nics=[{"net-id": bed.info["network_id"]}],
        key_name=bed.info["key_name"],
    )


def _status(nova: Any, server_id: str) -> str:
    return nova.servers.get(server_id).status


def _address(server: Any) -> str:
    addrs = [a["addr"] for net in server.addresses.values() for a in net if a.get("version") == 4]
    assert len(addrs) == 1, server.addresses
    return addrs[0]


def _tcp(address: str, port: int = 22, timeout: float = 1.0) -> str:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return "ok"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "timeout"


def _console_host_keys(text: str) -> set[str]:
    start = text.index("-----BEGIN SSH HOST KEY KEYS-----")
    end = text.index("-----END SSH HOST KEY KEYS-----")
    lines = text[start:end].splitlines()[1:]
    return {" ".join(line.split()[:2]) for line in lines if line.strip()}


def _ssh(address: str, key_path: str) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        address,
        port=22,
        username="root",
        key_filename=key_path,
        timeout=5,
        banner_timeout=5,
        auth_timeout=5,
        look_for_keys=False,
        allow_agent=False,
    )
    return client


def test_server_lifecycle_build_active_ssh_delete(bed: Any, nova: Any) -> None:
    name = _name("life")
    bed.set_behaviour(r"^bedtest-life-", spawn_delay=2.0)
    t0 = time.monotonic()
    server = _create(bed, nova, name)
    assert _status(nova, server.id) == "BUILD"
    wait_until(lambda: _status(nova, server.id) == "ACTIVE", 60, "ACTIVE")
    server = nova.servers.get(server.id)
    address = _address(server)
    assert ipaddress.ip_address(address) in SUBNET
    assert server.key_name == bed.info["key_name"]

    wanted = _console_host_keys(server.get_console_output())
    assert len(wanted) == 3
    client = wait_until(lambda: _try_ssh(address, bed.info["ssh_private_key"]), 30, "SSH")
    ready = time.monotonic() - t0
    try:
        key = client.get_transport().get_remote_server_key()
        assert f"{key.get_name()} {key.get_base64()}" in wanted
        _, out, _ = client.exec_command("id -u; hostname; cat /root/.ssh/authorized_keys")
        lines = out.read().decode().splitlines()
        assert lines[0] == "0"
        assert lines[1] == server.id
        assert bed.info["ssh_public_key"].split()[1] in "\n".join(lines[2:])
    finally:
        client.close()
    assert ready < 30
    print(f"create -> SSH ready: {ready:.1f}s (incl. 2s spawn delay)")

    rc, out, _ = bed.vm_exec(server.id, ["cat", "/etc/hostname"])
    assert (rc, out.strip()) == (0, server.id)
    assert bed.vm_running(server.id)

    server.delete()
    wait_until(lambda: _gone(nova, server.id), 30, "server 404")
    with pytest.raises(nova_exc.NotFound):
        nova.servers.get(server.id)
    assert not bed.vm_running(server.id)
    assert server.id not in [v["id"] for v in bed.vms()]
    assert _tcp(address) == "refused"


def _try_ssh(address: str, key: str) -> paramiko.SSHClient | None:
    try:
        return _ssh(address, key)
    except (OSError, paramiko.SSHException):
        return None


def _gone(nova: Any, server_id: str) -> bool:
    try:
        nova.servers.get(server_id)
    except nova_exc.NotFound:
        return True
    return False


def test_application_credential_and_admin(bed: Any) -> None:
    app_nova = bed.nova(application_credential=True)
    assert bed.info["flavor_id"] in [f.id for f in app_nova.flavors.list()]
    server = _create(bed, app_nova, _name("appcred"))
    wait_until(lambda: _status(app_nova, server.id) == "ACTIVE", 60, "ACTIVE")
    # the admin sees it across projects and can delete it behind the user's back
    admin = bed.admin_nova()
    seen = admin.servers.list(search_opts={"all_tenants": 1})
    assert server.id in [s.id for s in seen]
    assert admin.servers.get(server.id).tenant_id == bed.info["project_id"]
    admin.servers.delete(server.id)
    wait_until(lambda: _gone(app_nova, server.id), 30, "server gone")


def test_flavor_too_big_and_spawn_error_end_in_error(bed: Any, nova: Any) -> None:
    big = _create(bed, nova, _name("big"), flavor=bed.info["flavor_too_big_id"])
    bed.set_behaviour(r"^bedtest-err-", error=True)
    err = _create(bed, nova, _name("err"))
    wait_until(lambda: _status(nova, big.id) == "ERROR", 60, "too-big ERROR")
    assert "No valid host" in nova.servers.get(big.id).fault["message"]
    wait_until(lambda: _status(nova, err.id) == "ERROR", 60, "spawn error ERROR")
    assert not bed.vm_running(err.id)


def test_sshd_delay_active_before_ssh(bed: Any, nova: Any) -> None:
    bed.set_behaviour(r"^bedtest-slow-", spawn_delay=0, sshd_delay=6)  # room for a slow ACTIVE poll
    server = _create(bed, nova, _name("slow"))
    wait_until(lambda: _status(nova, server.id) == "ACTIVE", 60, "ACTIVE")
    t_active = time.monotonic()
    address = _address(nova.servers.get(server.id))
    assert _tcp(address) == "refused"
    wait_until(lambda: _tcp(address) == "ok", 30, "sshd")
    assert time.monotonic() - t_active > 1.5


def test_vm_faults(bed: Any, nova: Any) -> None:
    server = _create(bed, nova, _name("fault"))
    wait_until(lambda: _status(nova, server.id) == "ACTIVE", 60, "ACTIVE")
    address = _address(nova.servers.get(server.id))
    wait_until(lambda: _tcp(address) == "ok", 30, "sshd")
    bed.vm_fault(server.id, "refuse")
    assert _tcp(address) == "refused"
    bed.vm_fault(server.id, "hang")
    with pytest.raises((OSError, paramiko.SSHException)):
        _ssh(address, bed.info["ssh_private_key"]).close()
    bed.vm_fault(server.id, "ok")
    client = _ssh(address, bed.info["ssh_private_key"])
    client.close()


def test_proxy_status_delay_reset_and_counts(bed: Any, nova: Any) -> None:
    nova.servers.list()  # authenticated, token cached
    bed.reset_counts()
    bed.add_fault("nova", "GET", r"/servers/detail$", "status", status=503, times=1)
    with pytest.raises(nova_exc.ClientException) as exc:
        nova.servers.list()
    assert exc.value.code == 503
    nova.servers.list()  # times=1: the rule is used up
    assert bed.faults() == []

    bed.add_fault("nova", "GET", r"/flavors/", "delay", delay=1.0)
    t0 = time.monotonic()
    nova.flavors.get(bed.info["flavor_id"])
    assert time.monotonic() - t0 >= 1.0
    bed.clear_faults()

    bed.add_fault("nova", "*", r"/os-keypairs", "reset", times=1)
    with pytest.raises(ks_exc.ConnectionError):
        nova.keypairs.list()
    assert [k.name for k in nova.keypairs.list()] == [bed.info["key_name"]]

    counts = bed.counts()
    assert counts["nova GET /v2.1/servers/detail"] == 2
    assert counts["nova GET /v2.1/flavors/{id}"] == 1  # ids counted as {id}
    assert counts["nova GET /v2.1/os-keypairs"] == 2
    bed.reset_counts()
    assert bed.counts() == {}

    # keystone through the proxy too: a fresh session must authenticate
    bed.add_fault("keystone", "POST", r"/v3/auth/tokens$", "status", status=500, times=1)
    with pytest.raises(ks_exc.InternalServerError):
        bed.nova().servers.list()
    bed.nova().servers.list()
    assert bed.counts()["keystone POST /v3/auth/tokens"] == 2


def test_proxy_swallowed_delete_never_happens(bed: Any, nova: Any) -> None:
    server = _create(bed, nova, _name("swallow"))
    wait_until(lambda: _status(nova, server.id) == "ACTIVE", 60, "ACTIVE")
    bed.add_fault("nova", "DELETE", r"/servers/[^/]+$", "swallow")
    deletes = bed.counts().get("nova DELETE /v2.1/servers/{id}", 0)
    nova.servers.delete(server.id)  # 204, but never forwarded
    # nova marks a server task_state "deleting" before it answers a delete: had this one been
    # forwarded, the next GET would show that (or a 404)
    after = nova.servers.get(server.id)
    assert (after.status, getattr(after, "OS-EXT-STS:task_state")) == ("ACTIVE", None)
    assert bed.counts()["nova DELETE /v2.1/servers/{id}"] == deletes + 1  # it did reach the proxy
    bed.clear_faults()
    nova.servers.delete(server.id)
    wait_until(lambda: _gone(nova, server.id), 30, "server gone")


def test_quota_exceeded_is_403(bed: Any, nova: Any) -> None:
    bed.set_quota(instances=1)
    first = _create(bed, nova, _name("quota"))
    # (as in a real Nova, the API counts instances in the cell DB: a create racing the first one's
    # scheduling is let through and then fails the conductor's quota recheck -> ERROR, not 403)
    wait_until(lambda: _status(nova, first.id) == "ACTIVE", 60, "ACTIVE")
    with pytest.raises(nova_exc.Forbidden) as exc:
        _create(bed, nova, _name("quota"))
    assert exc.value.code == 403
    assert "Quota exceeded for instances" in str(exc.value)


def test_short_token_expiration_reauthenticates(tmp_path: Any) -> None:
    """A bed started with a short token lifetime: keystoneauth gets new tokens, nothing fails."""
    from tests.cloud.bed import Bed

    short = Bed.start(tmp_path / "bed", token_expiration=6)
    try:
        nova = short.nova()
        session = nova.client.session
        first = session.get_token()
        expires = session.auth.get_auth_ref(session).expires
        nova.flavors.list()
        wait_until(lambda: datetime.now(UTC) > expires, 30, "the first token to expire")
        nova.flavors.list()  # the expired token is replaced, not sent
        assert session.get_token() != first
        # keystoneauth treats a token with < 120 s left as expiring: below that lifetime every
        # request authenticates anew (flavors.list x2 + get_token x2 at least)
        assert short.counts()["keystone POST /v3/auth/tokens"] >= 2
        # vmpool itself: an acquire that waits for a boot longer than a token lives
        from tests.conftest import PoolHandle

        (tmp_path / "pool").mkdir()
        pool = PoolHandle(short, tmp_path / "pool", "tshort")
        short.set_behaviour("^tshort-", spawn_delay=8)
        started = time.monotonic()
        address = pool.run("acquire", "1", "--user", "u", "--timeout", "90").stdout.strip()
        assert time.monotonic() - started > 6 and address == pool.vms("busy")[0]["address"]
        # no cloud call failed on the way: an expired token would log "authentication failed" or
        # "HTTP 401" at WARNING/ERROR (a bare "401" also turns up in UUIDs and timestamps)
        log = Path(pool.settings["pool"]["log_file"]).read_text()
        assert "acquired by job 1" in log
        assert not re.search(r" vmpool\[\d+\] (WARNING|ERROR) |HTTP 401|authentication failed", log), log
    finally:
        short.stop()
    for p in short.procs.values():
        assert p.poll() is not None


@pytest.mark.parametrize("victim", ["nova", "bed"])
def test_kill_9_of_nova_or_of_the_whole_bed_leaves_nothing_behind(tmp_path: Any, victim: str) -> None:
    """VMs die with nova (their parent-death signal); nova, keystone and the proxy with the bed."""
    from tests.cloud.bed import Bed, leftovers

    run_dir = (tmp_path / "bed").resolve()
    up = subprocess.Popen(
        [sys.executable, "-m", "tests.cloud.bed", "up", "--foreground", str(run_dir)],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: (run_dir / "bed.json").exists() or up.poll() is not None, 300, "the bed up")
        assert up.poll() is None, "the bed did not start"
        bed = Bed(run_dir)
        bed.info = json.loads((run_dir / "bed.json").read_text())
        nova = bed.nova()
        server = _create(bed, nova, _name("k9"))
        wait_until(lambda: _status(nova, server.id) == "ACTIVE", 60, "ACTIVE")
        address = _address(nova.servers.get(server.id))
        wait_until(lambda: _tcp(address) == "ok", 30, "the VM's sshd")
        assert leftovers(run_dir, vms_only=True)
        if victim == "nova":
            os.kill(up.pid, signal.SIGSTOP)  # else the bed notices nova died and cleans up for it
            os.kill(int((run_dir / "nova.pid").read_text()), signal.SIGKILL)
            wait_until(lambda: not leftovers(run_dir, vms_only=True), 10, "the VM to die with nova")
            assert _tcp(address) == "refused"
            os.kill(up.pid, signal.SIGCONT)
            up.wait(60)  # it sees a child died and stops the rest
        else:
            os.kill(up.pid, signal.SIGKILL)
            up.wait(10)
            wait_until(lambda: not leftovers(run_dir), 30, "nothing left of the bed")
            assert _tcp(address) == "refused"
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGCONT)
            up.terminate()
            up.wait(60)
    assert leftovers(run_dir) == []
