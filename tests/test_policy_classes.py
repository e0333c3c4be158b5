"""VM classes in the pure policy (issue 19): the job's cores, memory and GPUs choose its class;
creates, spares and trimming per class; the pool's and the project's limits in cores, memory and
servers; single-use classes; the state file of a one-class pool unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest

import vmpool as vp
from tests.policy_builders import HOST, NOW, kinds, live, seen, server, vm
from tests.policy_builders import config as one_class_config
from vmpool import BUSY, FREE, UNUSABLE, ClassConfig, CreateServer, DeleteServer, PoolState, Want

SMALL, MEDIUM, BIG, GPU = "fl-small", "fl-medium", "fl-big", "fl-gpu"
FLAVORS = {
    SMALL: {"vcpus": 1, "ram": 2048, "gpus": 0},
    MEDIUM: {"vcpus": 4, "ram": 8192, "gpus": 0},
    BIG: {"vcpus": 8, "ram": 32768, "gpus": 0},
    GPU: {"vcpus": 8, "ram": 32768, "gpus": 1},
}


def classes_config(*classes: ClassConfig, **pool: Any) -> vp.Config:
    base = one_class_config(**{"max": 10, **pool})
    chosen = classes or (
        ClassConfig("small", SMALL),
        ClassConfig("medium", MEDIUM),
        ClassConfig("big", BIG),
        ClassConfig("gpu", GPU),
    )
    import dataclasses

    return dataclasses.replace(base, pool=dataclasses.replace(base.pool, classes=chosen))


def state_of(*vms: vp.Vm, **extra: Any) -> PoolState:
    return PoolState(pool="p", vms=list(vms), flavors={**FLAVORS}, **extra)


def acquire(state: PoolState, job: str, want: Want, config: vp.Config, pid: int = 100) -> Any:
    return vp.plan_acquire(state, job, "alice", NOW, pid, HOST, live(*range(100, 120)), want=want, pool=config.pool)


@pytest.mark.parametrize(
    ("want", "chosen"),
    [
        (Want(1, 0, 0), "small"),
        (Want(1, 4096, 0), "medium"),  # memory alone moves it up
        (Want(4, 6144, 0), "medium"),
        (Want(5, 0, 0), "big"),
        (Want(8, 32768, 0), "big"),  # exactly the big flavor: no GPU class for a job without GPUs
        (Want(1, 0, 1), "gpu"),
    ],
)
def test_the_smallest_class_the_job_fits_in_is_chosen(want: Want, chosen: str) -> None:
    assert vp.choose_class(state_of(), classes_config().pool, want) == (chosen, "")


def test_a_job_no_class_fits_is_refused_at_once_naming_the_largest_class() -> None:
    config = classes_config()
    new, outcome = acquire(state_of(vm("s1", vm_class="small")), "9", Want(16, 0, 0), config)
    assert isinstance(outcome, vp.Refused)
    assert outcome.why == (
        "job 9 asks for 16 cores: more than any class of the pool offers "
        "(the largest, gpu, has 8 cores, 32G memory, 1 GPU(s))"
    )
    assert new.requests == [] and new.vm_named("s1").state == FREE


def test_a_job_gets_a_free_vm_of_its_class_never_a_smaller_one_nor_a_bigger_one_by_default() -> None:
    config = classes_config()
    state = state_of(vm("s1", vm_class="small"), vm("b1", vm_class="big"))
    new, outcome = acquire(state, "1", Want(4, 0, 0), config)
    assert isinstance(outcome, vp.Waiting) and new.requests[0].vm_class == "medium"
    assert {v.name: v.state for v in new.vms} == {"s1": FREE, "b1": FREE}
    new, outcome = acquire(state, "2", Want(1, 0, 0), config)
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "s1"


def test_a_bigger_free_vm_serves_a_smaller_job_only_if_the_config_allows_it() -> None:
    state = state_of(vm("b1", vm_class="big"), vm("g1", vm_class="gpu"))
    _, outcome = acquire(state, "1", Want(4, 0, 0), classes_config())
    assert isinstance(outcome, vp.Waiting)
    _, outcome = acquire(state, "1", Want(4, 0, 0), classes_config(bigger_vm_may_serve=True))
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name in ("b1", "g1")
    _, outcome = acquire(state, "1", Want(1, 0, 1), classes_config(bigger_vm_may_serve=True))
    assert isinstance(outcome, vp.Claimed) and outcome.vm.name == "g1"  # the one with a GPU


def test_a_freed_vm_is_handed_to_the_first_waiter_of_its_class_not_the_queue_head() -> None:
    config = classes_config()
    state = state_of(vm("m1", BUSY, job="5", vm_class="medium"))
    state, _ = acquire(state, "6", Want(1, 0, 0), config, pid=106)  # waits for a small VM
    state, _ = acquire(state, "7", Want(4, 0, 0), config, pid=107)  # waits for a medium VM
    state, _ = vp.plan_release(state, "5", NOW, pool=config.pool)
    state, _ = vp.plan_hand_over(state, NOW, HOST, lambda request: True, config.pool)
    assert state.vm_named("m1").job == "7"
    assert [r.job for r in state.requests] == ["6"]


def test_while_the_flavors_are_unknown_the_request_waits_and_a_pass_decides_its_class() -> None:
    config = classes_config()
    state = PoolState(pool="p")
    state, outcome = acquire(state, "1", Want(4, 0, 0), config)
    assert isinstance(outcome, vp.Waiting) and state.requests[0].vm_class == ""
    assert vp.vms_still_to_free(state, "1", 100, HOST) == 1
    state.flavors.update(FLAVORS)
    state, actions = vp.plan_reconcile(state, seen(live_waiters=live(100)), config, NOW)
    assert state.requests[0].vm_class == "medium"
    assert [(c.vm_class) for c in kinds(actions, CreateServer)] == ["medium"]


def test_one_class_and_a_default_job_need_no_flavor_size() -> None:
    """Today's pool: acquire never waits on Nova to learn the flavor."""
    state = PoolState(pool="p", vms=[vm("a")])
    _, outcome = vp.plan_acquire(state, "1", "alice", NOW, 100, HOST, live(100), pool=one_class_config().pool)
    assert isinstance(outcome, vp.Claimed)


def test_creates_spares_and_trimming_are_per_class() -> None:
    config = classes_config(
        ClassConfig("small", SMALL, min_free=2),
        ClassConfig("big", BIG, min=1),
        idle_timeout=100,
    )
    state = state_of(vm("old-big", vm_class="big", since=NOW - 1000), vm("b2", vm_class="big", since=NOW - 1000))
    new, actions = vp.plan_reconcile(state, seen(server("old-big"), server("b2")), config, NOW)
    creates = kinds(actions, CreateServer)
    assert sorted(c.vm_class for c in creates) == ["small", "small"]
    assert all(new.vm_named(c.name).vm_class == "small" for c in creates)
    assert [d.name for d in kinds(actions, DeleteServer)] == ["old-big"]  # big keeps its min of 1


def test_a_class_never_passes_its_own_max_nor_the_pool_its_max() -> None:
    config = classes_config(ClassConfig("small", SMALL, max=2, min_free=5), ClassConfig("big", BIG, min_free=5), max=4)
    _, actions = vp.plan_reconcile(state_of(), seen(), config, NOW)
    assert sorted(c.vm_class for c in kinds(actions, CreateServer)) == ["big", "big", "small", "small"]


def test_the_class_whose_job_waits_longest_is_created_first_when_room_is_short() -> None:
    config = classes_config(max=1)
    state = state_of()
    state, _ = acquire(state, "1", Want(8, 0, 1), config, pid=101)
    state, _ = acquire(state, "2", Want(1, 0, 0), config, pid=102)
    _, actions = vp.plan_reconcile(state, seen(live_waiters=live(101, 102)), config, NOW)
    assert [c.vm_class for c in kinds(actions, CreateServer)] == ["gpu"]


@pytest.mark.parametrize(
    ("pool", "limits", "created", "why"),
    [
        ({"max_cores": 10}, None, 2, "[pool] max_cores = 10 leaves room for 2 more cores, a VM needs 4"),
        ({"max_memory": 20000}, None, 2, "[pool] max_memory = 20000M leaves room for 3616 more memory"),
        ({}, {"maxTotalCores": 20, "totalCoresUsed": 9}, 2, "the project's quota maxTotalCores = 20 (9 used)"),
        ({}, {"maxTotalRAMSize": 30000, "totalRAMUsed": 0}, 3, "maxTotalRAMSize = 30000"),
        ({}, {"maxTotalInstances": 5, "totalInstancesUsed": 4}, 1, "maxTotalInstances = 5 (4 used)"),
        ({}, {"maxTotalCores": -1, "maxTotalRAMSize": -1, "maxTotalInstances": -1}, 10, ""),
    ],
)
def test_creates_stay_within_the_pool_s_limits_and_the_project_s_quota_the_rest_wait(
    pool: dict[str, Any], limits: dict[str, int] | None, created: int, why: str
) -> None:
    config = classes_config(ClassConfig("medium", MEDIUM, min_free=5), **pool)
    state = state_of()
    for n in range(5):
        state, _ = acquire(state, str(n), Want(4, 0, 0), config, pid=100 + n)
    new, actions = vp.plan_reconcile(state, seen(live_waiters=live(*range(100, 105)), limits=limits), config, NOW)
    assert len(kinds(actions, CreateServer)) == created
    notes = " ".join(note.message for note in kinds(actions, vp.Note))
    assert why in notes
    if why:
        assert f"class medium: not creating {10 - created} VM(s)" in notes
        assert why.split(" leaves")[0] in new.held_back["medium"]  # the acquire timeout message names it
        # jobs wait on the project's quota: its other pools are asked to give way; not on the pool's own limit
        assert new.quota_blocked_since == (NOW if limits else None)
    else:
        assert new.held_back == {} and new.quota_blocked_since is None


def test_a_single_use_vm_is_deleted_after_its_job_and_its_spare_replaced() -> None:
    config = classes_config(ClassConfig("once", SMALL, min_free=1, single_use=True))
    state = state_of(vm("o1", BUSY, job="3", vm_class="once"), vm("o2", vm_class="once"))
    state, notes = vp.plan_release(state, "3", NOW, pool=config.pool)
    once = state.vm_named("o1")
    assert once is not None and once.state == UNUSABLE and once.tainted == "single-use: served job 3"
    assert "single-use (once): to be deleted" in notes[0].message
    assert state.counters.get("tainted_releases", 0) == 0  # not a failed scrub
    state, actions = vp.plan_reconcile(state, seen(server("o1"), server("o2")), config, NOW + 1)
    assert [(d.name, d.reason) for d in kinds(actions, DeleteServer)] == [("o1", "single-use: served job 3")]
    assert kinds(actions, CreateServer) == []  # o2 is still the one spare
    state, _ = acquire(state, "4", Want(), config)
    _, actions = vp.plan_reconcile(state, seen(server("o1"), server("o2"), live_waiters=live(100)), config, NOW + 2)
    assert [c.vm_class for c in kinds(actions, CreateServer)] == ["once"]  # o2 went to job 4: a new spare


def test_free_vms_of_a_class_no_longer_configured_are_deleted() -> None:
    config = classes_config()
    state = state_of(vm("d1"), vm("d2", BUSY, job="1"))
    _, actions = vp.plan_reconcile(state, seen(server("d1"), server("d2")), config, NOW)
    assert [(d.name, d.reason) for d in kinds(actions, DeleteServer)] == [
        ("d1", "its class default is no longer configured")
    ]


def test_an_adopted_server_keeps_the_class_its_metadata_names() -> None:
    config = classes_config()
    state = PoolState(pool="p", dropped_clean={"x1": NOW - 5})
    listing = seen(server("x1", vm_class="big"))
    for offset in (0, 60):
        state, _ = vp.plan_reconcile(state, listing, config, NOW + offset)
    assert state.vm_named("x1").vm_class == "big"


def test_a_one_class_state_file_has_no_class_nor_flavor_fields_and_an_older_reader_s_fields_only() -> None:
    state = PoolState(pool="p", vms=[vm("a")], requests=[vp.Request("1", "bob", NOW, 100, HOST)])
    data = json.loads(vp.state_text(state))
    assert "flavors" not in data and "vm_class" not in data["vms"][0]
    assert not {"cores", "memory", "gpus", "vm_class"} & set(data["requests"][0])
    classed = PoolState(pool="p", vms=[vm("a", vm_class="big")], flavors={**FLAVORS})
    classed.requests = [vp.Request("1", "bob", NOW, 100, HOST, cores=4, memory=6144, vm_class="medium")]
    back = vp.state_from_json(json.loads(vp.state_text(classed)), "s.json", "p")
    assert back.vms[0].vm_class == "big" and back.flavors == FLAVORS
    assert (back.requests[0].cores, back.requests[0].memory, back.requests[0].vm_class) == (4, 6144, "medium")


@pytest.mark.parametrize(
    ("specs", "gpus"),
    [
        ({}, 0),
        ({"resources:VGPU": "1"}, 1),
        ({"resources:PGPU": "2", "hw:cpu_policy": "dedicated"}, 2),
        ({"pci_passthrough:alias": "a100:2,t4"}, 3),
    ],
)
def test_gpus_are_read_from_the_flavor_s_extra_specs(specs: dict[str, str], gpus: int) -> None:
    assert vp.gpus_of(specs) == gpus


def test_a_class_s_own_gpus_overrides_the_flavor_s() -> None:
    state = state_of()
    assert vp.class_size(state, ClassConfig("g", BIG, gpus=2)) == Want(8, 32768, 2)
    assert vp.class_size(state, ClassConfig("g", GPU)) == Want(8, 32768, 1)


@pytest.mark.parametrize(("text", "mib"), [("0", 0), ("512", 512), ("512M", 512), ("6G", 6144), ("64gb", 65536)])
def test_memory_sizes_read_as_torque_and_slurm_write_them(text: str, mib: int) -> None:
    assert vp.mebibytes(text) == mib


def test_prometheus_metrics_per_class() -> None:
    config = classes_config(ClassConfig("small", SMALL, min_free=1), ClassConfig("medium", MEDIUM))
    state = state_of(vm("s1", vm_class="small"), vm("m1", BUSY, job="1", vm_class="medium"))
    state, _ = acquire(state, "2", Want(4, 0, 0), config)
    text = vp.metrics_text(state, config, NOW)
    assert 'vmpool_class_vms{class="medium",pool="p",state="busy"} 1.0' in text
    assert 'vmpool_class_vms{class="small",pool="p",state="free"} 1.0' in text
    assert 'vmpool_class_waiting_jobs{class="medium",pool="p"} 1.0' in text
    assert 'vmpool_class_desired_vms{class="medium",pool="p"} 2.0' in text
    assert 'vmpool_class_desired_vms{class="small",pool="p"} 1.0' in text
    assert 'vmpool_class_protected_mode{class="medium",pool="p"} 0.0' in text
    state.health["medium"] = vp.ClassHealth(3, NOW - 10, NOW + 50, 60.0)
    text = vp.metrics_text(state, config, NOW)
    assert 'vmpool_class_protected_mode{class="medium",pool="p"} 1.0' in text
    assert 'vmpool_class_backoff_seconds{class="medium",pool="p"} 50.0' in text
    assert 'vmpool_class_backoff_seconds{class="small",pool="p"} 0.0' in text
    assert 'vmpool_protected_mode{pool="p"} 1.0' in text and 'vmpool_consecutive_failed_boots{pool="p"} 3.0' in text


# -- protected mode, back-off and held-back creates are the class's own --


def failed_boot(name: str, vm_class: str) -> vp.Vm:
    return vm(name, UNUSABLE, reason=vp.BUILDING, healthy=False, vm_class=vm_class)


def test_failed_boots_protect_their_class_only_the_others_boot_as_many_as_they_need() -> None:
    config = classes_config(
        ClassConfig("small", SMALL, min_free=3), ClassConfig("gpu", GPU, min_free=3), protect_after_failures=3
    )
    state = state_of(*(failed_boot(f"g{n}", "gpu") for n in range(3)))
    listing = seen(*(server(f"g{n}", vp.SERVER_ERROR) for n in range(3)))
    new, actions = vp.plan_reconcile(state, listing, config, NOW)
    assert new.health_of("gpu").protected_since == NOW and new.health_of("gpu").boot_failures == 3
    assert new.health_of("small") == vp.ClassHealth()
    notes = " ".join(note.message for note in kinds(actions, vp.Note))
    assert "protected mode of class gpu: 3 consecutive failed boots" in notes
    # the gpu class backs off (each canary waits longer); small boots its three spares
    assert [vm.vm_class for vm in new.vms if vm.reason == vp.CREATING] == ["small"] * 3
    until = new.health_of("gpu").backoff_until
    assert until is not None
    later, actions = vp.plan_reconcile(new, seen(), config, until + 1)
    created = [later.vm_named(action.name).vm_class for action in kinds(actions, CreateServer)]
    assert created.count("gpu") == 1  # one canary at a time while protected


def test_a_refused_create_backs_off_its_class_and_a_class_that_boots_clears_only_its_own() -> None:
    config = classes_config(ClassConfig("small", SMALL), ClassConfig("medium", MEDIUM))
    state = state_of(vm("m1", UNUSABLE, reason=vp.CREATING, vm_class="medium", server_id=None))
    refused, notes = vp.plan_created(state, "m1", None, vp.QuotaExceeded("Quota exceeded for cores"), config.pool, NOW)
    assert refused.health_of("medium").backing_off(NOW + 1) and not refused.health_of("small").backing_off(NOW + 1)
    assert "backing off of class medium 60s" in notes[0].message
    # jobs of both classes wait: small's VM is created in the same pass, medium's waits out its back-off
    for n, want in enumerate((Want(1, 0, 0), Want(4, 0, 0))):
        refused, _ = acquire(refused, str(n), want, config, pid=100 + n)
    new, actions = vp.plan_reconcile(refused, seen(live_waiters=live(100, 101)), config, NOW + 1)
    assert [new.vm_named(action.name).vm_class for action in kinds(actions, CreateServer)] == ["small"]
    assert "not creating 1 VM(s) of class medium: backing off until" in " ".join(
        note.message for note in kinds(actions, vp.Note)
    )
    text = vp.explain_no_vm(new, config.pool, NOW + 1, "medium")
    assert "cloud refused creates of class medium, backing off until" in text
    # the refusal of a create whose intent is gone (an admin's delete meanwhile) backs off its own class
    gone, _ = vp.plan_created(state_of(), "m9", None, vp.QuotaExceeded("quota"), config.pool, NOW, vm_class="medium")
    assert gone.health_of("medium").backing_off(NOW + 1) and vp.DEFAULT_CLASS not in gone.health
    small = next(action.name for action in kinds(actions, CreateServer))
    created, _ = vp.plan_created(new, small, "id-s", None, config.pool, NOW + 2)
    assert created.health_of("medium").backing_off(NOW + 2)  # small's success says nothing of medium's quota


def test_the_acquire_timeout_message_names_the_limit_that_holds_the_class_back() -> None:
    config = classes_config(ClassConfig("small", SMALL), ClassConfig("big", BIG, max=1), max_cores=12)
    state = state_of(vm("b1", BUSY, job="1", vm_class="big"), vm("m", BUSY, job="2", vm_class="small"))
    state, _ = acquire(state, "3", Want(8, 0, 0), config, pid=100)
    state, _ = acquire(state, "4", Want(1, 0, 0), config, pid=101)
    listing = seen(server("b1"), server("m"), live_waiters=live(100, 101))
    new, _ = vp.plan_reconcile(state, listing, config, NOW)
    assert new.held_back["big"] == "[class big] max = 1 VMs"
    assert "creates of class big held back by [class big] max = 1 VMs" in vp.explain_no_vm(new, config.pool, NOW, "big")
    assert "small" not in new.held_back  # 9 cores of 12 used: room for a 1-core VM
    assert "HELD BACK: creates of class big for waiting jobs wait on [class big] max = 1 VMs" in vp.status_text(
        new, config, NOW
    )
    tight = classes_config(ClassConfig("small", SMALL), ClassConfig("big", BIG, max=1), max_cores=9)
    new, _ = vp.plan_reconcile(state, listing, tight, NOW)
    assert new.held_back["small"].startswith("[pool] max_cores = 9 leaves room for 0 more cores")
    assert new.quota_blocked_since is None  # the pool's own limit: giving way in other pools would not help
    freed, _ = vp.plan_reconcile(new, listing, config, NOW + 1)
    assert "small" not in freed.held_back  # once a create goes out, nothing holds it back


def test_each_class_s_health_is_kept_in_the_state_file_the_one_class_s_where_it_always_was() -> None:
    state = state_of()
    state.health = {
        vp.DEFAULT_CLASS: vp.ClassHealth(2, None, NOW + 60, 60.0),
        "gpu": vp.ClassHealth(3, NOW - 5, NOW + 120, 120.0),
    }
    data = json.loads(vp.state_text(state))
    assert (data["boot_failures"], data["backoff_until"], data["backoff_delay"]) == (2, NOW + 60, 60.0)
    assert data["class_health"] == {
        "gpu": {"boot_failures": 3, "protected_since": NOW - 5, "backoff_until": NOW + 120, "backoff_delay": 120.0}
    }
    assert vp.state_from_json(data, "f", "p") == state
    worst = state.worst_health()
    assert (worst.boot_failures, worst.protected_since, worst.backoff_until) == (3, NOW - 5, NOW + 120)
    healthy = json.loads(vp.state_text(state_of()))
    assert "class_health" not in healthy and "held_back" not in healthy
    assert (healthy["boot_failures"], healthy["protected_since"]) == (0, None)  # as a state before classes has them


# --- the batch node's size: what the pool can hold at once ---


@pytest.mark.parametrize(
    ("pool", "classes", "held"),
    [
        # the largest VMs first, each class up to its max, the pool's max in VMs over all
        ({"max": 3}, {"small": 0, "medium": 1}, (6, 12288, 0)),
        (
            {"max": 10},
            {"small": 0, "medium": 2, "big": 1, "gpu": 1},
            (8 + 8 + 2 * 4 + 6 * 1, 32768 * 2 + 8192 * 2 + 2048 * 6, 1),
        ),
        # [pool] max_cores and max_memory cap what the classes allow
        ({"max": 10, "max_cores": 12, "max_memory": 20480}, {"small": 0, "big": 2}, (12, 20480, 0)),
        ({"max": 2}, {"small": 0, "gpu": 0}, (16, 65536, 2)),
    ],
)
def test_the_pool_s_capacity_is_the_most_its_classes_hold_within_its_limits(
    pool: dict[str, Any], classes: dict[str, int], held: tuple[int, int, int]
) -> None:
    flavors = {"small": SMALL, "medium": MEDIUM, "big": BIG, "gpu": GPU}
    config = classes_config(*(ClassConfig(name, flavors[name], max=most) for name, most in classes.items()), **pool)

    capacity = vp.pool_capacity(state_of(), config.pool)

    assert capacity is not None
    assert (capacity["cores"], capacity["memory"], capacity["gpus"], capacity["vms"]) == (*held, pool["max"])
    sizes = {SMALL: "1:2048:0", MEDIUM: "4:8192:0", BIG: "8:32768:0", GPU: "8:32768:1"}
    assert capacity["classes"] == "+".join(f"{name}:{sizes[flavors[name]]}" for name in classes)


def test_the_one_class_pool_holds_max_vms_of_its_flavor_and_nothing_is_known_before_its_size() -> None:
    import dataclasses

    base = one_class_config(max=4)
    pool = dataclasses.replace(base.pool, default_flavor="f")

    assert vp.pool_capacity(PoolState(pool="p"), pool) is None
    two_vcpus = PoolState(pool="p", flavors={"f": {"vcpus": 2, "ram": 4096, "gpus": 0}})
    assert vp.pool_capacity(two_vcpus, pool) == {
        "cores": 8,  # a 1-core job still takes a whole VM: 4 such jobs, not 8, run at once
        "memory": 16384,
        "gpus": 0,
        "vms": 4,
        "classes": "default:2:4096:0",
    }
    assert vp.pool_capacity(state_of(*[]), classes_config().pool) is not None
    unknown = PoolState(pool="p", flavors={SMALL: FLAVORS[SMALL]})
    assert vp.pool_capacity(unknown, classes_config().pool) is None, "medium, big and gpu not learned yet"


def test_the_pool_s_boots_nova_may_not_count_yet_are_counted_against_the_quota() -> None:
    """Nova's /limits counts a server once scheduled: two 4-core VMs still building, used 0 of 9
    cores, leave room for none more (asked, Nova's own quota check would refuse it)."""
    config = classes_config(ClassConfig("medium", MEDIUM))
    building = [vm(f"m{n}", UNUSABLE, reason=vp.BUILDING, healthy=False, vm_class="medium") for n in (1, 2)]
    state = state_of(*building)
    for n in range(3):
        state, _ = acquire(state, str(n), Want(4, 0, 0), config, pid=100 + n)
    limits = {"maxTotalCores": 9, "totalCoresUsed": 0}
    listing = seen(
        *(server(v.name, vp.SERVER_BUILDING) for v in building), live_waiters=live(100, 101, 102), limits=limits
    )
    new, actions = vp.plan_reconcile(state, listing, config, NOW)
    assert kinds(actions, CreateServer) == []
    assert new.held_back["medium"].startswith("the project's quota maxTotalCores = 9 (0 used) leaves room for 1 more")
