"""What the pool does with the cloud's listing of its servers, over the real parts: one bad
listing forgets nothing and creates nothing, a listing of many pages is read whole, one that lost
most servers is not believed, and a clean VM dropped and seen again is adopted clean.

Each test runs the real `vmpool` CLI against the bed's Keystone and Nova over HTTP (novaclient +
keystoneauth1) with sshd VMs; faults come from the bed's proxy (`hide` drops servers from a listing
as a lost page would).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import PoolHandle


def log_text(pool: PoolHandle) -> str:
    return Path(pool.settings["pool"]["log_file"]).read_text()


def test_one_listing_without_the_pools_servers_forgets_none_and_creates_none(pool: PoolHandle) -> None:
    free = pool.fill(3)
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
    free = pool.fill(3)
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
    pool.fill(3)
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
    pool.fill(3)
    pool.bed.add_fault("nova", "GET", r"/servers/detail$", "hide", hide_regex=f"^{pool.prefix}")
    for _ in range(3):
        pool.run("reconcile")
    assert len(pool.vms("free")) == 3 and len(pool.servers()) == 3
    assert "lacks 3 of 3 known servers at once: treated as incomplete" in log_text(pool)


def test_a_clean_vm_dropped_after_two_listings_is_adopted_clean_when_it_shows_up_again(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1, "max": 2})
    (vm,) = pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free VM")
    pool.bed.add_fault("nova", "GET", r"/servers/detail$", "hide", hide_regex=f"^{vm['name']}$")
    pool.reconcile_until(
        lambda: vm["name"] not in {v["name"] for v in pool.vms()}, 60, "the VM dropped after two listings without it"
    )
    assert len(pool.servers()) <= 2
    pool.bed.clear_faults()
    back = pool.reconcile_until(
        lambda: [v for v in pool.vms("free") if v["server_id"] == vm["server_id"]],
        60,
        "the same server adopted and Free again",
    )
    assert back[0]["tainted"] is None
    assert len(pool.servers()) <= 2
