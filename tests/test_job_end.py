"""A job's end and its VM, over the real parts: a job deleted while its acquire waits gets no VM,
an acquire called after the job's epilogue gets nothing (a requeued attempt does), a reused job
id never gives one user's VM to another, and a lost epilogue is recovered through qstat.

Each test runs the real `vmpool` CLI against the bed's Keystone and Nova over HTTP with sshd VMs;
the last one runs a job through the Torque hooks (tests/pbs_mom.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import PoolHandle, wait_until
from tests.pbs_mom import Job
from tests.torque_node import Mom

pytestmark = pytest.mark.xdist_group("torque-node")  # the same node as test_hooks'


def log_text(pool: PoolHandle) -> str:
    return Path(pool.settings["pool"]["log_file"]).read_text()


def test_a_job_deleted_while_its_acquire_waits_gets_no_vm(pool: PoolHandle) -> None:
    """pbs_mom runs a deleted job's epilogue while its prologue still waits in `vmpool acquire`."""
    pool.write_config(pool={"max": 1})
    pool.run("acquire", "1.srv", "--user", "alice", "--timeout", "90")
    started = time.time()
    waiting = pool.spawn("acquire", "2.srv", "--user", "bob", "--timeout", "90", "--started", f"{started:.3f}")
    wait_until(lambda: [r["job"] for r in pool.status()["waiting"]] == ["2.srv"], 30, "job 2.srv waiting")

    released = pool.run("release", "2.srv")  # its epilogue: nothing held

    assert "ended while waiting for a VM" in released.stderr
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 8, err
    assert "its epilogue released it" in err
    pool.run("release", "1.srv")
    assert [vm["job"] for vm in pool.vms()] == [None], "the freed VM goes to nobody"
    assert pool.status()["waiting"] == []


def test_an_acquire_called_after_the_epilogue_ran_gets_nothing_but_a_requeued_attempt_does(pool: PoolHandle) -> None:
    pool.fill(1)
    before = time.time() - 5
    pool.run("release", "3.srv")  # the epilogue ran before the prologue reached acquire

    late = pool.run("acquire", "3.srv", "--user", "alice", "--started", f"{before:.3f}", check=False)

    assert late.returncode == 8 and pool.vms("free"), late.stderr
    requeued = pool.run("acquire", "3.srv", "--user", "alice", "--started", f"{time.time():.3f}")
    assert requeued.stdout.strip() == pool.vms("busy")[0]["address"]


def test_a_reused_job_id_never_gives_one_users_vm_to_another(pool: PoolHandle) -> None:
    pool.fill(2)
    alice = pool.run("acquire", "123.srv", "--user", "alice", "--format", "env").stdout
    assert "VMPOOL_ALREADY_HELD=no" in alice
    again = pool.run("acquire", "123.srv", "--user", "alice", "--format", "env").stdout
    assert "VMPOOL_ALREADY_HELD=yes" in again, "a re-run prologue must know the VM may be prepared"

    bob = pool.run("acquire", "123.srv", "--user", "bob", "--format", "env").stdout

    address = dict(line.split("=", 1) for line in alice.splitlines())["VMPOOL_ADDRESS"]
    assert dict(line.split("=", 1) for line in bob.splitlines())["VMPOOL_ADDRESS"] != address
    first = next(vm for vm in pool.vms() if vm["address"] == address)
    assert first["state"] == "unusable" and "of alice" in first["tainted"] and first["job"] is None
    pool.run("reconcile")
    assert address not in pool.pinned_hosts(), "a tainted VM is no longer trusted by the hooks' ssh"


def test_a_lost_epilogue_is_recovered_out_of_the_box_through_qstat(mom: Mom) -> None:
    """[batch] system = torque, the default: a job TORQUE lists as completed (C) frees its VM."""
    pool = mom.pool
    pool.write_config(pool={"job_gone_grace": 2}, batch={"system": "torque", "command": str(mom.pbs.qstat)})
    job = Job("301.vmpool-test.example", "vmpt-alice", script="echo done\n")
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", mom.pbs.err(job)
    vm = mom.vm_of(job)
    assert mom.pbs.start(job).wait(60) == 0
    pool.run("reconcile")  # the job still runs as far as TORQUE knows: nothing happens
    assert [v["job"] for v in pool.vms("busy")] == [job.job_id]

    mom.pbs.set_state(job, "C", exit_status=0)  # the job completed; its epilogue never ran

    pool.reconcile_until(
        lambda: vm["server_id"] not in {s.id for s in pool.servers()}, 90, "the lost job's VM deleted, never reused"
    )
    assert f"job {job.job_id} gone without epilogue" in log_text(pool)
    assert not pool.vms("busy")
