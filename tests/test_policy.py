"""The pure pool policy: (state, observation, config, now) -> (state', actions). No I/O."""

from __future__ import annotations

import dataclasses
import logging

import pytest

import vmpool as vp
from tests.policy_builders import HOST, NOW, config, health_state, kinds, live, queued, seen, server, the, vm
from vmpool import (
    BUSY,
    FREE,
    UNUSABLE,
    CreateServer,
    DeleteServer,
    Note,
    Observation,
    PoolState,
    ProbeResult,
    ProbeSsh,
    Server,
    Vm,
)

# --- acquire / release ---


def test_acquire_claims_the_most_recently_freed_vm() -> None:
    state = PoolState(pool="p", vms=[vm("a", since=NOW - 50), vm("b", since=NOW - 5)])
    new, outcome = vp.plan_acquire(state, "1.srv", "alice", NOW, pid=10, host=HOST, live_waiters=frozenset())
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "b"
    assert new.vm_named("b").state == BUSY and new.vm_named("b").job == "1.srv"
    assert new.requests == [] and state.vm_named("b").state == FREE  # input untouched


def test_acquire_is_idempotent_for_the_same_job() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1"), vm("b")])
    _, outcome = vp.plan_acquire(state, "1", "alice", NOW, 10, HOST, frozenset())
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "a"


def test_acquire_queues_when_nothing_is_free_and_serves_first_come_first() -> None:
    state = PoolState(pool="p")
    state, first = vp.plan_acquire(state, "1", "alice", NOW, 10, HOST, live(10))
    state, second = vp.plan_acquire(state, "2", "bob", NOW + 1, 11, HOST, live(10, 11))
    assert first == vp.Waiting(0) and second == vp.Waiting(1)
    state.vms.append(vm("a"))
    state, outcome = vp.plan_acquire(state, "2", "bob", NOW + 2, 11, HOST, live(10, 11))
    assert outcome == vp.Waiting(1), "job 2 must not overtake job 1"
    state, outcome = vp.plan_acquire(state, "1", "alice", NOW + 2, 10, HOST, live(10, 11))
    assert isinstance(outcome, vp.Claimed)
    assert [r.job for r in state.requests] == ["2"]


def test_requests_of_dead_acquire_processes_do_not_block_the_queue() -> None:
    state = PoolState(pool="p", vms=[vm("a")], requests=[vp.Request("1", "alice", NOW - 9, 10, HOST)])
    _, outcome = vp.plan_acquire(state, "2", "bob", NOW, 11, HOST, live_waiters=live(11))
    assert isinstance(outcome, vp.Claimed)


def test_requests_from_another_host_are_not_pruned_by_pid() -> None:
    state = PoolState(pool="p", requests=[vp.Request("1", "alice", NOW - 9, 10, "other")])
    new, outcome = vp.plan_acquire(state, "2", "bob", NOW, 11, HOST, live_waiters=live(11))
    assert outcome == vp.Waiting(1) and len(new.requests) == 2


def test_freed_vms_are_handed_to_the_head_of_the_queue_in_order() -> None:
    state = PoolState(
        pool="p",
        vms=[vm("a", since=NOW - 50), vm("b", since=NOW - 5), vm("c", BUSY, job="9")],
        requests=queued("1", "2", "3"),
    )
    new, notes = vp.plan_hand_over(state, NOW, HOST, alive=lambda request: True)
    assert (new.vm_named("b").job, new.vm_named("a").job) == ("1", "2"), "most recently freed to the first in line"
    assert all(new.vm_named(name).state == BUSY and new.vm_named(name).user == "bob" for name in "ab")
    assert [r.job for r in new.requests] == ["3"] and [r.job for r in new.handed] == ["1", "2"]
    assert new.counters["acquires"] == 2 and new.acquire_wait["count"] == 2
    assert [n.message.split(" handed to ")[1].split()[1] for n in notes] == ["1", "2"]
    assert state.vm_named("b").state == FREE and len(state.requests) == 3  # input untouched


def test_a_dead_waiter_of_this_host_is_pruned_not_handed_a_vm_and_another_host_s_is_served() -> None:
    state = PoolState(pool="p", vms=[vm("a")], requests=queued("1") + queued("2", host="other")[:1])
    new, _ = vp.plan_hand_over(state, NOW, HOST, alive=lambda request: request.job != "1")
    assert new.vm_named("a").job == "2" and new.requests == []


def test_nothing_is_handed_to_an_ended_job_or_to_one_that_still_holds_a_vm() -> None:
    state = PoolState(
        pool="p", vms=[vm("a"), vm("x", UNUSABLE, job="2")], requests=queued("1", "2", "3"), ended_jobs={"1": NOW - 1}
    )
    new, _ = vp.plan_hand_over(state, NOW, HOST, alive=lambda request: True)
    assert new.vm_named("a").job == "3" and [r.job for r in new.requests] == ["1", "2"]


def test_a_waiter_takes_the_vm_handed_to_it_as_not_already_held() -> None:
    state, _ = vp.plan_hand_over(
        PoolState(pool="p", vms=[vm("a")], requests=queued("1")), NOW, HOST, alive=lambda request: True
    )
    new, outcome = vp.plan_acquire(state, "1", "bob", NOW + 1, 100, HOST, live(100))
    assert outcome == vp.Claimed(the(new, "a"), already_held=False, handed=True) and new.handed == []
    # the next run of its prologue finds it held: it may have prepared it
    _, again = vp.plan_acquire(new, "1", "bob", NOW + 2, 200, HOST, live(200))
    assert again == vp.Claimed(the(new, "a"), already_held=True, handed=False)


def test_a_handed_vm_its_waiter_never_took_is_free_again_when_the_waiter_gives_up_or_dies() -> None:
    state, _ = vp.plan_hand_over(
        PoolState(pool="p", vms=[vm("a")], requests=queued("1")), NOW, HOST, alive=lambda request: True
    )
    withdrawn = vp.withdraw_request(state, "1", NOW + 1)
    assert withdrawn.vm_named("a").state == FREE and withdrawn.vm_named("a").job is None and withdrawn.handed == []
    pruned, _ = vp.plan_acquire(state, "2", "carol", NOW + 1, 300, HOST, live_waiters=live(300))
    assert pruned.vm_named("a").job == "2" and pruned.handed == [], "the dead waiter's VM went to the next job"
    elsewhere, _ = vp.plan_acquire(state, "2", "carol", NOW + 1, 300, "other-node", live_waiters=live(300))
    assert elsewhere.vm_named("a").job == "1", "another host's waiter cannot be asked: its VM stays handed"


def test_the_job_s_release_while_its_vm_is_handed_frees_it() -> None:
    state, _ = vp.plan_hand_over(
        PoolState(pool="p", vms=[vm("a")], requests=queued("1")), NOW, HOST, alive=lambda request: True
    )
    new, _ = vp.plan_release(state, "1", NOW + 1)
    assert new.vm_named("a").state == FREE and new.handed == [] and new.ended_jobs["1"] == NOW + 1


def test_a_job_released_as_unusable_while_its_vm_is_handed_over_gives_it_back_free() -> None:
    """The epilogue of a job deleted before its prologue took the VM finds no record of it and
    releases as unusable: the VM was never touched, it stays in service."""
    state, _ = vp.plan_hand_over(
        PoolState(pool="p", vms=[vm("a")], requests=queued("1")), NOW, HOST, alive=lambda request: True
    )
    new, _ = vp.plan_release(state, "1", NOW + 1, unusable="epilogue: no job record")
    assert new.vm_named("a").state == FREE and not new.vm_named("a").tainted and new.handed == []
    taken, _ = vp.plan_acquire(state, "1", "bob", NOW + 1, 100, HOST, live(100))
    after, _ = vp.plan_release(taken, "1", NOW + 2, unusable="epilogue: no job record")
    assert after.vm_named("a").state == UNUSABLE and after.vm_named("a").tainted, "taken: it may be dirty"


def test_a_waiter_whose_handed_vm_failed_before_it_took_it_keeps_its_place() -> None:
    state, _ = vp.plan_hand_over(
        PoolState(pool="p", vms=[vm("a")], requests=queued("1", "2", "3")), NOW, HOST, alive=lambda request: True
    )
    state.vm_named("a").state, state.vm_named("a").reason = UNUSABLE, vp.ERROR_REASON  # it failed meanwhile
    new, outcome = vp.plan_acquire(state, "1", "bob", NOW + 5, 100, HOST, live(100, 101, 102))
    assert isinstance(outcome, vp.Waiting) and outcome.position == 0
    assert [r.job for r in new.requests] == ["1", "2", "3"]
    assert new.requests[0].since == NOW - 30, "its place and its wait so far are kept"


def test_requests_that_take_no_vm_in_their_turn_do_not_count_as_ahead() -> None:
    """The same rule as the hand-over's: an ended job's request, or one whose job holds a VM."""
    state = PoolState(
        pool="p", vms=[vm("a"), vm("x", BUSY, job="2")], requests=queued("1", "2", "3"), ended_jobs={"1": NOW - 1}
    )
    state.vm_named("x").user = "bob"
    _, outcome = vp.plan_acquire(state, "3", "bob", NOW, 102, HOST, live(100, 101, 102))
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "a"
    assert vp.vms_still_to_free(state, "3", 102, HOST) == 0


def test_a_handed_vm_whose_address_changed_is_probed_before_it_is_free_again() -> None:
    state, _ = vp.plan_hand_over(
        PoolState(pool="p", vms=[vm("a")], requests=queued("1")), NOW, HOST, alive=lambda request: True
    )
    state.vm_named("a").host_keys = []  # a new address: the pinned key went with the old one
    new = vp.withdraw_request(state, "1", NOW + 1)
    a = new.vm_named("a")
    assert a.state == UNUSABLE and a.reason.startswith(vp.UNREACHABLE) and a.job is None and a.last_job is None


def test_the_state_file_has_no_handed_list_while_it_is_empty() -> None:
    """An older vmpool, which knows no hand-over, still reads it (a downgrade, an acquire of the
    old version still waiting through the upgrade)."""
    import json

    empty = PoolState(pool="p", vms=[vm("a")], requests=queued("1"))
    assert "handed" not in json.loads(vp.state_text(empty)) and "handed" not in vp.state_to_json(empty)
    handed, _ = vp.plan_hand_over(empty, NOW, HOST, alive=lambda request: True)
    assert [r["job"] for r in json.loads(vp.state_text(handed))["handed"]] == ["1"]
    assert vp.state_from_json(json.loads(vp.state_text(handed)), "s", "p").handed == handed.handed


def test_release_frees_the_vm() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1")])
    new, _ = vp.plan_release(state, "1", NOW)
    a = new.vm_named("a")
    assert (a.state, a.job, a.last_job, a.since) == (FREE, None, "1", NOW)


def test_release_unusable_taints_for_good() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1")])
    new, _ = vp.plan_release(state, "1", NOW, unusable="scrub failed: rm")
    a = new.vm_named("a")
    assert a.state == UNUSABLE and a.tainted == "scrub failed: rm"
    # a later successful probe does not bring it back
    probed, _ = vp.plan_probed(new, [ProbeResult("a", True)], NOW + 1)
    assert probed.vm_named("a").state == UNUSABLE


def test_release_of_unknown_job_is_a_warning_only() -> None:
    state = PoolState(pool="p", vms=[vm("a")])
    new, actions = vp.plan_release(state, "9", NOW)
    assert new.vms == state.vms and kinds(actions, Note)[0].level == logging.WARNING
    assert new.ended_jobs == {"9": NOW}, "a release is the job's end: a late prologue of it gets nothing"


def test_release_twice_does_not_free_a_vm_claimed_in_between() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1")])
    state, _ = vp.plan_release(state, "1", NOW)
    state, _ = vp.plan_acquire(state, "2", "bob", NOW, 11, HOST, live(11))
    state, _ = vp.plan_release(state, "1", NOW)
    assert state.vm_named("a").job == "2" and state.vm_named("a").state == BUSY


# --- reconcile: per-VM decisions ---


@pytest.mark.parametrize(
    ("status", "age", "expect_delete", "reason"),
    [
        (vp.SERVER_BUILDING, 10, False, vp.BUILDING),
        (vp.SERVER_BUILDING, 601, True, vp.DELETING),
        (vp.SERVER_ERROR, 1, True, vp.DELETING),
        (vp.SERVER_DOWN, 10, False, vp.SHUTOFF),
    ],
)
def test_server_status_decides(status: str, age: float, expect_delete: bool, reason: str) -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.BUILDING, since=NOW - age, healthy=False)])
    new, actions = vp.plan_reconcile(state, seen(server("a", status)), config(), NOW)
    assert bool(kinds(actions, DeleteServer)) == expect_delete
    assert new.vm_named("a").reason == reason


def test_error_at_build_counts_a_failed_boot_and_protects_after_n() -> None:
    state = health_state(pool="p", boot_failures=2, vms=[vm("a", UNUSABLE, reason=vp.BUILDING, healthy=False)])
    new, actions = vp.plan_reconcile(
        state, seen(server("a", vp.SERVER_ERROR, fault="No valid host")), config(min=2), NOW
    )
    assert new.health_of().boot_failures == 3 and new.health_of().protected_since == NOW
    assert "No valid host" in kinds(actions, DeleteServer)[0].reason
    # protected: nothing more now; after the back-off one canary, not the whole shortfall
    assert kinds(actions, CreateServer) == [] and new.health_of().backoff_until == NOW + 60
    gone, _ = vp.plan_reconcile(new, seen(), config(min=2), NOW + 30)
    assert kinds(vp.plan_reconcile(gone, seen(), config(min=2), NOW + 30)[1], CreateServer) == []
    _, later = vp.plan_reconcile(gone, seen(), config(min=2), NOW + 61)
    assert len(kinds(later, CreateServer)) == 1


def test_failed_canary_backs_off_longer_no_create_delete_loop() -> None:
    state = health_state(
        pool="p",
        protected_since=NOW - 100,
        boot_failures=3,
        backoff_delay=60,
        vms=[vm("a", UNUSABLE, reason=vp.BUILDING, healthy=False)],
    )
    new, actions = vp.plan_reconcile(state, seen(server("a", vp.SERVER_ERROR)), config(min=1), NOW)
    assert (
        kinds(actions, CreateServer) == []
        and new.health_of().backoff_delay == 120
        and new.health_of().backoff_until == NOW + 120
    )


def test_protected_mode_waits_for_the_canary() -> None:
    state = health_state(
        pool="p", protected_since=NOW - 5, boot_failures=3, vms=[vm("a", UNUSABLE, reason=vp.BUILDING, healthy=False)]
    )
    _, actions = vp.plan_reconcile(state, seen(server("a", vp.SERVER_BUILDING)), config(min=3), NOW)
    assert kinds(actions, CreateServer) == []


def test_first_successful_probe_clears_protected_mode() -> None:
    state = health_state(
        pool="p",
        protected_since=NOW - 5,
        boot_failures=3,
        vms=[vm("a", UNUSABLE, reason=vp.UNREACHABLE, healthy=False)],
    )
    new, _ = vp.plan_probed(state, [ProbeResult("a", True, host_keys=("ssh-ed25519 AAAA",))], NOW)
    assert new.health_of().protected_since is None and new.health_of().boot_failures == 0
    assert new.vm_named("a").state == FREE and new.vm_named("a").host_keys == ["ssh-ed25519 AAAA"]


def test_active_server_gets_probed_and_unreachable_counts_from_first_failure() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.BUILDING, since=NOW - 100, healthy=False)])
    new, actions = vp.plan_reconcile(state, seen(server("a")), config(), NOW)
    assert kinds(actions, ProbeSsh)[0].address == "127.0.1.2"
    assert new.vm_named("a").since == NOW  # the ready clock starts at ACTIVE
    new, _ = vp.plan_probed(new, [ProbeResult("a", False, "connection refused")], NOW + 5)
    new, _ = vp.plan_probed(new, [ProbeResult("a", False, "timeout")], NOW + 9)
    assert new.vm_named("a").since == NOW and new.vm_named("a").reason == "unreachable: timeout"


def test_never_ready_vm_deleted_after_ready_timeout() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason="unreachable: refused", since=NOW - 301, healthy=False)])
    new, actions = vp.plan_reconcile(state, seen(server("a")), config(), NOW)
    assert "not reachable" in kinds(actions, DeleteServer)[0].reason and new.health_of().boot_failures == 1


def test_free_vm_that_stops_answering_is_unusable_then_deleted_after_unusable_timeout() -> None:
    state = PoolState(pool="p", vms=[vm("a", since=NOW - 1000)])
    new, _ = vp.plan_probed(state, [ProbeResult("a", False, "connection refused")], NOW)
    assert new.vm_named("a").state == UNUSABLE and new.vm_named("a").since == NOW
    _, actions = vp.plan_reconcile(new, seen(server("a")), config(), NOW + 100)
    assert kinds(actions, DeleteServer) == [] and kinds(actions, ProbeSsh)
    _, actions = vp.plan_reconcile(new, seen(server("a")), config(), NOW + 601)
    assert "unreachable for more than" in kinds(actions, DeleteServer)[0].reason


def test_host_key_change_taints() -> None:
    state = PoolState(pool="p", vms=[vm("a", host_keys=["ssh-ed25519 AAAA"])])
    new, _ = vp.plan_probed(state, [ProbeResult("a", False, "x", host_key_changed=True)], NOW)
    assert new.vm_named("a").tainted == "host key changed"


def test_probe_results_ignore_vms_claimed_meanwhile() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1")])
    new, _ = vp.plan_probed(state, [ProbeResult("a", False, "refused")], NOW)
    assert new.vm_named("a").state == BUSY


def test_busy_vms_are_never_probed_nor_free_when_probe_free_is_off() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1"), vm("b")])
    _, actions = vp.plan_reconcile(state, seen(server("a"), server("b"), probe_free=False), config(), NOW)
    assert kinds(actions, ProbeSsh) == []
    _, actions = vp.plan_reconcile(state, seen(server("a"), server("b")), config(), NOW)
    assert [p.name for p in kinds(actions, ProbeSsh)] == ["b"]


def test_busy_vm_whose_server_vanished_is_logged_with_its_job() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="42.srv")])
    once, actions = vp.plan_reconcile(state, seen(), config(), NOW)
    assert once.vm_named("a").state == BUSY and actions == [], "one listing without it proves nothing"
    new, actions = vp.plan_reconcile(once, seen(), config(), NOW + 60)
    assert new.vm_named("a").state == UNUSABLE and new.vm_named("a").job == "42.srv"
    assert any(n.level == logging.ERROR and "42.srv" in n.message for n in kinds(actions, Note))
    released, _ = vp.plan_release(new, "42.srv", NOW + 1)
    after, _ = vp.plan_reconcile(released, seen(), config(), NOW + 2)
    assert after.vms == []


def test_free_vm_deleted_behind_our_back_is_dropped() -> None:
    state = PoolState(pool="p", vms=[vm("a")])
    once, _ = vp.plan_reconcile(state, seen(), config(), NOW)
    assert once.vm_named("a") is not None
    new, _ = vp.plan_reconcile(once, seen(), config(), NOW + 60)
    assert new.vms == []


def test_stuck_delete_is_reissued_after_delete_timeout_and_dropped_when_gone() -> None:
    a = vm("a", UNUSABLE, reason=vp.DELETING, delete_requested_at=NOW - 301)
    state = PoolState(pool="p", vms=[a])
    new, actions = vp.plan_reconcile(state, seen(server("a")), config(), NOW)
    assert kinds(actions, DeleteServer) and new.vm_named("a").delete_requested_at == NOW
    _, actions = vp.plan_reconcile(new, seen(server("a")), config(), NOW + 10)
    assert kinds(actions, DeleteServer) == []
    once, _ = vp.plan_reconcile(new, seen(), config(), NOW + 20)
    gone, _ = vp.plan_reconcile(once, seen(), config(), NOW + 30)
    assert gone.vms == []


def test_creating_record_binds_by_name_or_is_dropped_after_grace() -> None:
    creating = Vm(name="a", state=UNUSABLE, reason=vp.CREATING, since=NOW - 5, created_at=NOW - 5)
    state = PoolState(pool="p", vms=[creating])
    bound, _ = vp.plan_reconcile(state, seen(server("a", vp.SERVER_BUILDING)), config(), NOW)
    assert bound.vm_named("a").server_id == "id-a" and bound.vm_named("a").reason == vp.BUILDING
    kept, _ = vp.plan_reconcile(state, seen(), config(), NOW)
    assert kept.vm_named("a") is not None
    dropped, _ = vp.plan_reconcile(state, seen(), config(), NOW + 200)
    assert dropped.vm_named("a") is None


def test_orphan_with_the_tag_adopted_only_on_second_sighting() -> None:
    state = PoolState(pool="p")
    once, actions = vp.plan_reconcile(state, seen(server("x")), config(), NOW)
    assert once.vms == [] and "id-x" in once.orphans
    assert any("carries the pool's tag" in note.message for note in kinds(actions, Note))
    twice, _ = vp.plan_reconcile(once, seen(server("x")), config(), NOW + 60)
    assert twice.vm_named("x").server_id == "id-x" and twice.orphans == {}
    gone, _ = vp.plan_reconcile(once, seen(), config(), NOW + 60)
    assert gone.orphans == {} and gone.vms == []


def test_listing_failure_decides_nothing_about_servers() -> None:
    state = PoolState(pool="p", vms=[vm("a")])
    new, actions = vp.plan_reconcile(state, Observation(servers=None, host=HOST), config(min=3), NOW)
    assert actions == [] and new.vms == state.vms


# --- reconcile: scaling ---


@pytest.mark.parametrize(
    ("pool", "vms", "waiting", "creates"),
    [
        (dict(min=2), [], 0, 2),
        (dict(min=0, min_free=1), [], 0, 1),
        (dict(min=0, max=3), [], 5, 3),
        (dict(min=0, max=3), ["busy", "busy"], 5, 1),
        (dict(min=0, max=4), ["booting"], 1, 0),  # a boot in progress already covers the request
        (dict(min=0, max=4), ["booting"], 2, 1),
        (dict(min=0, max=2), ["tainted", "busy"], 1, 0),  # tainted VMs hold a slot until deleted
    ],
)
def test_scale_up(pool: dict, vms: list[str], waiting: int, creates: int) -> None:
    records = []
    for index, kind in enumerate(vms):
        if kind == "busy":
            records.append(vm(f"v{index}", BUSY, job=f"{index}"))
        elif kind == "booting":
            records.append(vm(f"v{index}", UNUSABLE, reason=vp.BUILDING, healthy=False))
        else:
            records.append(vm(f"v{index}", UNUSABLE, reason="scrub failed", tainted="scrub failed"))
    requests = [vp.Request(f"r{i}", "u", NOW, 100 + i, "elsewhere") for i in range(waiting)]
    state = PoolState(pool="p", vms=records, requests=requests)
    statuses = {"booting": vp.SERVER_BUILDING}
    listed = [server(r.name, statuses.get(kind, vp.SERVER_ACTIVE)) for r, kind in zip(records, vms, strict=True)]
    new, actions = vp.plan_reconcile(state, seen(*listed), config(**pool), NOW)
    created = kinds(actions, CreateServer)
    assert len(created) == creates
    # intents are recorded before any cloud call, with unique names
    names = [c.name for c in created]
    assert len(set(names)) == len(names)
    assert all(new.vm_named(n).reason == vp.CREATING for n in names)


def test_quota_refusal_backs_off_with_a_growing_delay() -> None:
    state = PoolState(pool="p", vms=[Vm("a", UNUSABLE, NOW, NOW, reason=vp.CREATING)])
    pool = config().pool
    new, _ = vp.plan_created(state, "a", None, vp.QuotaExceeded("quota"), pool, NOW)
    assert new.vms == [] and new.health_of().backoff_until == NOW + 60
    again, _ = vp.plan_created(new, "b", None, vp.QuotaExceeded("quota"), pool, NOW + 61)
    assert again.health_of().backoff_delay == 120
    _, actions = vp.plan_reconcile(new, seen(), config(min=1), NOW + 30)
    assert kinds(actions, CreateServer) == []


@pytest.mark.parametrize(("retry_after", "delay"), [(0, 60), (45, 60), (300, 300), (5000, 900)])
def test_a_limit_refusal_backs_off_at_least_its_retry_after_up_to_backoff_max(retry_after: float, delay: float) -> None:
    state = PoolState(pool="p", vms=[Vm("a", UNUSABLE, NOW, NOW, reason=vp.CREATING)])
    new, _ = vp.plan_created(state, "a", None, vp.QuotaExceeded("429", retry_after), config().pool, NOW)
    assert (new.health_of().backoff_delay, new.health_of().backoff_until) == (delay, NOW + delay)
    assert new.health_of().boot_failures == 0 and new.health_of().protected_since is None and new.vms == []


def test_other_create_errors_keep_the_intent() -> None:
    state = PoolState(pool="p", vms=[Vm("a", UNUSABLE, NOW, NOW, reason=vp.CREATING)])
    new, _ = vp.plan_created(state, "a", None, vp.CloudError("HTTP 500"), config().pool, NOW)
    assert new.vm_named("a") is not None and new.last_cloud_error == "HTTP 500"


def test_scale_down_deletes_longest_idle_free_vms_above_desired_not_below_min() -> None:
    state = PoolState(
        pool="p",
        vms=[vm("a", since=NOW - 4000), vm("b", since=NOW - 2000), vm("c", since=NOW - 10), vm("d", BUSY, job="1")],
    )
    listed = seen(*(server(n) for n in "abcd"), probe_free=False)
    _, actions = vp.plan_reconcile(state, listed, config(min=1), NOW)
    assert [d.name for d in kinds(actions, DeleteServer)] == ["a", "b"]
    _, actions = vp.plan_reconcile(state, listed, config(min=3), NOW)
    assert [d.name for d in kinds(actions, DeleteServer)] == ["a"]


def test_lost_epilogue_vm_deleted_after_grace_never_reused() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="7")])
    first, _ = vp.plan_reconcile(state, seen(server("a"), dead_jobs=frozenset({"7"})), config(job_gone_grace=60), NOW)
    assert first.vm_named("a").state == BUSY
    later, actions = vp.plan_reconcile(
        first, seen(server("a"), dead_jobs=frozenset({"7"})), config(job_gone_grace=60), NOW + 61
    )
    assert kinds(actions, DeleteServer) and later.vm_named("a").tainted
    back, _ = vp.plan_reconcile(first, seen(server("a")), config(job_gone_grace=60), NOW + 61)
    assert back.vm_named("a").job_missing_since is None


@pytest.mark.parametrize("absent", [False, True], ids=["listed", "vanished"])
def test_lost_epilogue_grace_runs_out_while_jobs_wait(absent: bool) -> None:
    """A waiting acquire's passes do not ask the batch system (dead_jobs None): no news, so the
    grace that cron's passes started runs on; it used to restart at every waiting pass."""
    pool = config(job_gone_grace=600, max=2, unusable_timeout=10_000)
    state = PoolState(
        pool="p",
        vms=[vm("a", BUSY, job="7"), vm("b", UNUSABLE, reason=vp.BUILDING, healthy=False)],
        requests=[vp.Request(job="8", user="bob", since=NOW, pid=11, host=HOST)],
    )
    listing = [server("b", vp.SERVER_BUILDING)] + ([] if absent else [server("a")])
    tainted_at = None
    for second in range(0, 1800, 30):  # cron's pass every minute, a waiting pass between them
        cron = second % 60 == 0
        observed = seen(*listing, live_waiters=live(11), probe_free=cron, dead_jobs=frozenset({"7"}) if cron else None)
        state, _ = vp.plan_reconcile(state, observed, pool, NOW + second)
        if state.vm_named("a") is None or state.vm_named("a").job is None:
            tainted_at = second
            break
    assert tainted_at is not None, "the lost epilogue was never noticed while a job waited"
    assert 600 <= tainted_at <= 720


def test_a_batch_system_without_an_answer_neither_starts_nor_ends_the_grace() -> None:
    pool = config(job_gone_grace=60)
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="7")])
    gone, _ = vp.plan_reconcile(state, seen(server("a"), dead_jobs=frozenset({"7"})), pool, NOW)
    unsure, _ = vp.plan_reconcile(gone, seen(server("a"), unsure_jobs=frozenset({"7"})), pool, NOW + 30)
    assert unsure.vm_named("a").job_missing_since == NOW, "no answer is not an answer that the job lives"
    later, actions = vp.plan_reconcile(unsure, seen(server("a"), dead_jobs=frozenset({"7"})), pool, NOW + 61)
    assert kinds(actions, DeleteServer) and later.vm_named("a").tainted
    fresh, _ = vp.plan_reconcile(state, seen(server("a"), unsure_jobs=frozenset({"7"})), pool, NOW)
    assert fresh.vm_named("a").job_missing_since is None


def test_new_address_drops_pinned_keys() -> None:
    state = PoolState(pool="p", vms=[vm("a", host_keys=["ssh-ed25519 AAAA"])])
    new, _ = vp.plan_reconcile(state, seen(server("a", address="127.0.1.9")), config(), NOW)
    assert new.vm_named("a").host_keys == [] and new.vm_named("a").address == "127.0.1.9"


# --- small pure helpers ---


@pytest.mark.parametrize(
    ("job", "ok"),
    [
        ("123", True),
        ("123.server.domain", True),
        ("123[4].server", True),
        ("123[]", True),
        ("", False),
        ("abc", False),
        ("1;rm -rf /", False),
        ("1 2", False),
        ("../1", False),
        ("1.$(id)", False),
        ("1\n2", False),
        ("1.-x", False),
    ],
)
def test_job_ids(job: str, ok: bool) -> None:
    if ok:
        assert vp.validate_job_id(job) == job
    else:
        with pytest.raises(vp.BadInput):
            vp.validate_job_id(job)


@pytest.mark.parametrize(
    ("user", "ok"),
    [
        ("alice", True),
        ("_svc", True),
        ("a.b-c", True),
        ("-x", False),
        ("a b", False),
        ("a;b", False),
        ("../x", False),
        ("", False),
        ("x" * 33, False),
    ],
)
def test_user_names(user: str, ok: bool) -> None:
    if ok:
        assert vp.validate_user_name(user) == user
    else:
        with pytest.raises(vp.BadInput):
            vp.validate_user_name(user)


def test_host_keys_from_console_takes_the_last_block() -> None:
    console = (
        "boot\n-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 OLD root@x\n-----END SSH HOST KEY KEYS-----\n"
        "reboot\nci-info: -----BEGIN SSH HOST KEY KEYS-----\n"
        "ci-info: ecdsa-sha2-nistp256 AAAAE2 root@vm\nci-info: ssh-ed25519 AAAAC3 root@vm\n"
        "ci-info: -----END SSH HOST KEY KEYS-----\n"
    )
    assert vp.host_keys_from_console(console) == ["ecdsa-sha2-nistp256 AAAAE2", "ssh-ed25519 AAAAC3"]
    assert vp.host_keys_from_console("no keys here") == []


def test_nova_status_translation() -> None:
    assert vp.server_status_from_nova("ACTIVE", None) == vp.SERVER_ACTIVE
    assert vp.server_status_from_nova("ACTIVE", "deleting") == vp.SERVER_DELETING
    assert vp.server_status_from_nova("SHUTOFF", None) == vp.SERVER_DOWN
    assert vp.server_status_from_nova("MIGRATING", None) == vp.SERVER_OTHER


def test_known_hosts_lists_pinned_live_vms_only() -> None:
    state = PoolState(
        pool="p",
        vms=[
            vm("a", host_keys=["ssh-ed25519 AAAA"]),
            vm("b", address="127.0.1.3", host_keys=["ssh-ed25519 BBBB"], delete_requested_at=NOW),
        ],
    )
    assert vp.known_hosts_text(state, 22) == "127.0.1.2 ssh-ed25519 AAAA\n"
    assert vp.known_hosts_text(state, 2222) == "[127.0.1.2]:2222 ssh-ed25519 AAAA\n"


def test_explain_no_vm_names_the_reasons() -> None:
    state = health_state(
        pool="p",
        vms=[vm(f"v{i}", BUSY, job=str(i)) for i in range(4)],
        backoff_until=NOW + 60,
        last_cloud_error="quota exceeded",
        last_cloud_error_at=NOW - 5,
    )
    text = vp.explain_no_vm(state, config().pool, NOW)
    assert "pool at max (4 of 4" in text and "backing off" in text and "quota exceeded" in text


def test_state_roundtrips_through_json() -> None:
    state = PoolState(
        pool="p", vms=[vm("a", BUSY, job="1")], requests=[vp.Request("2", "b", NOW, 1, HOST)], orphans={"x": NOW}
    )
    data = vp.state_to_json(state)
    assert vp.state_from_json(data, "f", "p") == state
    assert dataclasses.asdict(state)["vms"][0]["job"] == "1"


def test_not_created_withdraws_only_unsent_intents() -> None:
    state = PoolState(
        pool="p", vms=[Vm("a", UNUSABLE, NOW, NOW, reason=vp.CREATING), vm("b", UNUSABLE, reason=vp.BUILDING)]
    )
    new = vp.plan_not_created(state, ["a", "b"])
    assert [v.name for v in new.vms] == ["b"]


# --- regressions found in review ---


def test_vm_still_waiting_for_ssh_counts_as_coming_capacity() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason="unreachable: connection refused", healthy=False)])
    _, actions = vp.plan_reconcile(state, seen(server("a")), config(min=1), NOW)
    assert kinds(actions, CreateServer) == []


def test_a_job_never_holds_two_vms_and_release_takes_back_all() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.SHUTOFF, job="1"), vm("b")])
    new, outcome = vp.plan_acquire(state, "1", "alice", NOW, 10, HOST, live(10))
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "b"
    assert new.vm_named("a").job is None and new.vm_named("a").tainted
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.SHUTOFF, job="1"), vm("b", BUSY, job="1")])
    released, _ = vp.plan_release(state, "1", NOW)
    assert released.vm_of_job("1") is None
    assert released.vm_named("a").tainted and released.vm_named("b").state == FREE


def test_busy_vm_back_from_migration_is_busy_again() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1")])
    moving, _ = vp.plan_reconcile(state, seen(server("a", vp.SERVER_OTHER)), config(), NOW)
    assert moving.vm_named("a").state == UNUSABLE
    back, _ = vp.plan_reconcile(moving, seen(server("a")), config(), NOW + 5)
    assert (back.vm_named("a").state, back.vm_named("a").job) == (BUSY, "1")


def test_lost_epilogue_clock_does_not_carry_over_to_the_next_job() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="7", job_missing_since=NOW - 900)])
    released, _ = vp.plan_release(state, "7", NOW)
    claimed, _ = vp.plan_acquire(released, "8", "bob", NOW, 11, HOST, live(11))
    _, actions = vp.plan_reconcile(
        claimed, seen(server("a"), dead_jobs=frozenset({"8"})), config(job_gone_grace=60), NOW + 1
    )
    assert kinds(actions, DeleteServer) == []


def test_new_names_skip_servers_the_state_forgot() -> None:
    state = PoolState(pool="p")  # serial back at 0 after a state loss
    listed = seen(server("p-0001", vp.SERVER_BUILDING))
    _, actions = vp.plan_reconcile(state, listed, config(min=1), NOW)
    assert [c.name for c in kinds(actions, CreateServer)] == ["p-0002"]


@pytest.mark.parametrize(("age", "dropped", "tainted"), [(10, False, True), (100_000, False, True), (10, True, False)])
def test_adopted_servers_of_unknown_past_are_never_handed_out(age: float, dropped: bool, tainted: bool) -> None:
    """Only a server whose create intent this pool dropped is known clean; age proves nothing
    (after a state loss a young server may already run a job) and is never compared with our clock."""
    old = server("x", created_at=NOW - age)
    state = PoolState(pool="p", dropped_clean={"x": NOW - 5} if dropped else {})
    once, _ = vp.plan_reconcile(state, seen(old), config(), NOW)
    twice, _ = vp.plan_reconcile(once, seen(old), config(), NOW + 1)
    assert bool(twice.vm_named("x").tainted) == tainted
    probed, _ = vp.plan_probed(twice, [ProbeResult("x", True, server_id="id-x")], NOW + 2)
    assert (probed.vm_named("x").state == FREE) != tainted


def test_servers_being_deleted_count_toward_max() -> None:
    state = PoolState(
        pool="p",
        vms=[vm("a", UNUSABLE, reason=vp.DELETING, delete_requested_at=NOW), vm("b", BUSY, job="1")],
        requests=[vp.Request("2", "u", NOW, 5, "elsewhere")],
    )
    _, actions = vp.plan_reconcile(state, seen(server("a"), server("b")), config(max=2), NOW + 1)
    assert kinds(actions, CreateServer) == []


def test_free_vm_whose_address_changed_is_probed_before_use() -> None:
    state = PoolState(pool="p", vms=[vm("a", host_keys=["ssh-ed25519 AAAA"])])
    new, actions = vp.plan_reconcile(state, seen(server("a", address="127.0.1.9")), config(), NOW)
    assert new.vm_named("a").state == UNUSABLE and kinds(actions, ProbeSsh)
    assert kinds(actions, ProbeSsh)[0].first_contact is False


def test_probe_of_another_server_with_the_same_name_is_ignored() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.BUILDING, healthy=False)])
    new, _ = vp.plan_probed(state, [ProbeResult("a", True, server_id="id-old")], NOW)
    assert new.vm_named("a").state == UNUSABLE


def test_state_survives_a_json_text_roundtrip() -> None:
    import json

    state = health_state(
        pool="p",
        vms=[vm("a", BUSY, job="1", host_keys=["ssh-ed25519 AAAA"])],
        requests=[vp.Request("2", "b", NOW, 1, HOST)],
        orphans={"x": NOW},
        backoff_until=NOW,
    )
    assert vp.state_from_json(json.loads(json.dumps(vp.state_to_json(state))), "f", "p") == state


# --- issue 8: the pool's promises under reused ids, partial listings, lost epilogues, clocks ---


def test_a_reused_job_id_of_another_user_never_gets_the_first_owners_vm() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="123.srv"), vm("b")])  # alice's, epilogue lost
    new, outcome = vp.plan_acquire(state, "123.srv", "bob", NOW, 10, HOST, live(10))
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "b" and not outcome.already_held
    held = new.vm_named("a")
    assert held.state == UNUSABLE and held.tainted and held.job is None, "alice's VM is never handed out again"
    assert "of alice" in held.tainted
    assert any("tainted" in note.message and "123.srv" in note.message for note in outcome.notes), "and it says so"


@pytest.mark.parametrize(("holder", "asker"), [("alice", ""), ("", "alice")])
def test_an_acquire_without_a_user_never_takes_the_running_jobs_vm(holder: str, asker: str) -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="123.srv", user=holder), vm("b")])
    new, outcome = vp.plan_acquire(state, "123.srv", asker, NOW, 10, HOST, live(10))
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "a" and outcome.already_held
    assert new.vm_named("a").state == BUSY and not new.vm_named("a").tainted
    assert new.vm_named("a").user == "alice" and new.vm_named("b").state == FREE


def test_the_same_job_and_user_get_their_vm_again_marked_already_held() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="123.srv")])
    _, outcome = vp.plan_acquire(state, "123.srv", "alice", NOW, 10, HOST, live(10))
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "a" and outcome.already_held


def test_a_release_after_the_attempt_began_ends_its_wait() -> None:
    """pbs_mom runs a deleted job's epilogue while its prologue still waits in acquire."""
    state, outcome = vp.plan_acquire(PoolState(pool="p"), "5", "alice", NOW, 10, HOST, live(10), started=NOW - 1)
    assert isinstance(outcome, vp.Waiting)
    state, _ = vp.plan_release(state, "5", NOW + 10)  # the epilogue: no VM held, the request withdrawn
    assert state.requests == []
    state.vms.append(vm("a", since=NOW + 20))  # a VM boots later
    after, outcome = vp.plan_acquire(state, "5", "alice", NOW + 30, 10, HOST, live(10), started=NOW - 1)
    assert outcome == vp.Ended(NOW + 10) and after.vm_named("a").state == FREE and after.requests == []


def test_an_epilogue_that_ran_before_the_prologue_called_acquire_still_ends_it() -> None:
    state, _ = vp.plan_release(PoolState(pool="p", vms=[vm("a")]), "5", NOW)
    _, outcome = vp.plan_acquire(state, "5", "alice", NOW + 1, 10, HOST, live(10), started=NOW - 3)
    assert isinstance(outcome, vp.Ended)


def test_a_later_attempt_of_the_same_job_is_served() -> None:
    """A requeued job's prologue starts after the previous attempt's epilogue."""
    state, _ = vp.plan_release(PoolState(pool="p", vms=[vm("a")]), "5", NOW)
    _, outcome = vp.plan_acquire(state, "5", "alice", NOW + 5, 10, HOST, live(10), started=NOW + 4)
    assert isinstance(outcome, vp.Claimed)


def test_ended_jobs_stay_bounded() -> None:
    state = PoolState(pool="p")
    for number in range(vp.ENDED_JOBS_KEPT + 50):
        state, _ = vp.plan_release(state, str(number), NOW + number)
    assert len(state.ended_jobs) == vp.ENDED_JOBS_KEPT and str(vp.ENDED_JOBS_KEPT + 49) in state.ended_jobs
    later, _ = vp.plan_release(state, "x", NOW + vp.ENDED_JOBS_MAX_AGE + 10_000)
    assert later.ended_jobs == {"x": NOW + vp.ENDED_JOBS_MAX_AGE + 10_000}


def test_one_incomplete_listing_forgets_nothing_and_creates_nothing() -> None:
    """3 Free + 1 Busy at max 4; one listing lacks them all (a first page, a down cell)."""
    vms = [vm("a"), vm("b"), vm("c"), vm("d", BUSY, job="1")]
    state = PoolState(pool="p", vms=vms, requests=[vp.Request("2", "bob", NOW, 5, "elsewhere")])
    new, actions = vp.plan_reconcile(state, seen(), config(max=4, min_free=1), NOW)
    assert kinds(actions, CreateServer) == [] and kinds(actions, DeleteServer) == []
    assert [v.name for v in new.vms] == ["a", "b", "c", "d"] and new.vm_named("d").state == BUSY
    back, actions = vp.plan_reconcile(new, seen(*(server(n) for n in "abcd")), config(max=4), NOW + 60)
    assert all(v.absent_since is None for v in back.vms) and kinds(actions, CreateServer) == []


def test_a_listing_that_loses_most_servers_is_not_believed_until_unusable_timeout() -> None:
    state = PoolState(pool="p", vms=[vm("a"), vm("b"), vm("c"), vm("d", BUSY, job="1")])
    listing = seen(server("a"))
    for minute in range(0, 11):  # unusable_timeout 600 s
        state, actions = vp.plan_reconcile(state, listing, config(max=4, min=4), NOW + 60 * minute)
        assert len(state.vms) == 4 and kinds(actions, CreateServer) == [], f"minute {minute}"
    assert any(n.level == logging.ERROR and "treated as incomplete" in n.message for n in kinds(actions, Note))
    state, actions = vp.plan_reconcile(state, listing, config(max=4, min=4), NOW + 60 * 11)
    assert sorted(d.name for d in kinds(actions, DeleteServer)) == ["b", "c"], "a delete's answer tells"
    assert len(state.vms) == 4 and state.vm_named("d").job == "1", "nothing forgotten, the job keeps its VM"


def test_tagged_servers_not_adopted_yet_count_toward_max() -> None:
    """After a state loss the pool's servers are orphans for a pass: max still bounds the cloud."""
    listing = seen(*(server(n) for n in ("p-0001", "p-0002", "p-0003")))
    _, actions = vp.plan_reconcile(PoolState(pool="p"), listing, config(max=4, min=4), NOW)
    assert len(kinds(actions, CreateServer)) == 1, "3 tagged servers + 1 create = max 4"


def test_an_unknown_status_server_is_present_but_tells_nothing() -> None:
    state = PoolState(pool="p", vms=[vm("a"), vm("b", BUSY, job="1")])
    down_cell = seen(
        Server(id="id-a", name="", status=vp.SERVER_UNKNOWN), Server(id="id-b", name="", status=vp.SERVER_UNKNOWN)
    )
    for minute in range(3):
        state, actions = vp.plan_reconcile(state, down_cell, config(max=2), NOW + 60 * minute)
        assert [v.state for v in state.vms] == [FREE, BUSY] and not kinds(actions, DeleteServer)


def test_a_vanished_busy_vm_whose_job_is_gone_leaves_the_state() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="7")])
    pool = config(job_gone_grace=60)
    for offset in (0, 60):
        state, _ = vp.plan_reconcile(state, seen(dead_jobs=frozenset({"7"})), pool, NOW + offset)
    assert state.vm_named("a").reason == vp.VANISHED
    state, _ = vp.plan_reconcile(state, seen(dead_jobs=frozenset({"7"})), pool, NOW + 200)
    assert state.vms == [], "a vanished VM of a finished job must not hold a max slot forever"


def test_a_busy_vm_whose_address_changed_is_not_released_free_without_a_pinned_key() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1")])
    moved, _ = vp.plan_reconcile(state, seen(server("a", address="127.0.1.9")), config(), NOW)
    released, _ = vp.plan_release(moved, "1", NOW + 1)
    assert released.vm_named("a").state == UNUSABLE and released.vm_named("a").reason.startswith(vp.UNREACHABLE)
    _, actions = vp.plan_reconcile(released, seen(server("a", address="127.0.1.9")), config(), NOW + 2)
    probe = kinds(actions, ProbeSsh)[0]
    assert probe.address == "127.0.1.9" and probe.host_keys == () and probe.first_contact is False


def simulate_day(pick_newest: bool) -> int:
    """One 2-minute job every 5 minutes for a day, reconcile every minute; how many VMs are left."""
    pool = config(min=0, max=5, min_free=1, idle_timeout=1800)
    state = PoolState(pool="p", vms=[vm(name, since=NOW - 60 * index) for index, name in enumerate("abcde")])
    for minute in range(24 * 60):
        now = NOW + 60 * minute
        if minute % 5 == 0:
            if not pick_newest:  # the old policy: the longest-free VM first
                for v in state.vms:
                    v.since = -v.since if v.state == FREE else v.since
            state, _ = vp.plan_acquire(state, f"{minute}", "alice", now, 10, HOST, live(10))
            if not pick_newest:
                for v in state.vms:
                    v.since = -v.since if v.since < 0 else v.since
        if minute % 5 == 2:
            state, _ = vp.plan_release(state, f"{minute - 2}", now)
        listing = seen(*(server(v.name) for v in state.vms if not v.deleting))
        state, _ = vp.plan_reconcile(state, listing, pool, now)
    return sum(1 for v in state.vms if not v.deleting)


def test_under_a_light_steady_load_idle_vms_are_trimmed_to_what_the_load_needs() -> None:
    assert simulate_day(pick_newest=True) <= 2


def test_the_old_longest_free_first_rule_kept_every_vm_warm() -> None:
    """The simulation itself can tell the two rules apart (so the test above can fail)."""
    assert simulate_day(pick_newest=False) == 5


def booting_pool() -> PoolState:
    return PoolState(
        pool="p",
        vms=[vm(name, UNUSABLE, reason=vp.BUILDING, since=NOW - 30, healthy=False) for name in "abc"],
        clock={"wall": NOW, "boot": 500.0, "boot_id": "boot-1"},
    )


@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_a_wall_clock_step_fails_no_boot_and_keeps_timeouts_in_real_time(step: float) -> None:
    state = booting_pool()
    building = seen(*(server(name, vp.SERVER_BUILDING) for name in "abc"))
    # 60 real seconds later (the boot clock says so), the wall clock has stepped
    shifted, notes = vp.plan_clock(state, NOW + 60 + step, "boot-1", 560.0)
    assert any("stepped by" in n.message for n in kinds(notes, Note))
    after, actions = vp.plan_reconcile(shifted, building, config(build_timeout=600), NOW + 60 + step)
    assert (
        kinds(actions, DeleteServer) == []
        and after.health_of().boot_failures == 0
        and after.health_of().protected_since is None
    )
    # build_timeout still fires after 600 real seconds
    later, _ = vp.plan_clock(after, NOW + 600 + step, "boot-1", 1100.0)
    _, actions = vp.plan_reconcile(later, building, config(build_timeout=600), NOW + 600 + step)
    assert len(kinds(actions, DeleteServer)) == 3


def test_without_the_clock_check_a_step_would_fail_every_boot() -> None:
    """The scenario the clock check prevents (so the test above can fail)."""
    building = seen(*(server(name, vp.SERVER_BUILDING) for name in "abc"))
    after, actions = vp.plan_reconcile(booting_pool(), building, config(build_timeout=600), NOW + 3660)
    assert len(kinds(actions, DeleteServer)) == 3 and after.health_of().protected_since is not None


def test_small_drift_and_a_new_boot_shift_nothing() -> None:
    state = booting_pool()
    same, notes = vp.plan_clock(state, NOW + 10 + 2, "boot-1", 510.0)
    assert notes == [] and same.vms == state.vms
    rebooted, notes = vp.plan_clock(state, NOW + 7200, "boot-2", 30.0)
    assert notes == [] and rebooted.vms == state.vms and rebooted.clock["boot_id"] == "boot-2"


def test_a_reused_pid_does_not_keep_a_dead_acquires_request_alive() -> None:
    import os

    me = os.getpid()
    mine = vp.Request("1", "alice", NOW, me, HOST, pid_start=vp.process_start(me))
    impostor = vp.Request("2", "bob", NOW, me, HOST, pid_start=vp.process_start(me) + 1)
    assert vp.process_start(me) > 0
    assert vp.live_waiters(PoolState(pool="p", requests=[mine])) == frozenset({(me, mine.pid_start)})
    assert vp.live_waiters(PoolState(pool="p", requests=[impostor])) == frozenset()


def test_a_pid_reused_by_another_waiter_does_not_keep_the_dead_waiters_place() -> None:
    """Job 1's acquire died; job 2's acquire got the same pid: job 1's request must go, or it
    holds the head of the queue (and a VM handed to it) until the job's epilogue."""
    import os

    me = os.getpid()
    dead = vp.Request("1", "alice", NOW - 60, me, HOST, pid_start=vp.process_start(me) - 100)
    alive = vp.Request("2", "bob", NOW - 30, me, HOST, pid_start=vp.process_start(me))
    state = PoolState(pool="p", vms=[vm("a")], requests=[dead, alive])
    new, outcome = vp.plan_acquire(state, "2", "bob", NOW, me, HOST, vp.live_waiters(state), pid_start=alive.pid_start)
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "a", "the dead waiter kept its place ahead"
    assert new.requests == []
    handed = PoolState(pool="p", vms=[vm("a", BUSY, job="1")], handed=[dead], requests=[alive])
    after, _ = vp.plan_reconcile(handed, seen(server("a"), live_waiters=vp.live_waiters(handed)), config(), NOW)
    assert after.vm_named("a").state == FREE or after.vm_named("a").job == "2", "the dead waiter's VM came back"


@pytest.mark.parametrize(
    ("exit_code", "stdout", "stderr", "answer"),
    [
        (0, "Job Id: 5.srv\n    Job_Name = STDIN\n    job_state = R\n", "", vp.JOB_ALIVE),
        (0, "Job Id: 5.srv\n    job_state = Q\n", "", vp.JOB_ALIVE),
        (0, "Job Id: 5.srv\n    job_state = E\n", "", vp.JOB_ALIVE),
        (0, "Job Id: 5.srv\n    job_state = C\n", "", vp.JOB_GONE),
        (153, "", "qstat: Unknown Job Id Error 5.srv\n", vp.JOB_GONE),
        (1, "", "Communication failure.\n", "unknown"),
    ],
)
def test_torque_job_state_reads_qstat(exit_code: int, stdout: str, stderr: str, answer: str) -> None:
    assert vp.torque_job_state(exit_code, stdout, stderr).split(":")[0] == answer


@pytest.mark.parametrize(
    ("exit_code", "stdout", "stderr", "answer"),
    [
        (0, "JobId=5 JobName=x UserId=a(1000) JobState=RUNNING Reason=None", "", vp.JOB_ALIVE),
        (0, "JobId=5 JobName=x JobState=COMPLETING Reason=None", "", vp.JOB_ALIVE),
        (0, "JobId=5 JobName=x JobState=CANCELLED Reason=None", "", vp.JOB_GONE),
        (1, "", "slurm_load_jobs error: Invalid job id specified\n", vp.JOB_GONE),
        (1, "", "slurm_load_jobs error: Unable to contact slurm controller\n", "unknown"),
    ],
)
def test_slurm_job_state_reads_scontrol(exit_code: int, stdout: str, stderr: str, answer: str) -> None:
    assert vp.slurm_job_state(exit_code, stdout, stderr).split(":")[0] == answer


# --- admin actions: drain, delete, pause, resume, clear-backoff ---


def test_a_drained_free_vm_is_never_claimed_and_deleted_by_the_next_pass() -> None:
    state = PoolState(pool="p", vms=[vm("a")])
    drained, notes = vp.plan_drain(state, ["a"], by="admin", reason="kernel update", now=NOW)
    assert "drained by admin: kernel update" in notes[0].message and not state.vm_named("a").drained
    _, outcome = vp.plan_acquire(drained, "1", "alice", NOW, 10, HOST, frozenset())
    assert isinstance(outcome, vp.Waiting)
    _, actions = vp.plan_reconcile(drained, seen(server("a")), config(max=1), NOW)
    assert [d.name for d in kinds(actions, DeleteServer)] == ["a"] and not kinds(actions, CreateServer)
    assert "drained" in kinds(actions, DeleteServer)[0].reason


def test_a_drained_busy_vm_keeps_its_job_and_is_deleted_once_released() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1")])
    drained, notes = vp.plan_drain(state, ["a"], by="admin", reason="r", now=NOW)
    assert "once job 1 ends" in notes[0].message
    still, actions = vp.plan_reconcile(drained, seen(server("a")), config(), NOW)
    assert not kinds(actions, DeleteServer) and still.vm_named("a").job == "1"
    released, _ = vp.plan_release(still, "1", NOW)
    _, actions = vp.plan_reconcile(released, seen(server("a")), config(), NOW)
    assert [d.name for d in kinds(actions, DeleteServer)] == ["a"]


def test_drain_is_idempotent_and_an_unknown_name_is_bad_input() -> None:
    state, _ = vp.plan_drain(PoolState(pool="p", vms=[vm("a")]), ["a"], by="x", reason="r", now=NOW)
    again, notes = vp.plan_drain(state, ["a"], by="y", reason="s", now=NOW + 5)
    assert again == state and "already drained" in notes[0].message
    with pytest.raises(vp.BadInput, match="no VM named 'zz' in pool p"):
        vp.plan_drain(state, ["zz"], by="x", reason="r", now=NOW)


def test_drained_vms_are_not_capacity_but_max_still_bounds_the_cloud() -> None:
    state = PoolState(pool="p", vms=[vm("a"), vm("b")])
    drained, _ = vp.plan_drain(state, ["a", "b"], by="x", reason="r", now=NOW)
    _, actions = vp.plan_reconcile(drained, seen(server("a"), server("b")), config(min=2, max=3), NOW)
    assert len(kinds(actions, DeleteServer)) == 2 and len(kinds(actions, CreateServer)) == 1


def test_delete_refuses_a_busy_vm_without_force_and_names_the_job_with_it() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="7")])
    with pytest.raises(vp.BadInput, match="busy with job 7 of alice"):
        vp.plan_admin_delete(state, "a", by="x", reason="r", force=False, now=NOW)
    new, notes = vp.plan_admin_delete(state, "a", by="x", reason="broken", force=True, now=NOW)
    assert new.vm_named("a").job is None and new.vm_named("a").tainted and "job 7 of alice" in notes[0].message
    _, actions = vp.plan_reconcile(new, seen(server("a")), config(), NOW)
    assert [d.name for d in kinds(actions, DeleteServer)] == ["a"]


def test_pause_stops_creates_not_claims_and_resume_restarts_them() -> None:
    state = PoolState(pool="p", vms=[vm("a")])
    paused, notes = vp.plan_pause(state, by="x", reason="maintenance", now=NOW)
    assert (paused.paused_since, paused.paused_by, paused.paused_reason) == (NOW, "x", "maintenance")
    again, notes = vp.plan_pause(paused, by="y", reason="other", now=NOW + 1)
    assert again == paused and "already paused" in notes[0].message
    _, actions = vp.plan_reconcile(paused, seen(server("a")), config(min=3), NOW)
    assert not kinds(actions, CreateServer) and "paused" in kinds(actions, Note)[-1].message
    _, outcome = vp.plan_acquire(paused, "1", "alice", NOW, 10, HOST, frozenset())
    assert isinstance(outcome, vp.Claimed)
    resumed, _ = vp.plan_resume(paused, by="x", reason="done", now=NOW)
    assert resumed.paused_since is None
    _, actions = vp.plan_reconcile(resumed, seen(server("a")), config(min=3), NOW)
    assert len(kinds(actions, CreateServer)) == 2


def test_clear_backoff_lets_the_next_pass_create() -> None:
    state = health_state(pool="p", backoff_until=NOW + 600, backoff_delay=600)
    _, actions = vp.plan_reconcile(state, seen(), config(min=1), NOW)
    assert not kinds(actions, CreateServer)
    cleared, notes = vp.plan_clear_backoff(state, by="x", reason="quota raised", now=NOW)
    assert "cleared by x: quota raised" in notes[0].message
    _, actions = vp.plan_reconcile(cleared, seen(), config(min=1), NOW)
    assert len(kinds(actions, CreateServer)) == 1
    assert vp.plan_clear_backoff(cleared, by="x", reason="r", now=NOW)[0] == cleared


# --- monitoring: counters and the acquire wait histogram kept in the state ---


def test_counters_are_incremented_by_the_plans_that_decide_them() -> None:
    state = PoolState(pool="p", vms=[vm("a"), vm("b")])
    state, _ = vp.plan_acquire(state, "1", "alice", NOW, 10, HOST, frozenset())
    state, _ = vp.plan_acquire(state, "2", "bob", NOW, 11, HOST, frozenset())
    state, _ = vp.plan_acquire(state, "1", "alice", NOW, 10, HOST, frozenset())  # already held: not again
    state, _ = vp.plan_release(state, "1", NOW)
    state, _ = vp.plan_release(state, "2", NOW, unusable="scrub failed")
    state, _ = vp.plan_created(state, "c", "id-c", None, config().pool, NOW)
    state, _ = vp.plan_deleted(state, "b", None, NOW)
    assert state.counters == {"acquires": 2, "releases": 2, "tainted_releases": 1, "boots": 1, "deletes": 1}
    failing = PoolState(pool="p", vms=[vm("x", UNUSABLE, reason="building", healthy=False)])
    failed, _ = vp.plan_reconcile(failing, seen(server("x", vp.SERVER_ERROR)), config(), NOW)
    assert failed.counters["failed_boots"] == 1


def test_a_claim_after_waiting_lands_in_the_wait_histogram() -> None:
    state = PoolState(pool="p")
    state, _ = vp.plan_acquire(state, "1", "alice", NOW, 10, HOST, live(10))
    state.vms.append(vm("a"))
    state, outcome = vp.plan_acquire(state, "1", "alice", NOW + 42, 10, HOST, live(10))
    assert isinstance(outcome, vp.Claimed)
    buckets = state.acquire_wait["buckets"]
    assert state.acquire_wait["count"] == 1 and state.acquire_wait["sum"] == 42
    assert buckets[vp.ACQUIRE_WAIT_BUCKETS.index(60.0)] == 1 and sum(buckets) == 1


def test_metrics_text_parses_and_carries_exactly_the_documented_names() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    state = health_state(
        pool="p",
        vms=[vm("a"), vm("b", BUSY, job="1"), vm("c", UNUSABLE, reason="unreachable: ssh timeout after 10s")],
        requests=[vp.Request(job="2", user="bob", since=NOW - 30, pid=1, host=HOST)],
        protected_since=NOW - 5,
        backoff_until=NOW + 60,
        counters={"boots": 3},
    )
    state.vm_named("a").drained = "at 12:00:00 by x: r"
    vp._observe_wait(state, 7.0)
    families = {family.name: family for family in text_string_to_metric_families(vp.metrics_text(state, config(), NOW))}
    exported = {f"{name}_total" if family.type == "counter" else name for name, family in families.items()}
    assert exported == set(vp.METRIC_NAMES)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("vmpool_vms", (("pool", "p"), ("reason", "unreachable"), ("state", "unusable")))] == 1
    assert samples[("vmpool_waiting_jobs", (("pool", "p"),))] == 1
    assert samples[("vmpool_oldest_wait_seconds", (("pool", "p"),))] == 30
    assert samples[("vmpool_protected_mode", (("pool", "p"),))] == 1
    assert samples[("vmpool_backoff_seconds", (("pool", "p"),))] == 60
    assert samples[("vmpool_boots_total", (("pool", "p"),))] == 3
    assert samples[("vmpool_vms_drained", (("pool", "p"),))] == 1
    assert samples[("vmpool_acquire_wait_seconds_bucket", (("le", "15.0"), ("pool", "p")))] == 1
    assert samples[("vmpool_acquire_wait_seconds_count", (("pool", "p"),))] == 1


def test_pool_health_reports_what_the_check_judges() -> None:
    state = PoolState(pool="p", vms=[vm("a")], last_reconcile=NOW - 12, paused_since=NOW)
    health = vp.pool_health(state, config().pool, NOW)
    assert (health.free, health.since_reconcile, health.paused, health.protected) == (1, 12, True, False)
    assert vp.pool_health(PoolState(pool="p"), config().pool, NOW).since_reconcile is None


def test_a_waiter_looks_before_it_locks() -> None:
    """Waiting acquires take the state lock only when a locked try could change something for them."""
    state = PoolState(
        pool="p",
        vms=[vm("a", BUSY, job="1")],
        requests=[vp.Request("2", "bob", NOW, 10, HOST, started=NOW), vp.Request("3", "eve", NOW, 11, HOST)],
    )
    assert vp.vms_still_to_free(state, "3", 11, HOST) == 2, "nothing free, one ahead: two VMs must come Free"
    state.vms.append(vm("b"))
    assert vp.vms_still_to_free(state, "2", 10, HOST) == 0, "a Free VM for the head of the queue"
    assert vp.vms_still_to_free(state, "3", 11, HOST) == 1, "one Free VM is the head's: the second waits"
    head_died = lambda request: request.pid != 10  # noqa: E731
    assert vp.vms_still_to_free(state, "3", 11, HOST, head_died) == 0, "a dead head holds no place: lock, prune, claim"
    state.requests[0].host = "other-node"
    assert vp.vms_still_to_free(state, "3", 11, HOST, head_died) == 1, "another node's waiter cannot be asked"
    state.ended_jobs["3"] = NOW + 1
    assert vp.vms_still_to_free(state, "3", 11, HOST) == 0, "its release ran: the locked try ends the wait"
    assert vp.vms_still_to_free(state, "4", 12, HOST) == 0, "no request of its own any more: ask under the lock"


def test_a_waiter_far_back_looks_less_often_as_fast_as_the_queue_moves() -> None:
    assert vp.waiter_sleep(1, None, 0.5) == 0.5, "next in line: every poll, a freed VM is taken at once"
    assert vp.waiter_sleep(0, 3.0, 0.5) == 0.5
    assert vp.waiter_sleep(9, 0.0, 0.5) == 0.5 * vp.WAITER_POLL_STRETCH, "a queue that does not move: the longest"
    assert vp.waiter_sleep(9, None, 0.5) == 0.5 * vp.WAITER_POLL_STRETCH
    assert vp.waiter_sleep(6, 2.0, 0.5) == 1.5, "6 claims away at 2 a second: half of the 3 s it needs"
    assert vp.waiter_sleep(2, 100.0, 0.5) == 0.5, "never below one poll"
    assert vp.waiter_sleep(500, 1.0, 0.5) == 0.5 * vp.WAITER_POLL_STRETCH, "never above the stretch"


def test_newly_free_counts_the_vms_a_change_made_free_for_waiters() -> None:
    before = PoolState(pool="p", vms=[vm("a", BUSY, job="1"), vm("b", BUSY, job="2"), vm("c"), vm("d", UNUSABLE)])
    after = vp.plan_release(before, "1", NOW)[0]
    assert vp.newly_free(before, after) == 1, "a release"
    after.vms[3].state = FREE
    after.vms.append(vm("e"))
    assert vp.newly_free(before, after) == 3, "and a recovery, and a boot; c was Free already"
    after.vms[4].drained = "at 12:00:00 by root: maintenance"
    assert vp.newly_free(before, after) == 2, "a drained VM serves no waiter"
    assert vp.newly_free(after, before) == 0, "a claim frees nothing"


def test_vms_freed_since_a_mark_and_a_reset_mark_wakes_the_waiter() -> None:
    assert vp.vms_freed_since(10, 13) == 3
    assert vp.vms_freed_since(10, 10) == 0
    assert vp.vms_freed_since(10, 2) >= 10**6, "the mark started again: look"


def test_a_waiting_pass_runs_only_when_it_can_bring_a_vm_nearer() -> None:
    """At max with every VM Free or Busy a waiter's pass can do nothing (cron's pass still runs)."""
    pool = config(max=2).pool
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="1")])
    assert vp.waiting_pass_may_help(state, pool), "below max: the pass may create a VM"
    state.vms.append(vm("b", BUSY, job="2"))
    assert not vp.waiting_pass_may_help(state, pool), "at max, all Busy: only a release brings a VM"
    state.vms[1].state = UNUSABLE
    assert vp.waiting_pass_may_help(state, pool), "an Unusable VM may pass its probe, or be deleted to make room"


def _mutables(value: object, path: str = "state") -> list[tuple[str, object]]:
    """Every list, dict and record inside a state, with where it is."""
    if isinstance(value, list):
        return [(path, value)] + [m for i, item in enumerate(value) for m in _mutables(item, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [(path, value)] + [m for key, item in value.items() for m in _mutables(item, f"{path}[{key!r}]")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(path, value)] + [
            m for f in dataclasses.fields(value) for m in _mutables(getattr(value, f.name), f"{path}.{f.name}")
        ]
    return []


def test_copy_state_shares_nothing_mutable_with_the_original() -> None:
    # every field set, so that a field added later without a copy would show here
    state = vp.PoolState(
        pool="p",
        vms=[vm("a", BUSY, job="1.srv", host_keys=["ssh-ed25519 AAAA"], drained="x")],
        requests=[vp.Request("2.srv", "bob", NOW, 42, "node", 7, NOW)],
    )
    for f in dataclasses.fields(state):
        if getattr(state, f.name) in ({}, None, 0, 0.0, ""):
            setattr(
                state,
                f.name,
                {"k": [1.0, {"n": 2}]}
                if f.type.startswith("dict")
                else (NOW if "float" in f.type else 1 if f.type == "int" else "set"),
            )
    vp._observe_wait(state, 3.0)

    copied = vp.copy_state(state)

    assert copied == state
    shared = [where for (where, a), (_, b) in zip(_mutables(state), _mutables(copied), strict=True) if a is b]
    assert shared == []
    copied.vms[0].host_keys.append("changed")
    copied.acquire_wait["buckets"][0] += 1
    assert state.vms[0].host_keys == ["ssh-ed25519 AAAA"] and copied != state


# --- the hooks' job records: a lost, corrupt or restored state file ---


def record(job: str, name: str, user: str = "alice") -> vp.JobRecord:
    return vp.JobRecord(job=job, vm_name=name, server_id=f"id-{name}", user=user, host_keys=("ssh-ed25519 KEY",))


def test_a_free_vm_that_a_job_record_names_is_that_jobs_not_the_next_ones() -> None:
    state = PoolState(pool="p", vms=[vm("a"), vm("b", since=NOW - 50)])  # a restored backup: both Free
    new, outcome = vp.plan_acquire(state, "9", "bob", NOW, 10, HOST, live(10), records=[record("7", "a")])
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "b", "a, job 7's VM, went to job 9"
    assert (new.vm_named("a").state, new.vm_named("a").job, new.vm_named("a").user) == (BUSY, "7", "alice")
    assert any(note.level == logging.ERROR and "lost or restored" in note.message for note in outcome.notes)


def test_a_job_record_of_a_released_job_is_not_followed() -> None:
    state = PoolState(pool="p", vms=[vm("a")], ended_jobs={"7": NOW - 1})  # its epilogue removes the record next
    _, outcome = vp.plan_acquire(state, "9", "bob", NOW, 10, HOST, live(10), records=[record("7", "a")])
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "a"


def test_a_vm_two_records_name_or_held_by_another_job_is_never_handed_out_again() -> None:
    state = PoolState(pool="p", vms=[vm("a", BUSY, job="8"), vm("b")])
    new, _ = vp.plan_reconcile(
        state,
        seen(server("a"), server("b"), records=[record("7", "a"), record("6", "b"), record("5", "b")]),
        config(),
        NOW,
    )
    a, b = new.vm_named("a"), new.vm_named("b")
    assert (a.state, a.job) == (UNUSABLE, "8") and "7, 8" in a.tainted, "job 8 keeps it; nobody gets it after"
    assert b.state == UNUSABLE and b.tainted and b.job is None


def test_a_server_the_state_lost_is_adopted_at_once_for_the_job_its_record_names() -> None:
    listing = seen(server("a"), server("b"), records=[record("7", "a")])
    new, _ = vp.plan_reconcile(PoolState(pool="p"), listing, config(max=2), NOW)
    adopted = new.vm_named("a")
    assert (adopted.state, adopted.job, adopted.user, adopted.host_keys) == (BUSY, "7", "alice", ["ssh-ed25519 KEY"])
    assert new.vm_named("b") is None and "id-b" in new.orphans, "one without a record waits for a second sighting"
    released, _ = vp.plan_release(new, "7", NOW + 5)
    assert released.vm_named("a").state == FREE, "its release finds it"


def test_an_unknown_past_vm_that_a_record_explains_is_the_jobs() -> None:
    state = PoolState(pool="p", vms=[vm("a", UNUSABLE, reason=vp.UNKNOWN_PAST, tainted=vp.UNKNOWN_PAST, healthy=False)])
    new, _ = vp.plan_reconcile(state, seen(server("a"), records=[record("7", "a")]), config(), NOW)
    assert (new.vm_named("a").state, new.vm_named("a").job, new.vm_named("a").tainted) == (BUSY, "7", "")


# --- the VM's state and the kind of its reason ---


@pytest.mark.parametrize(
    ("reason", "tainted", "why", "detail"),
    [
        ("creating", "", vp.Why.CREATING, ""),
        ("building", "", vp.Why.BUILDING, ""),
        ("unreachable", "", vp.Why.UNREACHABLE, ""),
        ("unreachable: no SSH banner within 10s", "", vp.Why.UNREACHABLE, "no SSH banner within 10s"),
        ("status SHELVED_OFFLOADED", "", vp.Why.STATUS, "SHELVED_OFFLOADED"),
        ("vanished", "vanished", vp.Why.VANISHED, ""),
        ("adopted with unknown past", "adopted with unknown past", vp.Why.TAINTED, "adopted with unknown past"),
        ("deleting", "scrub failed", vp.Why.DELETING, ""),
        ("unreachableness", "", vp.Why.NONE, "unreachableness"),  # a word that only starts like a kind
    ],
)
def test_a_reason_reads_apart_into_its_kind_and_free_text_and_back(
    reason: str, tainted: str, why: vp.Why, detail: str
) -> None:
    machine = vm("a", UNUSABLE, reason=reason, tainted=tainted)
    assert (machine.why, machine.detail) == (why, detail)
    if why not in (vp.Why.TAINTED, vp.Why.NONE):
        assert vp.reason_text(why, detail) == reason, "the state file keeps the same string"


def test_the_state_file_keeps_its_strings_for_the_typed_state() -> None:
    state = PoolState(
        pool="p", vms=[vm("a"), vm("b", BUSY, job="1"), vm("c", UNUSABLE, reason="unreachable: refused", healthy=False)]
    )
    text = vp.state_text(state)
    assert '"state":"free"' in text and '"state":"busy"' in text and '"reason":"unreachable: refused"' in text
    again = vp.state_from_json(vp.state_to_json(state), "x", "p")
    assert [v.state for v in again.vms] == [vp.VmState.FREE, vp.VmState.BUSY, vp.VmState.UNUSABLE]
    assert vp.state_text(again) == text


# --- several pools in one project: giving way on the project's quota ---


def test_idle_vms_above_min_give_way_while_another_pools_jobs_wait_on_the_quota() -> None:
    state = PoolState(
        pool="p",
        vms=[vm("a", since=NOW - 120), vm("b", since=NOW - 90), vm("c", since=NOW - 30), vm("d", BUSY, job="1")],
    )
    listed = [server(n) for n in "abcd"]
    pool = config(min=0, min_free=1, idle_timeout=1800, give_way_after=60)
    _, alone = vp.plan_reconcile(state, seen(*listed, probe_free=False), pool, NOW)
    assert kinds(alone, DeleteServer) == [], "nobody waits: idle_timeout and min_free hold"
    _, giving = vp.plan_reconcile(state, seen(*listed, probe_free=False, others_wanting=frozenset({"gpu"})), pool, NOW)
    assert [d.name for d in kinds(giving, DeleteServer)] == ["a", "b"], "idle past give_way_after, spares too"
    assert all("giving way" in d.reason for d in kinds(giving, DeleteServer))
    _, kept = vp.plan_reconcile(
        state,
        seen(*listed, probe_free=False, others_wanting=frozenset({"gpu"})),
        config(min=3, min_free=1, give_way_after=60),
        NOW,
    )
    assert [d.name for d in kinds(kept, DeleteServer)] == ["a"], "never below min"
    _, never = vp.plan_reconcile(
        state,
        seen(*listed, probe_free=False, others_wanting=frozenset({"gpu"})),
        config(min=0, min_free=1, give_way_after=0),
        NOW,
    )
    assert kinds(never, DeleteServer) == [], "give_way_after = 0: never"


def test_a_pool_giving_way_boots_no_spares() -> None:
    _, actions = vp.plan_reconcile(
        PoolState(pool="p"), seen(others_wanting=frozenset({"gpu"})), config(min=0, min_free=2), NOW
    )
    assert kinds(actions, CreateServer) == []
    _, alone = vp.plan_reconcile(PoolState(pool="p"), seen(), config(min=0, min_free=2), NOW)
    assert len(kinds(alone, CreateServer)) == 2


def test_a_pool_waits_on_the_quota_from_a_quota_refusal_until_a_create_goes_through() -> None:
    waiting = PoolState(
        pool="p",
        vms=[vm("a", UNUSABLE, reason=vp.CREATING, server_id="", healthy=False)],
        requests=[vp.Request(job="1", user="bob", since=NOW, pid=10, host=HOST)],
    )
    waiting.vms[0].server_id = None
    refused, _ = vp.plan_created(
        waiting, "a", None, vp.QuotaExceeded("Quota exceeded for instances"), config().pool, NOW
    )
    assert vp.starved(refused) and refused.quota_blocked_since == NOW
    assert '"quota_blocked_since":' in vp.state_text(refused)
    refused.vms.append(vm("b", UNUSABLE, reason=vp.CREATING, healthy=False))
    refused.vms[-1].server_id = None
    created, _ = vp.plan_created(refused, "b", "id-b", None, config().pool, NOW + 60)
    assert not vp.starved(created) and created.quota_blocked_since is None
    assert "quota_blocked_since" not in vp.state_text(created), "an older vmpool still reads the file"
    broken, _ = vp.plan_created(waiting, "a", None, vp.CloudRefused("Can not find requested image"), config().pool, NOW)
    assert not vp.starved(broken), "a refusal that is not the quota asks no one to give way"


# --- a down cell (issue 21) ---


def test_a_listing_without_exactly_half_the_servers_is_not_believed() -> None:
    """The experiment that made a pool of max 4 hold 6: a down cell held 2 of its 4 servers."""
    state = PoolState(pool="p", vms=[vm("a"), vm("b", BUSY, job="1"), vm("c"), vm("d", BUSY, job="2")])
    for minute in range(0, 10):
        state, actions = vp.plan_reconcile(
            state, seen(server("a"), server("b")), config(max=4, min=4), NOW + 60 * minute
        )
        assert [v.name for v in state.vms] == ["a", "b", "c", "d"] and not kinds(actions, CreateServer), minute
        assert state.vm_named("d").state == BUSY and state.vm_named("d").job == "2"
    state, actions = vp.plan_reconcile(state, seen(*(server(n) for n in "abcd")), config(max=4, min=4), NOW + 600)
    assert all(v.absent_since is None for v in state.vms) and not kinds(actions, CreateServer)
    assert state.orphans == {}, "the cell's servers were never forgotten: nothing to adopt"


def test_a_listing_that_may_be_incomplete_never_loses_a_server() -> None:
    """Pages after the first leave a down cell's servers out: one missing Free VM and one Busy."""
    state = PoolState(pool="p", vms=[*(vm(n) for n in "abc"), vm("d", BUSY, job="1"), vm("e"), vm("f")])
    paged = seen(*(server(n) for n in "abce"), listing_complete=False)
    for minute in range(0, 11):  # up to unusable_timeout
        state, actions = vp.plan_reconcile(state, paged, config(max=6, min=6), NOW + 60 * minute)
        assert len(state.vms) == 6 and not kinds(actions, CreateServer) and not kinds(actions, DeleteServer)
    state, actions = vp.plan_reconcile(state, paged, config(max=6, min=6), NOW + 60 * 11)
    assert [d.name for d in kinds(actions, DeleteServer)] == ["f"], "missing that long: a delete tells"
    assert state.vm_named("d").state == BUSY and state.vm_named("d").job == "1", "a Busy VM keeps its job"
    assert len(state.vms) == 6 and not kinds(actions, CreateServer), "the deleting VM still counts toward max"
    gone, _ = vp.plan_deleted(state, "f", vp.ServerGone("delete server: not found"), NOW + 60 * 11)
    assert gone.vm_named("f") is None, "Nova's not found is the proof"


def test_a_create_intent_is_kept_while_a_cell_is_down() -> None:
    """A down cell's servers are listed by id alone: the intent's server may be one of them."""
    creating = Vm(name="p-0007", state=UNUSABLE, reason=vp.CREATING, since=NOW, created_at=NOW)
    state = PoolState(pool="p", vms=[vm("a"), creating])
    listing = seen(server("a"), Server(id="id-x", name="", status=vp.SERVER_UNKNOWN))
    state, actions = vp.plan_reconcile(state, listing, config(max=2, min=2), NOW + 600)
    assert state.vm_named("p-0007") is not None and not kinds(actions, CreateServer)
    state, _ = vp.plan_reconcile(state, seen(server("a")), config(max=2, min=2), NOW + 660)
    assert state.vm_named("p-0007") is None, "no cell down, past create_grace: it never reached the cloud"
