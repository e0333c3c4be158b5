"""Several pools in one cloud project (one per front node, the way vmpool scales out past one
node's hooks): each keeps to its own servers and its own max, and on the project's quota, one
pool's idle VMs give way to another pool's waiting jobs.

Each pool is a real `vmpool` CLI with its own config and state against the bed's Nova over HTTP;
the demand signal is a server group in the project, made and listed through the real Nova API.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PoolHandle, wait_until


@pytest.fixture
def other_pool(bed: Any, tmp_path: Path) -> Iterator[PoolHandle]:
    directory = tmp_path / "other"
    directory.mkdir()
    handle = PoolHandle(bed, directory, f"t{uuid.uuid4().hex[:6]}-gpu")
    try:
        yield handle
    finally:
        handle.stop_spawned()
        handle.delete_everything()


def demand_groups(pool: PoolHandle) -> set[str]:
    nova = pool.bed.admin_nova()
    return {
        group.name for group in nova.server_groups.list(all_projects=True) if group.name.startswith("vmpool-demand-")
    }


def test_two_pools_keep_to_their_own_servers_and_their_own_max(pool: PoolHandle, other_pool: PoolHandle) -> None:
    for handle in (pool, other_pool):
        handle.write_config(pool={"min": 2, "max": 2, "min_free": 0})
    for _ in range(3):  # passes of both, interleaved, as two front nodes' crons run them
        pool.run("reconcile")
        other_pool.run("reconcile")
    wait_until(lambda: len(pool.servers()) == 2 and len(other_pool.servers()) == 2, 60, "two servers each")
    mine = {server.id for server in pool.servers()}
    Path(other_pool.state_file).unlink()  # the other node lost its state: its servers are not ours to take
    for _ in range(3):
        pool.run("reconcile")
    assert {vm["server_id"] for vm in pool.vms()} == mine, "this pool adopted none of the other's servers"
    assert len(other_pool.servers()) == 2 and len(pool.servers()) == 2


def test_idle_vms_give_way_to_another_pools_jobs_waiting_on_the_project_quota(
    pool: PoolHandle, other_pool: PoolHandle
) -> None:
    """Quota 4 instances; this pool holds 3 idle VMs; the other pool's 2 jobs want 2 VMs. Before,
    the second job waited until its timeout while the quota sat idle (until idle_timeout, 30 min)."""
    pool.write_config(pool={"max": 3, "min": 0, "min_free": 0, "give_way_after": 1, "idle_timeout": 3600})
    other_pool.write_config(
        pool={"max": 3, "min": 0, "min_free": 0, "backoff_initial": 2, "backoff_max": 4, "acquire_timeout": 150}
    )
    for job in ("1", "2", "3"):
        pool.run("acquire", job, "--user", "alice")
    for job in ("1", "2", "3"):
        pool.run("release", job)
    pool.bed.set_quota(instances=4)
    try:
        waiters = [other_pool.spawn("acquire", job, "--user", "bob") for job in ("11", "12")]
        wait_until(lambda: other_pool.status()["waiting_on_quota_since"], 90, "the other pool refused for quota")
        # its cron pass says so through the cloud (a pass finding a waiter's pass running skips)
        other_pool.reconcile_until(
            lambda: f"vmpool-demand-{other_pool.name}" in demand_groups(pool), 60, "the other pool's demand signal"
        )
        pool.reconcile_until(lambda: not pool.servers(), 60, "this pool's idle VMs gone, giving way")
        for waiter in waiters:
            _, err = waiter.communicate(timeout=120)
            assert waiter.returncode == 0, err
        assert sorted(vm["job"] for vm in other_pool.vms("busy")) == ["11", "12"]
        assert "giving way to another pool's waiting jobs" in Path(pool.settings["pool"]["log_file"]).read_text()
        other_pool.reconcile_until(
            lambda: f"vmpool-demand-{other_pool.name}" not in demand_groups(pool),
            60,
            "the signal gone once no job waits",
        )
        pool.run("acquire", "4", "--user", "alice")  # and this pool boots again as the quota allows
        assert len(pool.servers()) + len(other_pool.servers()) <= 4
    finally:
        pool.bed.set_quota(instances=100)
        nova = pool.bed.admin_nova()
        for group in nova.server_groups.list(all_projects=True):
            if group.name in (f"vmpool-demand-{pool.name}", f"vmpool-demand-{other_pool.name}"):
                nova.server_groups.delete(group.id)
