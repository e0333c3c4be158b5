"""The CLI end to end over the real parts: novaclient + keystoneauth1 over HTTP against the bed's
Keystone and Nova API, fabric over SSH against sshd VMs, state on disk."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

import vmpool as vp
from tests.conftest import ROOT, VMPOOL, PoolHandle, wait_until


def ssh_as_root(pool: PoolHandle, address: str, command: str) -> subprocess.CompletedProcess[str]:
    """The way the hooks reach a VM: OpenSSH with vmpool's known_hosts, strict host key checking."""
    return subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            pool.key,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={pool.known_hosts}",
            "-o",
            "ConnectTimeout=5",
            f"root@{address}",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_reconcile_fills_the_pool_to_min_with_reachable_pinned_vms(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 2})
    pool.reconcile_until(lambda: len(pool.vms("free")) == 2, 90, "two Free VMs")
    servers = pool.servers()
    assert sorted(s.name for s in servers) == sorted(vm["name"] for vm in pool.vms())
    assert all(s.name.startswith(pool.prefix) and s.metadata["vmpool_vm"] == s.name for s in servers)
    for vm in pool.vms():
        console = pool.bed.admin_nova().servers.get_console_output(vm["server_id"])
        pinned = [
            line.split(" ", 1)[1]
            for line in Path(pool.known_hosts).read_text().splitlines()
            if line.startswith(vm["address"] + " ")
        ]
        assert pinned and sorted(pinned) == sorted(vp.host_keys_from_console(console))
        assert ssh_as_root(pool, vm["address"], "true").returncode == 0


def test_acquire_on_an_empty_pool_boots_a_vm_and_release_frees_it(pool: PoolHandle) -> None:
    pool.bed.set_behaviour(f"^{pool.prefix}", spawn_delay=1.5)
    acquired = pool.run("acquire", "101.server", "--user", "alice", "--timeout", "90")
    address = acquired.stdout.strip()
    vm = pool.vms("busy")[0]
    assert (vm["address"], vm["job"], vm["user"]) == (address, "101.server", "alice")
    assert "creating server" in acquired.stderr and "acquired by job 101.server" in acquired.stderr
    assert ssh_as_root(pool, address, "hostname").returncode == 0
    again = pool.run("acquire", "101.server", "--user", "alice")
    assert again.stdout.strip() == address, "acquire must be idempotent per job"
    pool.run("release", "101.server")
    assert pool.vms("free")[0]["name"] == vm["name"]
    second = pool.run("release", "101.server")
    assert second.returncode == 0 and "nothing to release" in second.stderr


def test_acquire_of_a_free_vm_never_touches_the_cloud_nor_imports_its_client(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1})
    pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free VM")
    pool.bed.reset_counts()
    heavy = ("novaclient", "fabric", "paramiko", "keystoneauth1", "openstack", "prometheus_client", "nagiosplugin")
    result, imported = pool.run_in_process("acquire", "7", "--format", "env", modules=heavy)
    assert result.returncode == 0, result.stderr
    assert imported == []
    env = dict(line.split("=", 1) for line in result.stdout.splitlines() if line.startswith("VMPOOL_"))
    assert env["VMPOOL_ADDRESS"] == pool.vms("busy")[0]["address"] and env["VMPOOL_KNOWN_HOSTS"] == pool.known_hosts
    assert sum(pool.bed.counts().values()) == 0, pool.bed.counts()
    pool.bed.reset_counts()
    pool.run("release", "7")
    assert sum(pool.bed.counts().values()) == 0


def test_every_dataclass_has_a_docstring_of_its_own() -> None:
    """@dataclass writes a missing docstring from inspect.signature, at every command's start."""
    import dataclasses

    made = [
        cls
        for cls in vars(vp).values()
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == vp.__name__
    ]
    generated = [cls.__name__ for cls in made if (cls.__doc__ or "").startswith(f"{cls.__name__}(")]
    assert len(made) > 20 and generated == []


# --- start-up admission: one start slot per core for the imports ---


def _slots(directory: Path, indexes: range) -> list[int]:
    """Hold these start slots of the directory, as commands in their imports would."""
    import fcntl

    fds = [os.open(directory / f"start-slot.{index}", os.O_RDWR | os.O_CREAT, 0o600) for index in indexes]
    for fd in fds:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fds


def _waits_for_a_flock(pid: int) -> bool:
    """/proc/locks lists a process blocked on a flock as '-> FLOCK ADVISORY WRITE <pid> ...'."""
    return any(
        fields[1:3] == ["->", "FLOCK"] and fields[5] == str(pid)
        for fields in map(str.split, Path("/proc/locks").read_text().splitlines())
    )


def test_a_start_slot_is_taken_while_one_is_free_and_none_once_the_wait_is_over(tmp_path: Path) -> None:
    import signal

    slots = tmp_path / "slots"
    handler = signal.getsignal(signal.SIGALRM)
    first, second = vp.take_start_slot(str(slots), 2, 5), vp.take_start_slot(str(slots), 2, 5)
    assert first is not None and second is not None, "two slots, both free"
    assert stat.S_IMODE(slots.stat().st_mode) == 0o700
    assert vp.take_start_slot(str(slots), 2, 0.2) is None, "both held: the command goes on without one"
    os.close(first)
    third = vp.take_start_slot(str(slots), 2, 5)
    assert third is not None
    os.close(second)
    os.close(third)
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_no_start_slot_in_a_directory_another_user_could_hold_them_in(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert vp.take_start_slot(str(shared), 2, 5) is None and list(shared.iterdir()) == []
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(private)
    assert vp.take_start_slot(str(tmp_path / "link"), 2, 5) is None and list(private.iterdir()) == []


def test_the_command_waits_for_a_start_slot_and_goes_on_without_one_after_start_slot_wait(tmp_path: Path) -> None:
    """The real console script: with every slot held by commands in their imports, it waits on
    its slot (the kernel lists it as blocked on the flock), and that slot let go lets it in; a
    holder that never lets go holds it up VMPOOL_START_SLOT_WAIT at most."""
    slots = tmp_path / "slots"
    slots.mkdir(mode=0o700)
    cores = len(os.sched_getaffinity(0))
    held = _slots(slots, range(cores))
    env = {**os.environ, "VMPOOL_START_SLOTS": str(slots), "VMPOOL_START_SLOT_WAIT": "3600"}
    waiting = subprocess.Popen([VMPOOL, "--version"], env=env, stdout=subprocess.PIPE, text=True)
    wait_until(lambda: _waits_for_a_flock(waiting.pid), 30, "the command waiting on a start slot")
    assert waiting.poll() is None
    os.close(held.pop(waiting.pid % cores))  # the slot it queues on: only that can let it in this hour
    assert waiting.wait(60) == 0 and vp.__version__ in waiting.communicate()[0]
    held += _slots(slots, range(waiting.pid % cores, waiting.pid % cores + 1))  # all held again, for good
    stuck = subprocess.Popen(
        [VMPOOL, "--version"], env={**env, "VMPOOL_START_SLOT_WAIT": "5"}, stdout=subprocess.PIPE, text=True
    )
    wait_until(lambda: _waits_for_a_flock(stuck.pid), 30, "the command waiting on a start slot")
    assert stuck.wait(60) == 0, "a stuck holder must not hold it up for good"
    for fd in held:
        os.close(fd)


def test_the_command_s_probe_workers_take_no_start_slot(tmp_path: Path) -> None:
    """A probe worker (forkserver) imports vmpool again with the command's argv: it must not take
    a slot, which it would hold for the whole pass while prologues wait for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    command = bin_dir / "vmpool"  # named as the console script is, argv[0] and all
    command.write_text(f"""#!{sys.executable}
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import vmpool


def slot_in_worker(_):
    return vmpool.START_SLOT


if __name__ == "__main__":
    took = vmpool.START_SLOT is not None
    vmpool.admitted()  # as run() does before main()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as workers:
        print(took, list(workers.map(slot_in_worker, range(2))))
""")
    command.chmod(0o755)
    slots = tmp_path / "slots"
    result = subprocess.run(
        [str(command)],
        env={**os.environ, "VMPOOL_START_SLOTS": str(slots)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "[None,", "None]"], result.stdout


def test_acquire_times_out_with_a_reason_and_withdraws_its_request(pool: PoolHandle) -> None:
    pool.write_config(pool={"max": 1})
    pool.run("acquire", "1", "--user", "alice")
    result = pool.run("acquire", "2", "--user", "bob", "--timeout", "3", check=False)
    assert result.returncode == 6
    assert "no VM within 3s" in result.stderr and "pool at max (1 of 1 VMs busy)" in result.stderr
    assert pool.status()["waiting"] == []


def test_waiting_acquires_are_served_first_come_first_served_as_vms_are_released(pool: PoolHandle) -> None:
    pool.write_config(pool={"max": 1})
    first = pool.run("acquire", "1", "--user", "alice").stdout.strip()
    waiters = {}
    for job in ("2", "3"):  # job 2 asks first, then job 3; both wait
        waiters[job] = pool.spawn("acquire", job, "--user", "bob", "--timeout", "60")

        def last_waiting(job: str = job) -> bool:
            return [r["job"] for r in pool.status()["waiting"]][-1:] == [job]

        wait_until(last_waiting, 30, f"job {job} to wait")
    assert [r["job"] for r in pool.status()["waiting"]] == ["2", "3"]
    pool.run("release", "1")
    out, err = waiters["2"].communicate(timeout=60)
    assert waiters["2"].returncode == 0, err
    assert out.strip() == first and pool.vms("busy")[0]["job"] == "2"
    assert waiters["3"].poll() is None and [r["job"] for r in pool.status()["waiting"]] == ["3"]
    pool.run("release", "2")
    out, err = waiters["3"].communicate(timeout=60)
    assert waiters["3"].returncode == 0, err
    assert out.strip() == first and pool.vms("busy")[0]["job"] == "3"


def test_an_acquire_without_user_gets_the_running_jobs_own_vm(pool: PoolHandle) -> None:
    """--user is optional: an acquire without it names no other owner, so the job's VM stays its
    own (it was tainted, a second VM claimed, and the first deleted under the running job)."""
    pool.write_config(pool={"max": 2})
    first = pool.run("acquire", "5", "--user", "alice").stdout.strip()
    again = pool.run("acquire", "5", "--format", "env")
    assert f"VMPOOL_ADDRESS={first}" in again.stdout and "VMPOOL_ALREADY_HELD=yes" in again.stdout
    [vm] = pool.vms()
    assert (vm["state"], vm["job"], vm["user"], vm["tainted"]) == ("busy", "5", "alice", None)
    pool.run("release", "5")
    assert pool.vms("free"), "released as any job's VM"


def test_release_unusable_taints_the_vm_and_reconcile_deletes_it_later(pool: PoolHandle) -> None:
    pool.write_config(pool={"max": 1})
    pool.run("acquire", "5", "--user", "alice")
    pool.run("release", "5", "--unusable", "scrub failed: rm /tmp")
    vm = pool.vms()[0]
    assert (vm["state"], vm["tainted"]) == ("unusable", "scrub failed: rm /tmp")
    assert pool.run("acquire", "6", "--timeout", "2", check=False).returncode == 6, "a tainted VM is never reused"
    pool.write_config(pool={"unusable_timeout": 1})
    pool.reconcile_until(lambda: vm["server_id"] not in {s.id for s in pool.servers()}, 60, "tainted VM deleted")


def test_build_is_visible_and_error_servers_are_deleted_at_once(pool: PoolHandle) -> None:
    # create_grace 3: the server deleted below while building is dropped after 3 s, not 30
    pool.write_config(pool={"min": 1, "create_grace": 3})
    pool.bed.set_behaviour(f"^{pool.prefix}", spawn_delay=30)
    pool.run("reconcile")
    pool.reconcile_until(lambda: [vm for vm in pool.vms() if vm["reason"] == "building"], 30, "a building VM")
    pool.bed.clear_behaviours()
    pool.delete_everything()
    pool.bed.set_behaviour(f"^{pool.prefix}", error=True)
    pool.reconcile_until(lambda: pool.status()["boot_failures"] >= 1, 60, "a failed boot counted")
    assert "server in ERROR: " in Path(pool.settings["pool"]["log_file"]).read_text()
    pool.reconcile_until(lambda: not any(s.status == "ERROR" for s in pool.servers()), 60, "ERROR servers deleted")


def test_killed_sshd_makes_a_vm_unusable_then_deleted_and_replaced(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1, "unusable_timeout": 3})
    pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free VM")
    victim = pool.vms("free")[0]
    pool.bed.vm_fault(victim["server_id"], "refuse")
    pool.reconcile_until(
        lambda: any(
            vm["name"] == victim["name"] and vm["state"] == "unusable" and "unreachable" in vm["reason"]
            for vm in pool.vms()
        ),
        30,
        "unreachable",
    )
    pool.reconcile_until(
        lambda: victim["server_id"] not in {s.id for s in pool.servers()} and pool.vms("free"),
        90,
        "victim deleted and replaced",
    )
    assert pool.vms("free")[0]["name"] != victim["name"]
    log = Path(pool.settings["pool"]["log_file"]).read_text()
    assert f"vm {victim['name']} ({victim['address']}) unusable: ssh: " in log


def test_orphan_with_the_pool_tag_is_adopted_tainted_and_foreign_servers_untouched(pool: PoolHandle) -> None:
    info = pool.bed.info
    nova = pool.bed.nova()
    orphan = nova.servers.create(
        name=f"{pool.prefix}9999",
        image=info["image_id"],
        flavor=info["flavor_id"],
        nics=[{"net-id": info["network_id"]}],
        key_name=info["key_name"],
        meta={"vmpool_pool": pool.name, "vmpool_vm": f"{pool.prefix}9999"},
    )
    foreign = nova.servers.create(
        name=f"{pool.prefix}8888",
        image=info["image_id"],
        flavor=info["flavor_id"],
        nics=[{"net-id": info["network_id"]}],
        meta={"owner": "someone else"},
    )
    try:
        pool.run("reconcile")
        assert pool.vms() == [], "an orphan is adopted only when seen on a second pass"
        # Its past is unknown (a lost state file: it may run a job): adopted tainted, never handed out.
        adopted = pool.reconcile_until(
            lambda: [vm for vm in pool.vms() if vm["server_id"] == orphan.id], 60, "the orphan adopted"
        )
        assert adopted[0]["state"] == "unusable" and adopted[0]["tainted"] == "adopted with unknown past"
        pool.reconcile_until(
            lambda: orphan.id not in {s.id for s in nova.servers.list()},
            90,
            "the adopted VM deleted after unusable_timeout",
        )
        assert not pool.vms("free") and not pool.vms("busy")
        assert foreign.id in {s.id for s in nova.servers.list()}, "a server without the tag is never touched"
        assert all(vm["server_id"] != foreign.id for vm in pool.vms())
    finally:
        nova.servers.delete(foreign.id)


def test_idle_free_vms_scale_down_to_min(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 2})
    pool.reconcile_until(lambda: len(pool.vms("free")) == 2, 90, "two Free VMs")
    pool.write_config(pool={"min": 1, "idle_timeout": 0.1})
    pool.reconcile_until(lambda: len(pool.servers()) == 1 and len(pool.vms()) == 1, 60, "one VM left")


def test_a_reconcile_pass_lists_the_cloud_once_never_one_get_per_vm(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 3})
    pool.reconcile_until(lambda: len(pool.vms("free")) == 3, 90, "three Free VMs")
    pool.run("acquire", "5", "--user", "ann")
    pool.bed.reset_counts()
    pool.run("reconcile")
    nova = {key: n for key, n in pool.bed.counts().items() if key.startswith("nova ")}
    # one listing of the servers, and one of the pools waiting on the project's quota (server groups)
    assert nova == {"nova GET /v2.1/servers/detail": 1, "nova GET /v2.1/os-server-groups": 1}, nova


def test_shut_off_vms_are_unusable_and_a_busy_one_is_its_jobs_again_once_active(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 2, "unusable_timeout": 2})
    pool.reconcile_until(lambda: len(pool.vms("free")) == 2, 90, "two Free VMs")
    pool.run("acquire", "12.srv", "--user", "gus")
    busy = pool.vms("busy")[0]
    free = pool.vms("free")[0]
    nova = pool.bed.admin_nova()
    nova.servers.stop(busy["server_id"])
    nova.servers.stop(free["server_id"])

    def reason(server_id: str) -> str | None:
        return next((vm["reason"] for vm in pool.vms() if vm["server_id"] == server_id), "gone")

    pool.reconcile_until(lambda: reason(busy["server_id"]) == "shutoff", 60, "the Busy VM seen SHUTOFF")
    log = Path(pool.settings["pool"]["log_file"]).read_text()
    assert "of job 12.srv is shutoff" in log
    # The Free one is deleted after unusable_timeout; the job's VM is kept for its job.
    pool.reconcile_until(
        lambda: free["server_id"] not in {s.id for s in pool.servers()}, 60, "the shut-off Free VM deleted"
    )
    assert reason(busy["server_id"]) == "shutoff"
    nova.servers.start(busy["server_id"])
    pool.reconcile_until(
        lambda: [vm["job"] for vm in pool.vms("busy")] == ["12.srv"], 60, "the restarted VM Busy with its job again"
    )
    assert pool.run("acquire", "12.srv", "--user", "gus").stdout.strip() == busy["address"]


def test_a_busy_vm_whose_server_goes_error_is_deleted_and_its_job_named(pool: PoolHandle) -> None:
    pool.run("acquire", "13.srv", "--user", "hal")
    vm = pool.vms("busy")[0]
    pool.bed.admin_nova().servers.reset_state(vm["server_id"], "error")
    # the state learns that the server is gone only from later listings (two in a row): wait for that
    pool.reconcile_until(
        lambda: vm["server_id"] not in {s.id for s in pool.servers()} and not pool.vms(),
        60,
        "the ERROR server deleted and dropped from the state",
    )
    log = Path(pool.settings["pool"]["log_file"]).read_text()
    assert "of job 13.srv failed: server in ERROR" in log
    result = pool.run("release", "13.srv")  # the job's epilogue, later
    assert result.returncode == 0 and "no VM held, nothing to release" in result.stderr


def test_concurrent_reconcile_is_refused_quietly(pool: PoolHandle) -> None:
    with vp.reconcile_lock(pool.state_file) as mine:
        assert mine
        result = pool.run("reconcile")
    assert result.returncode == 0 and "another reconcile is running" in result.stderr


def test_status_table_and_json(pool: PoolHandle) -> None:
    pool.write_config(pool={"max": 2})
    pool.run("acquire", "11.srv", "--user", "carol")
    table = pool.run("status").stdout
    assert "11.srv" in table and "carol" in table and "busy" in table and "pool " + pool.name in table
    data = pool.status()
    assert data["schema"] == "vmpool-status" and data["counts"]["busy"] == 1 and data["limits"]["max"] == 2


@pytest.mark.parametrize("job", ["1;touch /tmp/pwned", "../1", "$(id)", "1 2"])
def test_bad_job_ids_are_refused_before_anything(pool: PoolHandle, job: str) -> None:
    result = pool.run("acquire", job, check=False)
    assert result.returncode == 2 and "invalid job id" in result.stderr
    assert not Path(pool.state_file).exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"schema": "vmpool-state", "version": 2, "pool": "{pool}", "vms": []}',
            "was written by a newer vmpool (this one reads 1); upgrade vmpool",
        ),
        ('{"jobs": {}}', "not a vmpool state file"),
        ('{"schema": "vmpool-state", "version": 1, "pool": "elsewhere", "vms": []}', "belongs to pool 'elsewhere'"),
    ],
)
def test_bad_state_is_reported_and_left_untouched(pool: PoolHandle, content: str, message: str) -> None:
    content = content.replace("{pool}", pool.name)
    Path(pool.state_file).parent.mkdir(mode=0o700)
    Path(pool.state_file).write_text(content)
    Path(pool.state_file).chmod(0o600)
    for args in (("acquire", "1"), ("release", "1"), ("reconcile",), ("status",)):
        result = pool.run(*args, check=False)
        assert result.returncode == 4 and message in result.stderr, (args, result.stderr)
    assert "To recover" in pool.run("status", check=False).stderr
    assert Path(pool.state_file).read_text() == content
    assert not pool.servers(), "nothing was created on the strength of a state it could not read"


def write_job_record(directory: Path, job: str, vm: dict, user: str, host_key: str) -> None:
    """A job's record as the hooks' vh_write_record leaves it (root's part)."""
    record = directory / job
    record.mkdir(parents=True, mode=0o711)
    (record / "root.env").write_text(
        f"VM_NAME={vm['name']}\nSERVER_ID={vm['server_id']}\nADDRESS={vm['address']}\n"
        f"SSH_PORT=22\nSSH_USER=root\nSSH_KEY=/k\nJOB_USER={user}\n"
    )
    (record / "root.env").chmod(0o600)
    (record / "root_known_hosts").write_text(f"{vm['address']} {host_key}\n")
    (record / "root_known_hosts").chmod(0o600)


def test_a_corrupt_state_is_set_aside_and_the_running_jobs_keep_their_vms(pool: PoolHandle, tmp_path: Path) -> None:
    """A damaged state file: every command says so (exit 4); reconcile sets it aside and rebuilds
    the pool from the cloud and the hooks' job records: the running job keeps its VM, no other job
    is given it, and its release finds it."""
    records = tmp_path / "jobs"
    pool.write_config(pool={"max": 2, "job_records": str(records)})
    address = pool.run("acquire", "7", "--user", "alice").stdout.strip()
    [vm] = pool.vms()
    [key] = [
        line.split(" ", 1)[1]
        for line in Path(pool.known_hosts).read_text().splitlines()
        if line.startswith(address + " ")
    ][:1]
    write_job_record(records, "7", vm, "alice", key)
    state = Path(pool.state_file)
    state.write_text(state.read_text()[:200])  # a disk that lost the file's tail
    for args in (("acquire", "8", "--timeout", "1"), ("release", "7"), ("status",)):
        result = pool.run(*args, check=False)
        assert result.returncode == 4 and "corrupt state" in result.stderr and "reconcile" in result.stderr, args
    damaged = state.read_text()
    pool.run("reconcile")
    [aside] = list(state.parent.glob("state.json.corrupt-*"))
    assert aside.read_text() == damaged, "the damaged file is kept for the admin"
    rebuilt = pool.vms()
    assert [(v["server_id"], v["state"], v["job"], v["user"]) for v in rebuilt] == [
        (vm["server_id"], "busy", "7", "alice")
    ], "the job's VM is its own again at the first pass"
    other = pool.run("acquire", "8", "--user", "bob").stdout.strip()
    assert other != address, "no VM goes to a second job"
    pool.run("release", "7")
    assert {v["server_id"]: v["state"] for v in pool.vms()}[vm["server_id"]] == "free", "its release found it"


def test_config_path_comes_from_the_option_then_the_environment_then_etc(pool: PoolHandle, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    by_env = subprocess.run(
        [VMPOOL, "status", "--json"], capture_output=True, text=True, env={**env, "VMPOOL_CONFIG": pool.config_path}
    )
    assert by_env.returncode == 0 and json.loads(by_env.stdout)["pool"] == pool.name
    both = subprocess.run(
        [VMPOOL, "--config", str(tmp_path / "other.conf"), "status"],
        capture_output=True,
        text=True,
        env={**env, "VMPOOL_CONFIG": pool.config_path},
    )
    assert both.returncode == 3 and f"{tmp_path / 'other.conf'}: no such config file" in both.stderr
    if not Path(vp.DEFAULT_CONFIG_PATH).exists():
        neither = subprocess.run([VMPOOL, "status"], capture_output=True, text=True, env=env)
        assert neither.returncode == 3 and f"{vp.DEFAULT_CONFIG_PATH}: no such config file" in neither.stderr
    version = subprocess.run([VMPOOL, "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.strip() == f"vmpool, version {vp.__version__}"


def test_config_errors_have_their_exit_code(pool: PoolHandle, tmp_path: Path) -> None:
    result = subprocess.run([VMPOOL, "--config", str(tmp_path / "nope.conf"), "status"], capture_output=True, text=True)
    assert result.returncode == 3 and "no such config file" in result.stderr
    Path(pool.config_path).chmod(0o644)
    result = pool.run("status", check=False)
    assert result.returncode == 3 and "chmod 600" in result.stderr
    qstat = tmp_path / "qstat"  # a program root would run, that others can change
    qstat.write_text("#!/bin/sh\nexit 0\n")
    qstat.chmod(0o777)
    pool.write_config(pool={"job_alive_command": f"{qstat} {{jobid}}"})
    for command in (["reconcile"], ["acquire", "1", "--user", "alice"]):
        result = pool.run(*command, check=False)
        assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"others can change {qstat} (owner uid 0, mode 0777)" in result.stderr
        assert result.stderr.rstrip().endswith(f"run: chown root:root {qstat}; chmod go-w {qstat}")
    assert not pool.servers()


def test_json_status_is_stable(pool: PoolHandle) -> None:
    data = pool.status()
    assert set(data) >= {"schema", "version", "pool", "limits", "counts", "waiting", "vms", "last_reconcile"}
    json.dumps(data)


def test_application_credential_auth_works_end_to_end(pool: PoolHandle) -> None:
    info = pool.bed.info
    for key in ("username", "password", "project_name", "user_domain_name", "project_domain_name"):
        del pool.settings["openstack"][key]
    pool.write_config(
        openstack={
            "application_credential_id": info["application_credential_id"],
            "application_credential_secret": info["application_credential_secret"],
        }
    )
    address = pool.run("acquire", "31", "--user", "alice").stdout.strip()
    assert pool.vms("busy")[0]["address"] == address and pool.servers()


def test_dry_run_reports_and_changes_nothing(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 2})
    result = pool.run("reconcile", "--dry-run")
    lines = result.stdout.splitlines()
    assert lines == [f"would create server {pool.prefix}0001", f"would create server {pool.prefix}0002"], lines
    assert pool.vms() == [] and pool.servers() == []


def test_vm_active_long_before_ssh_answers(pool: PoolHandle) -> None:
    """A real cloud says ACTIVE long before sshd answers: wait within ready_timeout, not beyond."""
    pool.bed.set_behaviour(f"^{pool.prefix}", sshd_delay=4)
    address = pool.run("acquire", "41", "--user", "alice", "--timeout", "60").stdout.strip()
    assert ssh_as_root(pool, address, "true").returncode == 0
    pool.bed.set_behaviour(f"^{pool.prefix}", sshd_delay=600)
    pool.write_config(pool={"ready_timeout": 3, "min": 2})
    pool.reconcile_until(
        lambda: any((vm["reason"] or "").startswith("unreachable") for vm in pool.vms()),
        60,
        "an ACTIVE VM not answering SSH",
    )
    late = next(vm for vm in pool.vms() if (vm["reason"] or "").startswith("unreachable"))
    pool.reconcile_until(
        lambda: late["server_id"] not in {s.id for s in pool.servers()}, 60, "the VM deleted after ready_timeout"
    )
    assert "not reachable over SSH 3s after ACTIVE" in Path(pool.settings["pool"]["log_file"]).read_text()


def test_deleted_vms_leave_known_hosts(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1})
    pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free VM")
    address = pool.vms("free")[0]["address"]
    assert address in pool.pinned_hosts()
    pool.write_config(pool={"min": 0, "idle_timeout": 0.1})
    pool.reconcile_until(lambda: not pool.vms(), 60, "the VM deleted")
    assert address not in pool.pinned_hosts(), "addresses get reused: no stale pin"


# --- what a new admin met (issue 11, item 7) ---


def test_config_and_verbose_options_work_after_the_subcommand_too(pool: PoolHandle) -> None:
    for args in (["status", "--config", pool.config_path], ["reconcile", "--config", pool.config_path, "-v"]):
        result = subprocess.run(
            [VMPOOL, *args],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "VMPOOL_CONFIG": "/nonexistent/vmpool.conf"},
        )
        assert result.returncode == 0, (args, result.stderr)


def test_a_wrong_password_fails_acquire_at_once_with_exit_5(pool: PoolHandle) -> None:
    pool.write_config(openstack={"password": "not-the-password"})
    result = pool.run("acquire", "41", "--user", "alice", "--timeout", "120", check=False)
    assert result.returncode == 5, result.stderr  # not 6 after waiting out the timeout
    assert "authentication failed" in result.stderr and pool.settings["openstack"]["auth_url"] in result.stderr
    assert pool.status()["waiting"] == []


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one ERROR line a failed command logged (each error: one sentence, told once)."""
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_state_directory_that_cannot_be_made_is_one_sentence_naming_it_exit_4(pool: PoolHandle) -> None:
    Path(pool.dir / "taken").write_text("a file where the state directory should be")
    pool.write_config(pool={"state_file": str(pool.dir / "taken" / "state" / "state.json")})
    for command in (["acquire", "43", "--user", "alice"], ["release", "43"], ["reconcile"], ["status"]):
        result = pool.run(*command, check=False)
        assert result.returncode == 4, (command, result.stderr)
        assert f"state directory {pool.dir}/taken/state cannot be created or written (not a directory" in one_error(
            result
        ), result.stderr
        assert f"mkdir -m 700 {pool.dir}/taken/state" in result.stderr and "move it aside" not in result.stderr


def test_a_user_who_is_not_root_is_told_to_run_vmpool_as_root(pool: PoolHandle) -> None:
    def as_nobody(config: Path | str, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                "--reuid",
                "nobody",
                "--regid",
                "nogroup",
                "--clear-groups",
                VMPOOL,
                "--config",
                str(config),
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    # a config with a password is root's alone: that is the first thing nobody cannot read
    refused = as_nobody(pool.config_path, "acquire", "44")
    assert (
        refused.returncode == 3
        and "cannot read config: permission denied: vmpool must run as root (the "
        "config is root's alone); run it as root or with sudo"
        in one_error(refused)
    )
    # a config anyone may read (its credentials in clouds.yaml): then root's log, then root's state
    opened = Path(tempfile.mkdtemp(prefix="vmpool-nobody-"))
    try:
        opened.chmod(0o755)
        shutil.copy(pool.key, opened / "id_pool")
        identity = ("auth_url", "username", "password", "user_domain_name", "project_name", "project_domain_name")
        settings = {
            **pool.settings,
            "pool": {**pool.settings["pool"], "state_file": opened / "state" / "state.json"},
            "openstack": {
                **{key: value for key, value in pool.settings["openstack"].items() if key not in identity},
                "cloud": "site",
            },
            "ssh": {**pool.settings["ssh"], "private_key": opened / "id_pool"},
        }
        settings["pool"]["log_file"] = opened / "vmpool.log"
        config = opened / "vmpool.conf"
        config.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
                for section, values in settings.items()
            )
        )
        config.chmod(0o644)
        pool.run("--config", str(config), "release", "44")  # root makes the state directory and the log
        # root's log is left alone (a monitoring user's `check` logs to stderr): the state is what it meets
        for command in (["acquire", "44"], ["release", "44"], ["reconcile"], ["status"]):
            result = as_nobody(config, *command)
            assert result.returncode == 4, (command, result.stderr)
            assert (
                f"permission denied: vmpool must run as root (the state and its locks in {opened}/state are "
                "root's); run it as root or with sudo" in one_error(result)
            )
            assert "move it aside" not in result.stderr
    finally:
        shutil.rmtree(opened)


def test_a_closed_keystone_port_is_said_once_while_acquire_waits_for_a_freed_vm(pool: PoolHandle) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v3"
    pool.write_config(openstack={"auth_url": closed})
    result = pool.run("acquire", "45", "--user", "alice", "--timeout", "4", check=False)
    assert result.returncode == 6, result.stderr  # kept waiting: a VM another job frees could still serve it
    said = f"cannot reach Keystone at {closed}: connection refused (check auth_url: its host, port and scheme)"
    assert result.stderr.count(said) == 2, result.stderr  # the first pass's line, and the timeout's reason
    assert "HTTPConnectionPool" not in result.stderr


def test_an_auth_url_of_nova_is_said_not_to_be_a_keystone(pool: PoolHandle) -> None:
    nova = pool.bed.info["compute_url"]
    for auth_url in (nova, nova.rsplit("/", 1)[0]):  # Nova's v2.1 answers 401, its root a version list
        pool.write_config(openstack={"auth_url": auth_url})
        for command in (["reconcile"], ["acquire", "46", "--timeout", "30"]):
            result = pool.run(*command, check=False)
            assert result.returncode == 5, result.stderr
            assert f"{auth_url} answered, but is not a Keystone identity endpoint; set auth_url" in result.stderr
            assert "Invalid response" not in result.stderr and "authentication failed" not in result.stderr


def test_a_create_the_cloud_refuses_names_the_config_keys_and_leaves_no_intent(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1}, openstack={"image": "00000000-0000-0000-0000-000000000000"})
    result = pool.run("reconcile", check=False)
    assert result.returncode == 5, result.stderr
    assert "check [openstack] image, flavor, network, key_name" in result.stderr
    assert pool.vms() == [], "a refused create leaves no VM 'creating' for create_grace"


def test_a_missing_private_key_is_a_config_error_naming_it(pool: PoolHandle) -> None:
    pool.write_config(ssh={"private_key": "/nonexistent/id_ed25519"})
    for command in (["acquire", "42"], ["reconcile"]):
        result = pool.run(*command, check=False)
        assert result.returncode == 3 and "private_key = '/nonexistent/id_ed25519': no such file" in result.stderr
    assert pool.run("status").returncode == 0, "status needs no key"


def verdicts(stdout: str) -> dict[str, str]:
    """`vmpool verify`'s lines as {what it checked (up to ' = '): 'ok' or 'FAILED: why'}."""
    found = {}
    for line in stdout.splitlines():
        verdict, what = line.split(None, 1)
        key, _, rest = what.partition(" = ")
        found[key] = verdict if verdict == "ok" else f"FAILED: {rest.partition(': ')[2]}"
    return found


def test_verify_checks_the_whole_setup_and_names_each_wrong_key(pool: PoolHandle, tmp_path: Path) -> None:
    good = pool.run("verify")
    assert set(verdicts(good.stdout).values()) == {"ok"} and len(verdicts(good.stdout)) == 8, good.stdout

    from novaclient import client as nova_client  # the image's name, through Nova's image proxy

    legacy = nova_client.Client(
        "2.1", session=pool.bed.session(admin=True), endpoint_override=pool.bed.info["admin_compute_url"]
    )
    image_name = legacy.client.get(f"/images/{pool.bed.info['image_id']}")[1]["image"]["name"]
    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    pool.write_config(
        openstack={"flavor": "bed.small", "image": image_name, "network": "no-such-network"},
        ssh={"private_key": str(other_key)},
    )
    bad = pool.run("verify", check=False)
    assert bad.returncode == 3, bad.stderr
    found = verdicts(bad.stdout)
    assert found["[openstack] flavor"] == (
        f"FAILED: 'bed.small' is the name of flavor {pool.bed.info['flavor_id']}; "
        f"give its ID: flavor = {pool.bed.info['flavor_id']}"
    )
    assert found["[openstack] image"].endswith(f"give its ID: image = {pool.bed.info['image_id']}")
    assert found["[openstack] network"].startswith("FAILED: the cloud has no network with ID 'no-such-network'")
    assert "does not hold the public half of [ssh] private_key" in found["[openstack] key_name"]
    assert found["[ssh] private_key"] == "ok" and found["[openstack] auth_url"] == "ok"
    assert "4 check(s) failed" in bad.stderr

    pool.write_config(openstack={"key_name": "no-such-key"}, ssh={"private_key": str(tmp_path / "missing")})
    found = verdicts(pool.run("verify", check=False).stdout)
    assert found["[openstack] key_name"].startswith("FAILED: no key pair 'no-such-key'")
    assert found["[ssh] private_key"] == "FAILED: no such file"

    pool.write_config(openstack={"password": "not-the-password"})
    refused = pool.run("verify", check=False)
    assert refused.returncode == 5, refused.stderr
    assert "authentication failed" in verdicts(refused.stdout)["[openstack] auth_url"]
    assert "[openstack] flavor" not in refused.stdout, "nothing is looked up without a token"


def test_verify_fails_for_vmpool_files_on_a_kernel_file_system(pool: PoolHandle) -> None:
    """/proc, /sys and /dev look writable to root, but what vmpool writes there is gone or refused."""
    pool.write_config(
        pool={"state_file": "/proc/vmpool/state.json", "log_file": "/dev/null"},
        ssh={"known_hosts": "/sys/vmpool/known_hosts"},
    )
    result = pool.run("verify", check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    found = verdicts(result.stdout)
    for key, top in (("[pool] state_file", "/proc"), ("[ssh] known_hosts", "/sys"), ("[pool] log_file", "/dev")):
        assert (
            found[key] == f"FAILED: under {top}, the kernel's: keep vmpool's files on a disk, e.g. under "
            "/var/lib/vmpool"
        ), result.stdout
    assert "3 check(s) failed" in result.stderr


def test_the_beds_printed_config_passes_verify_and_pastes_no_admin_password(bed: Any, tmp_path: Path) -> None:
    """What `bed.py up` (and `bed.py config`) prints is a whole vmpool config once [pool] is added."""
    info = bed.info
    printed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cloud" / "bed.py"), "config", info["run_dir"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert info["admin_password"] not in printed and f"known_hosts = {info['run_dir']}/known_hosts" in printed
    config = tmp_path / "vmpool.conf"
    config.write_text(f"[pool]\nstate_file = {tmp_path}/state.json\n\n{printed}")
    config.chmod(0o600)
    verified = subprocess.run([VMPOOL, "--config", str(config), "verify"], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failing_background_thread_is_a_debug_line_not_a_traceback_on_stderr(verbose: bool) -> None:
    # as fabric's command-timeout timer thread fails when it closes a transport that already died
    code = (
        f"import threading, vmpool; vmpool.setup_logging({verbose}); "
        "t = threading.Thread(target=lambda: 1 / 0, name='timer'); t.start(); t.join()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    if verbose:
        assert "DEBUG background thread timer: ZeroDivisionError: division by zero" in result.stderr
    else:
        assert result.stderr == ""
