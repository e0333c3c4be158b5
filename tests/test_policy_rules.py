"""One test per policy rule that no other test could tell apart from its mutant (issue 17, item 12).

Each test names the rule it holds; docs/pending/mutants.md lists the mutant each one kills.
"""

from __future__ import annotations

import pytest

import vmpool as vp
from tests.policy_builders import HOST, NOW, config, health_state, kinds, live, queued, seen, server, vm
from vmpool import BUSY, FREE, UNUSABLE, CreateServer, DeleteServer, PoolState, ProbeResult, ProbeSsh, Vm

# --- what a listing proves ---


def test_a_listing_that_lacks_less_than_half_the_servers_is_believed_after_two_listings() -> None:
    """Only a listing that lacks half of the known servers or more is suspect (a down cell may
    hold half of them: see test_policy's down-cell tests)."""
    state = PoolState(pool="p", vms=[vm("a"), vm("b"), vm("c"), vm("d")])
    listing = seen(server("a"), server("b"), server("c"))
    for offset in (0, 60):
        state, actions = vp.plan_reconcile(state, listing, config(min=4), NOW + offset)
    assert [v.name for v in state.vms if v.reason != vp.CREATING] == ["a", "b", "c"]
    assert len(kinds(actions, CreateServer)) == 1 and "treated as incomplete" not in str(actions)


def test_servers_whose_delete_was_asked_for_may_leave_the_listing() -> None:
    """Their going is expected: it does not make a listing look incomplete."""
    state = PoolState(
        pool="p",
        vms=[
            vm("a"),
            vm("b", UNUSABLE, reason=vp.DELETING, delete_requested_at=NOW - 5),
            vm("c", UNUSABLE, reason=vp.DELETING, delete_requested_at=NOW - 5),
        ],
    )
    for offset in (0, 60):
        state, actions = vp.plan_reconcile(state, seen(server("a")), config(min=1), NOW + offset)
    assert [v.name for v in state.vms] == ["a"] and "treated as incomplete" not in str(actions)


def test_a_suspect_listing_drops_no_create_intent() -> None:
    creating = Vm(name="d", state=UNUSABLE, reason=vp.CREATING, since=NOW - 200, created_at=NOW - 200)
    state = PoolState(pool="p", vms=[vm("a"), vm("b"), vm("c"), creating])
    new, _ = vp.plan_reconcile(state, seen(), config(), NOW)  # past create_grace, but the listing lost many
    assert new.vm_named("d") is not None


def test_a_just_created_server_the_listing_does_not_show_yet_is_kept_through_create_grace() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.BUILDING, since=NOW - 5, healthy=False)])
    for offset in (0, 30, 60):  # create_grace 120 s
        state, _ = vp.plan_reconcile(state, seen(), config(), NOW + offset)
    assert state.vm_named("a") is not None and state.vm_named("a").absent_since is None


@pytest.mark.parametrize(("taint", "clean_again"), [("", True), ("scrub failed", False)])
def test_a_vm_dropped_after_two_listings_comes_back_as_clean_as_it_left(taint: str, clean_again: bool) -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE if taint else FREE, reason=taint, tainted=taint)])
    for offset in (0, 60):
        state, _ = vp.plan_reconcile(state, seen(), config(), NOW + offset)
    assert state.vms == []
    for offset in (120, 180):  # adopted on its second sighting
        state, _ = vp.plan_reconcile(state, seen(server("a")), config(), NOW + offset)
    assert bool(state.vm_named("a").tainted) != clean_again


def test_a_clean_drop_is_forgotten_after_a_day() -> None:
    state = PoolState(pool="p", dropped_clean={"x": NOW - vp.DROPPED_CLEAN_MAX_AGE - 1})
    for offset in (0, 60):
        state, _ = vp.plan_reconcile(state, seen(server("x")), config(), NOW + offset)
    assert state.vm_named("x").tainted


def test_a_server_adopted_in_error_is_deleted_at_once_and_fails_no_boot() -> None:
    state = PoolState(pool="p")
    for offset in (0, 60):
        state, actions = vp.plan_reconcile(state, seen(server("x", vp.SERVER_ERROR)), config(), NOW + offset)
    assert [d.name for d in kinds(actions, DeleteServer)] == ["x"]
    state, _ = vp.plan_reconcile(state, seen(server("x", vp.SERVER_ERROR)), config(), NOW + 120)
    assert state.health_of().boot_failures == 0


# --- jobs ---


@pytest.mark.parametrize(("offset", "given_up"), [(30, False), (60, False), (61, True)])
def test_a_job_that_looks_gone_keeps_its_vm_through_job_gone_grace(offset: float, given_up: bool) -> None:
    dead = seen(server("a"), dead_jobs=frozenset({"7"}))
    state, _ = vp.plan_reconcile(
        PoolState(pool="p", vms=[vm("a", BUSY, job="7")]), dead, config(job_gone_grace=60), NOW
    )
    later, actions = vp.plan_reconcile(state, dead, config(job_gone_grace=60), NOW + offset)
    assert bool(kinds(actions, DeleteServer)) == given_up and (later.vm_named("a").job is None) == given_up


def test_a_busy_vm_that_is_shut_off_is_deleted_only_once_its_job_let_it_go() -> None:
    shutoff = seen(server("a", vp.SERVER_DOWN))
    busy = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.SHUTOFF, since=NOW - 601, job="1")])
    new, actions = vp.plan_reconcile(busy, shutoff, config(), NOW)
    assert kinds(actions, DeleteServer) == [] and new.vm_named("a").job == "1"
    free = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.SHUTOFF, since=NOW - 601)])
    _, actions = vp.plan_reconcile(free, shutoff, config(), NOW)
    assert "shutoff for more than 600s" in kinds(actions, DeleteServer)[0].reason


def test_a_vm_tainted_under_its_job_is_neither_busy_again_nor_deleted_while_the_job_holds_it() -> None:
    """It vanished under its job, then Nova lists it ACTIVE again."""
    state = PoolState(
        pool="p", vms=[vm("a", UNUSABLE, reason=vp.VANISHED, tainted=vp.VANISHED, since=NOW - 601, job="1")]
    )
    new, actions = vp.plan_reconcile(state, seen(server("a")), config(), NOW)
    assert (new.vm_named("a").state, new.vm_named("a").job) == (UNUSABLE, "1") and kinds(actions, DeleteServer) == []


def test_a_re_run_prologue_s_acquire_keeps_the_job_s_request_alive() -> None:
    state, _ = vp.plan_acquire(PoolState(pool="p"), "1", "alice", NOW, 10, HOST, live(10))
    state, _ = vp.plan_acquire(state, "1", "alice", NOW + 5, 20, HOST, live(10, 20))
    pruned, _ = vp.plan_reconcile(state, seen(live_waiters=live(20)), config(), NOW + 10)  # pid 10 ended
    assert [(r.job, r.pid) for r in pruned.requests] == [("1", 20)]


def test_a_release_at_the_very_instant_the_attempt_began_ends_it() -> None:
    state, _ = vp.plan_release(PoolState(pool="p", vms=[vm("a")]), "5", NOW)
    _, outcome = vp.plan_acquire(state, "5", "alice", NOW, 10, HOST, live(10), started=NOW)
    assert outcome == vp.Ended(NOW)


def test_another_host_s_waiter_is_served_whatever_this_host_s_processes_say() -> None:
    state = PoolState(pool="p", vms=[vm("a")], requests=queued("1", host="other"))
    new, _ = vp.plan_hand_over(state, NOW, HOST, alive=lambda request: False)
    assert new.vm_named("a").job == "1"


# --- capacity and boots ---


def test_a_drained_busy_vm_is_not_capacity() -> None:
    """It goes once its job ends: its replacement may boot meanwhile."""
    state = PoolState(pool="p", vms=[vm("a"), vm("b", BUSY, job="1", drained="by x: r")])
    _, actions = vp.plan_reconcile(state, seen(server("a"), server("b")), config(min=2), NOW)
    assert len(kinds(actions, CreateServer)) == 1


def test_a_once_healthy_vm_that_fails_is_no_failed_boot() -> None:
    state = health_state(pool="p", boot_failures=2, vms=[vm("a")])
    new, actions = vp.plan_reconcile(state, seen(server("a", vp.SERVER_ERROR)), config(), NOW)
    assert (
        kinds(actions, DeleteServer) and new.health_of().boot_failures == 2 and new.health_of().protected_since is None
    )


def test_build_timeout_counts_from_the_create() -> None:
    """A server first seen building long after its create (the create call failed, the server came)."""
    late = Vm(name="a", state=UNUSABLE, reason=vp.CREATING, since=NOW - 601, created_at=NOW - 601)
    state = PoolState(pool="p", vms=[late])
    seen_building, _ = vp.plan_reconcile(state, seen(server("a", vp.SERVER_BUILDING)), config(), NOW - 10)
    _, actions = vp.plan_reconcile(seen_building, seen(server("a", vp.SERVER_BUILDING)), config(), NOW)
    assert "still building after 600s" in kinds(actions, DeleteServer)[0].reason


def test_only_a_never_healthy_vm_is_probed_as_a_first_contact() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.BUILDING, healthy=False), vm("b")])
    _, actions = vp.plan_reconcile(state, seen(server("a"), server("b")), config(), NOW)
    assert {p.name: p.first_contact for p in kinds(actions, ProbeSsh)} == {"a": True, "b": False}


def test_the_probe_of_a_vm_being_deleted_does_not_free_it() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.DELETING, delete_requested_at=NOW - 5)])
    new, _ = vp.plan_probed(state, [ProbeResult("a", True)], NOW)
    assert new.vm_named("a").state == UNUSABLE


def test_a_probe_never_replaces_a_pinned_host_key() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason="unreachable: timeout", host_keys=["ssh-ed25519 OLD"])])
    new, _ = vp.plan_probed(state, [ProbeResult("a", True, host_keys=("ssh-ed25519 NEW",))], NOW)
    assert new.vm_named("a").host_keys == ["ssh-ed25519 OLD"]


def test_only_a_first_boot_resets_the_failed_boot_count() -> None:
    state = health_state(pool="p", boot_failures=2, vms=[vm("a", UNUSABLE, reason="unreachable: timeout")])
    new, _ = vp.plan_probed(state, [ProbeResult("a", True)], NOW)  # an old VM answers again
    assert new.vm_named("a").state == FREE and new.health_of().boot_failures == 2


# --- create and delete outcomes ---


@pytest.mark.parametrize(("protected", "backoff_kept"), [(False, False), (True, True)])
def test_a_created_server_ends_the_back_off_except_in_protected_mode(protected: bool, backoff_kept: bool) -> None:
    """In protected mode the canary's boot, not its create, proves the cloud well."""
    state = health_state(
        pool="p",
        vms=[Vm("a", UNUSABLE, NOW, NOW, reason=vp.CREATING)],
        backoff_until=NOW + 60,
        backoff_delay=60,
        protected_since=NOW - 100 if protected else None,
    )
    new, _ = vp.plan_created(state, "a", "id-a", None, config().pool, NOW)
    assert (new.health_of().backoff_until is not None) == backoff_kept


def test_a_refused_create_withdraws_its_intent_and_backs_off() -> None:
    state = PoolState(pool="p", vms=[Vm("a", UNUSABLE, NOW, NOW, reason=vp.CREATING)])
    new, _ = vp.plan_created(state, "a", None, vp.CloudRefused("image not found"), config().pool, NOW)
    assert new.vms == [] and new.health_of().backing_off(NOW + 1)
    _, actions = vp.plan_reconcile(new, seen(), config(min=1), NOW + 1)
    assert kinds(actions, CreateServer) == []


def test_a_create_that_failed_otherwise_counts_a_failed_boot() -> None:
    state = health_state(pool="p", boot_failures=2, vms=[Vm("a", UNUSABLE, NOW, NOW, reason=vp.CREATING)])
    new, _ = vp.plan_created(state, "a", None, vp.CloudError("HTTP 500"), config().pool, NOW)
    assert new.health_of().boot_failures == 3 and new.health_of().protected_since == NOW


def test_the_back_off_grows_up_to_backoff_max() -> None:
    state = health_state(pool="p", backoff_delay=800)
    new, _ = vp.plan_created(state, "a", None, vp.QuotaExceeded("quota"), config().pool, NOW)
    assert new.health_of().backoff_delay == 900 and new.health_of().backoff_until == NOW + 900


def test_the_delete_outcome_of_an_older_server_of_the_same_name_is_ignored() -> None:
    state = PoolState(pool="p", vms=[vm("a")])
    new, _ = vp.plan_deleted(state, "a", vp.ServerGone("gone"), NOW, server_id="id-old")
    assert new.vm_named("a") is not None


# --- admin ---


def test_clearing_protected_mode_forgets_the_failed_boots() -> None:
    state = health_state(pool="p", protected_since=NOW - 100, boot_failures=5, backoff_until=NOW + 60, backoff_delay=60)
    cleared = vp.clear_protected_mode(state)
    assert (
        cleared.health_of().protected_since,
        cleared.health_of().boot_failures,
        cleared.health_of().backoff_until,
    ) == (None, 0, None)


def test_a_cleared_back_off_starts_again_from_backoff_initial() -> None:
    state = health_state(pool="p", backoff_until=NOW + 600, backoff_delay=600)
    cleared, _ = vp.plan_clear_backoff(state, by="x", reason="quota raised", now=NOW)
    again, _ = vp.plan_created(cleared, "a", None, vp.QuotaExceeded("quota"), config().pool, NOW + 1)
    assert again.health_of().backoff_delay == 60


# --- the clock ---


def test_the_recorded_clock_pair_is_refreshed_once_stale() -> None:
    state = PoolState(pool="p", clock={"wall": NOW, "boot": 500.0, "boot_id": "boot-1"})
    new, notes = vp.plan_clock(state, NOW + vp.CLOCK_REFRESH + 1, "boot-1", 500.0 + vp.CLOCK_REFRESH + 1)
    assert notes == [] and new.clock["wall"] == NOW + vp.CLOCK_REFRESH + 1


def test_a_clock_step_while_a_job_waits_is_not_counted_as_its_wait() -> None:
    state = PoolState(pool="p", clock={"wall": NOW, "boot": 500.0, "boot_id": "boot-1"})
    state, _ = vp.plan_acquire(state, "5", "alice", NOW, 10, HOST, live(10))
    state, _ = vp.plan_clock(state, NOW + 20 + 3600, "boot-1", 520.0)  # 20 s later, the wall clock 1 h on
    state.vms.append(vm("a"))
    state, outcome = vp.plan_acquire(state, "5", "alice", NOW + 20 + 3600, 10, HOST, live(10))
    assert isinstance(outcome, vp.Claimed) and state.acquire_wait["sum"] == pytest.approx(20)


def test_a_backward_clock_step_does_not_stretch_the_back_off() -> None:
    state = health_state(
        pool="p", backoff_until=NOW + 60, backoff_delay=60, clock={"wall": NOW, "boot": 500.0, "boot_id": "boot-1"}
    )
    state, _ = vp.plan_clock(state, NOW + 61 - 3600, "boot-1", 561.0)  # 61 real seconds later
    _, actions = vp.plan_reconcile(state, seen(), config(min=1), NOW + 61 - 3600)
    assert len(kinds(actions, CreateServer)) == 1
