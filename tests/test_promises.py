"""The pool's promises over the real parts (issue 8): never more than max servers, nothing forgotten on
one bad listing, no user's VM for another user, no VM for a job that already ended.

Each test runs the real `vmpool` CLI against the bed's Keystone and Nova over HTTP (novaclient +
keystoneauth1) with sshd VMs; faults come from the bed's proxy (`hide` drops servers from a listing
as a lost page or a down cell would).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import PoolHandle, wait_until
from tests.pbs_mom import Job
from tests.test_hooks import Mom, job_users, mom  # noqa: F401 (fixtures)

pytestmark = pytest.mark.xdist_group("torque-node")  # the same node as test_hooks'


def fill(pool: PoolHandle, count: int) -> list[dict]:
    pool.write_config(pool={"min": count, "max": count})
    return pool.reconcile_until(lambda: len(pool.vms("free")) == count and pool.vms("free"), 120,
                                f"{count} Free VMs")


def log_text(pool: PoolHandle) -> str:
    return Path(pool.settings["pool"]["log_file"]).read_text()


def test_one_listing_without_the_pools_servers_forgets_none_and_creates_none(pool: PoolHandle) -> None:
    free = fill(pool, 3)
    pool.run("acquire", "1.srv", "--user", "alice")
    pool.bed.add_fault("nova", "GET", r"/servers/detail$", "hide", hide_regex=f"^{pool.prefix}", times=1)

    pool.run("reconcile")

    assert sorted(vm["name"] for vm in pool.vms()) == sorted(vm["name"] for vm in free)
    assert [vm["job"] for vm in pool.vms("busy")] == ["1.srv"]
    assert len(pool.servers()) == 3, "max 3: no server may be created for VMs one listing lacked"
    pool.run("reconcile")  # the next listing shows them again
    state = json.loads(Path(pool.state_file).read_text())
    assert all(vm["absent_since"] is None for vm in state["vms"]) and len(pool.servers()) == 3


def test_one_listing_without_one_server_keeps_it_and_creates_no_replacement(pool: PoolHandle) -> None:
    """One server of three missing from one listing: too few for the lost-many guard, so the
    two-listing rule alone keeps it (a listing may miss a server: a page, a cell)."""
    free = fill(pool, 3)
    hidden = free[0]["name"]
    pool.bed.add_fault("nova", "GET", r"/servers/detail$", "hide", hide_regex=f"^{hidden}$", times=1)

    pool.run("reconcile")

    state = json.loads(Path(pool.state_file).read_text())
    assert [vm["absent_since"] is not None for vm in state["vms"] if vm["name"] == hidden] == [True]
    assert sorted(vm["name"] for vm in pool.vms("free")) == sorted(vm["name"] for vm in free)
    assert len(pool.servers()) == 3, "max 3: no replacement for a VM one listing lacked"
    pool.run("reconcile")  # the next listing shows it again
    state = json.loads(Path(pool.state_file).read_text())
    assert all(vm["absent_since"] is None for vm in state["vms"]) and len(pool.servers()) == 3


def test_a_listing_spread_over_many_pages_is_read_whole(pool: PoolHandle) -> None:
    fill(pool, 3)
    pool.bed.set_api_max_limit(1)  # one server per page: a client reading one page sees one VM
    try:
        for _ in range(3):
            pool.run("reconcile")
        state = json.loads(Path(pool.state_file).read_text())
        assert [vm["absent_since"] for vm in state["vms"]] == [None, None, None]
        assert len(pool.vms("free")) == 3 and len(pool.servers()) == 3
        assert "treated as incomplete" not in log_text(pool)
    finally:
        pool.bed.set_api_max_limit(1000)


def test_a_listing_that_loses_most_servers_is_not_believed(pool: PoolHandle) -> None:
    fill(pool, 3)
    pool.bed.add_fault("nova", "GET", r"/servers/detail$", "hide", hide_regex=f"^{pool.prefix}")
    for _ in range(3):
        pool.run("reconcile")
    assert len(pool.vms("free")) == 3 and len(pool.servers()) == 3
    assert "lacks 3 of 3 known servers at once: treated as incomplete" in log_text(pool)


def test_a_clean_vm_dropped_after_two_listings_is_adopted_clean_when_it_shows_up_again(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1, "max": 2})
    (vm,) = pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free VM")
    pool.bed.add_fault("nova", "GET", r"/servers/detail$", "hide", hide_regex=f"^{vm['name']}$")
    pool.reconcile_until(lambda: vm["name"] not in {v["name"] for v in pool.vms()}, 60,
                         "the VM dropped after two listings without it")
    assert len(pool.servers()) <= 2
    pool.bed.clear_faults()
    back = pool.reconcile_until(lambda: [v for v in pool.vms("free") if v["server_id"] == vm["server_id"]], 60,
                                "the same server adopted and Free again")
    assert back[0]["tainted"] is None
    assert len(pool.servers()) <= 2


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


def test_an_acquire_called_after_the_epilogue_ran_gets_nothing_but_a_requeued_attempt_does(
        pool: PoolHandle) -> None:
    fill(pool, 1)
    before = time.time() - 5
    pool.run("release", "3.srv")  # the epilogue ran before the prologue reached acquire

    late = pool.run("acquire", "3.srv", "--user", "alice", "--started", f"{before:.3f}", check=False)

    assert late.returncode == 8 and pool.vms("free"), late.stderr
    requeued = pool.run("acquire", "3.srv", "--user", "alice", "--started", f"{time.time():.3f}")
    assert requeued.stdout.strip() == pool.vms("busy")[0]["address"]


def test_a_reused_job_id_never_gives_one_users_vm_to_another(pool: PoolHandle) -> None:
    fill(pool, 2)
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


def test_a_lost_epilogue_is_recovered_out_of_the_box_through_qstat(mom: Mom) -> None:  # noqa: F811
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

    pool.reconcile_until(lambda: vm["server_id"] not in {s.id for s in pool.servers()}, 90,
                         "the lost job's VM deleted, never reused")
    assert f"job {job.job_id} gone without epilogue" in log_text(pool)
    assert not pool.vms("busy")
