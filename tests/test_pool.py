"""The executor (class Pool) over fakes that implement the Cloud and Remote interfaces.

Fast checks of the intent -> unlocked call -> record flow; the same behaviours are shown over the
real Nova API and sshd VMs in test_cli_e2e.py and test_reliability.py.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import vmpool as vp
from tests.cloud_fakes import AlonePoolProject
from tests.conftest import pinned_hosts


def host_key(server_id: str) -> str:
    return "ssh-ed25519 KEY" + server_id.replace("-", "")


class FakeCloud(AlonePoolProject):
    """Servers in a dict; a server is ACTIVE after `build_lists` listings; failures injected per call."""

    def __init__(self, build_lists: int = 1):
        self.servers: dict[str, dict] = {}
        self.calls: list[str] = []
        self.build_lists = build_lists
        self.fail_create: vp.CloudError | None = None
        self._ids = itertools.count(1)

    def list_servers(self) -> list[vp.Server]:
        self.calls.append("list")
        for server in self.servers.values():
            server["lists"] += 1
        return [
            vp.Server(
                id=sid,
                name=s["name"],
                vm_name=s["name"],
                address=s["address"],
                status=vp.SERVER_ACTIVE if s["lists"] > self.build_lists else vp.SERVER_BUILDING,
            )
            for sid, s in self.servers.items()
        ]

    def create_server(self, name: str, vm_class: str = vp.DEFAULT_CLASS) -> str:
        self.calls.append("create")
        if self.fail_create is not None:
            raise self.fail_create
        number = next(self._ids)
        sid = f"srv-{number}"
        self.servers[sid] = {"name": name, "address": f"127.0.9.{number}", "lists": 0}
        return sid

    def delete_server(self, server_id: str) -> None:
        self.calls.append("delete")
        if self.servers.pop(server_id, None) is None:
            raise vp.ServerGone(f"delete server: {server_id} not found")

    def console_output(self, server_id: str) -> str:
        self.calls.append("console")
        return f"-----BEGIN SSH HOST KEY KEYS-----\n{host_key(server_id)}\n-----END SSH HOST KEY KEYS-----\n"


class FakeRemote:
    """Every VM answers SSH unless its address is in `down`."""

    def __init__(self) -> None:
        self.down: set[str] = set()

    def probe(self, address: str, host_keys: Sequence[str]) -> vp.ProbeResult:
        if address in self.down:
            return vp.ProbeResult(address, False, "ssh: connection refused")
        return vp.ProbeResult(address, True)

    def probe_all(self, targets: Sequence[tuple[str, Sequence[str]]]) -> list[vp.ProbeResult]:
        return [self.probe(address, keys) for address, keys in targets]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[vp.Pool, FakeCloud, FakeRemote]:
    config = vp.Config(
        path="test.conf",
        pool=vp.PoolConfig(
            name="p",
            min=0,
            max=3,
            min_free=0,
            state_file=str(tmp_path / "state" / "state.json"),
            acquire_poll=0.01,
            pass_interval=0.01,
            backoff_initial=60,
        ),
        openstack=vp.OpenStackConfig(
            auth_url="http://127.0.0.1:9",
            image="i",
            flavor="f",
            network="n",
            username="u",
            password="p",
            project_name="p",
        ),
        ssh=vp.SshConfig(private_key=str(tmp_path / "key"), known_hosts=str(tmp_path / "known_hosts")),
    )
    cloud = FakeCloud()
    remote = FakeRemote()
    return vp.Pool(config, cloud=cloud, remote=remote), cloud, remote


def with_pool(pool: vp.Pool, **changes: Any) -> vp.Pool:
    import dataclasses

    config = dataclasses.replace(pool.config, pool=dataclasses.replace(pool.config.pool, **changes))
    return vp.Pool(config, cloud=pool.cloud, remote=pool.remote)


def filled(pool: vp.Pool, vms: int) -> vp.Pool:
    """The pool at min = max = vms, every VM Free: one pass creates them, the next probes them."""
    pool = with_pool(pool, min=vms, max=vms)
    pool.reconcile()
    pool.reconcile()
    return pool


def test_reconcile_creates_to_min_with_one_listing_per_pass(setup: tuple[vp.Pool, FakeCloud, FakeRemote]) -> None:
    pool, cloud, _ = setup
    pool = with_pool(pool, min=2)
    assert pool.reconcile()
    assert cloud.calls == ["list", "create", "create"]
    cloud.calls.clear()
    pool.reconcile()
    pool.reconcile()
    assert cloud.calls.count("list") == 2 and "create" not in cloud.calls
    state = pool.store.read()
    assert [vm.state for vm in state.vms] == [vp.FREE, vp.FREE]
    assert all(vm.host_keys == [host_key(vm.server_id or "")] for vm in state.vms)


def test_a_step_that_fails_unexpectedly_is_logged_and_the_later_steps_still_run(
    setup: tuple[vp.Pool, FakeCloud, FakeRemote], caplog: pytest.LogCaptureFixture
) -> None:
    pool, cloud, _ = setup
    pool = with_pool(pool, min=1, unusable_timeout=0.001)  # a dirty VM is deleted on the next pass
    pool.reconcile()
    pool.reconcile()
    doomed = pool.acquire("1", "u", 5).vm
    pool.release("1", "dirty")

    def broken_delete(server_id: str) -> None:
        raise RuntimeError("a bug in the delete step")

    known_hosts = Path(pool.config.ssh.known_hosts)
    assert doomed.address in pinned_hosts(known_hosts)
    cloud.delete_server = broken_delete  # type: ignore[method-assign]
    pool.reconcile()  # deletes the dirty VM (fails) and creates its replacement (must still run)
    assert "reconcile step 'delete servers' failed unexpectedly" in caplog.text
    assert cloud.calls.count("create") == 2
    assert doomed.server_id in cloud.servers
    assert doomed.address not in pinned_hosts(known_hosts)  # the last step ran too: a deleting VM is unpinned


def test_free_vms_are_in_known_hosts_as_soon_as_the_state_says_free(
    setup: tuple[vp.Pool, FakeCloud, FakeRemote],
) -> None:
    pool, _, _ = setup
    pool = with_pool(pool, min=1)
    real_save = pool.store.save

    def check_then_save(state: vp.PoolState) -> None:
        for vm in state.vms:
            if vm.state == vp.FREE:
                text = Path(pool.config.ssh.known_hosts).read_text()
                assert f"{vm.address} {vm.host_keys[0]}" in text, "claimable before its key is pinned"
        real_save(state)

    pool.store.save = check_then_save  # type: ignore[method-assign]
    for _ in range(3):
        pool.reconcile()
    assert pool.store.read().count(vp.FREE) == 1


def test_acquire_on_an_empty_pool_boots_and_claims(setup: tuple[vp.Pool, FakeCloud, FakeRemote]) -> None:
    pool, cloud, _ = setup
    vm = pool.acquire("1", "alice", timeout=5).vm
    assert vm.job == "1" and cloud.calls.count("create") == 1
    assert pool.store.read().requests == []


class FakeTime:
    """Injected clocks: sleep advances the monotonic clock at once; the wall clock may be stepped."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_800_000_000.0
        self.sleeps = 0

    def monotonic(self) -> float:
        return self.mono

    def clock(self) -> float:
        return self.wall

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.mono += seconds
        self.wall += seconds


def timed(pool: vp.Pool, fake: FakeTime) -> vp.Pool:
    # the boot clock too: against the real one, a slow (loaded) run would look like a wall-clock step
    return vp.Pool(
        pool.config,
        clock=fake.clock,
        cloud=pool.cloud,
        remote=pool.remote,
        monotonic=fake.monotonic,
        sleep=fake.sleep,
        boot_clock=lambda: ("fake-boot", fake.mono),
    )


def test_acquire_timeout_withdraws_the_request(setup: tuple[vp.Pool, FakeCloud, FakeRemote]) -> None:
    pool, cloud, _ = setup
    fake = FakeTime()
    cloud.fail_create = vp.QuotaExceeded("create server: quota exceeded for instances")
    with pytest.raises(vp.NoVmAvailable, match="backing off"):
        timed(pool, fake).acquire("1", "alice", timeout=2)  # inside the 60 s back-off: one create
    state = pool.store.read()
    assert state.requests == [] and state.vms == [] and cloud.calls.count("create") == 1
    assert fake.mono >= 102 and 199 <= fake.sleeps <= 201, "the wait is counted on the injected monotonic clock"


def test_a_wall_clock_step_back_does_not_stretch_the_acquire_timeout(
    setup: tuple[vp.Pool, FakeCloud, FakeRemote],
) -> None:
    pool, cloud, _ = setup
    fake = FakeTime()
    cloud.fail_create = vp.QuotaExceeded("create server: quota exceeded for instances")
    stepping = timed(pool, fake)
    real_sleep = fake.sleep

    def sleep_and_step_back(seconds: float) -> None:
        real_sleep(seconds)
        fake.wall -= 3600 if fake.sleeps == 3 else 0  # NTP steps the clock back an hour mid-wait

    stepping.sleep = sleep_and_step_back
    with pytest.raises(vp.NoVmAvailable):
        stepping.acquire("1", "alice", timeout=2)
    assert fake.mono - 100 < 2.1, "the timeout fired after 2 s of real (monotonic) time"


def test_delete_of_a_server_already_gone_drops_the_record(setup: tuple[vp.Pool, FakeCloud, FakeRemote]) -> None:
    pool, cloud, _ = setup
    pool = with_pool(pool, min=1)
    pool.reconcile()
    pool.reconcile()
    sid = pool.store.read().vms[0].server_id
    assert sid is not None
    cloud.servers.pop(sid)  # deleted behind our back, and then we decide to delete it too
    vp.ReconcilePass(pool)._delete([vp.DeleteServer(pool.store.read().vms[0].name, sid, "test")])
    assert pool.store.read().vms == []


def test_unreachable_free_vm_is_not_handed_out(setup: tuple[vp.Pool, FakeCloud, FakeRemote]) -> None:
    pool, _, remote = setup
    pool = with_pool(pool, min=1, max=1)
    pool.reconcile()
    pool.reconcile()
    remote.down.add(pool.store.read().vms[0].address or "")
    pool.reconcile()
    assert pool.store.read().vms[0].state == vp.UNUSABLE
    with pytest.raises(vp.NoVmAvailable):
        pool.acquire("1", "alice", timeout=0.2)


@contextlib.contextmanager
def lock_held_elsewhere(pool: vp.Pool, until: threading.Event) -> Iterator[None]:
    """Another process's view of the pool's state lock holds it from a thread until `until` is set."""
    other = vp.StateStore(pool.config.pool.state_file, "p", 10)
    taken = threading.Event()

    def hold() -> None:
        with other.locked():
            taken.set()
            until.wait(timeout=30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(timeout=10)
    try:
        yield
    finally:
        until.set()
        holder.join()


def test_an_acquire_outlasts_a_state_lock_busy_past_lock_timeout(
    setup: tuple[vp.Pool, FakeCloud, FakeRemote], caplog: pytest.LogCaptureFixture
) -> None:
    """A few hundred prologues at once can keep the lock busy past lock_timeout: that is contention,
    and the acquire tries again until its own deadline instead of failing the job (exit 7)."""
    pool, _, _ = setup
    pool = with_pool(pool, min=1, max=1, lock_timeout=0.3)
    pool.reconcile()
    pool.reconcile()
    warned = threading.Event()
    caplog.set_level("WARNING")
    with lock_held_elsewhere(pool, until=warned):
        watcher = threading.Thread(target=lambda: warned.set() if _wait_for_log(caplog, "trying again") else None)
        watcher.start()
        claimed = pool.acquire("1", "alice", timeout=30)
        watcher.join()
        assert warned.is_set(), "the acquire waited past lock_timeout and said it would try again"
    assert claimed.vm.job == "1" and pool.store.read().vm_of_job("1") is not None


def test_an_acquire_gives_up_on_a_stuck_lock_at_its_own_deadline(setup: tuple[vp.Pool, FakeCloud, FakeRemote]) -> None:
    pool, _, _ = setup
    pool = with_pool(pool, min=1, max=1, lock_timeout=0.3)
    pool.reconcile()
    pool.reconcile()
    with lock_held_elsewhere(pool, until=threading.Event()):
        began = time.monotonic()
        with pytest.raises(vp.LockTimeout):
            pool.acquire("1", "alice", timeout=1.5)
        assert time.monotonic() - began >= 1.5, "it kept trying until the acquire's timeout"
    assert pool.store.read().vm_of_job("1") is None


def test_a_waiter_at_max_with_every_vm_busy_runs_no_pass_of_its_own(
    setup: tuple[vp.Pool, FakeCloud, FakeRemote],
) -> None:
    """Only a release can bring it a VM; a pass would cost every waiter the cloud client's import."""
    pool, cloud, _ = setup
    pool = filled(pool, 1)
    pool.acquire("1", "alice", timeout=1)
    cloud.calls.clear()
    with pytest.raises(vp.NoVmAvailable):
        pool.acquire("2", "bob", timeout=0.3)
    assert cloud.calls == [], "no listing, no create: the pool is at max and nothing is Unusable"


def _wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in record.getMessage() for record in list(caplog.records)):
            return True
        time.sleep(0.01)
    return False


def test_probe_threads_are_bounded_by_the_login_slots_the_targets_and_the_open_files_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    assert vp.probe_threads(logins=64, targets=500) == vp.WAITS_PER_LOGIN * 64 == 256
    assert vp.probe_threads(logins=128, targets=500) == 500
    assert vp.probe_threads(logins=128, targets=30) == 30
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 4096))
    assert vp.probe_threads(logins=128, targets=500) == 128  # half the limit: the rest is for the logins
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert vp.probe_threads(logins=2, targets=500) == 8
    assert vp.probe_threads(logins=1, targets=0) == 1


def test_a_waiter_far_back_looks_again_within_a_poll_of_the_vms_its_place_needs_coming_free(
    setup: tuple[vp.Pool, FakeCloud, FakeRemote],
) -> None:
    """While the queue stands still it sleeps WAITER_POLL_STRETCH polls between looks; the
    releases that free the VMs its place needs wake it within one poll (the store's freed mark)."""
    import dataclasses
    import os

    pool, _, _ = setup
    fake = FakeTime()
    pool = timed(with_pool(pool, min=3, max=3), fake)
    pool.reconcile()
    pool.reconcile()
    for job in ("1", "2", "3"):
        pool.acquire(job, "alice", timeout=1)
    ahead = vp.Request(
        job="9", user="carol", since=fake.wall, pid=os.getpid(), host=pool.host, pid_start=vp.process_start(os.getpid())
    )  # a live waiter ahead: this one needs 2 VMs
    pool.store.update(lambda state: (dataclasses.replace(state, requests=[ahead]), None))
    poll = pool.config.pool.acquire_poll
    released_at: list[float] = []

    def sleep_while_two_jobs_end(seconds: float) -> None:
        assert seconds <= poll * 1.001, "the long sleep is taken one poll at a time"
        fake.sleep(seconds)
        if not released_at:
            pool.release("1")
            pool.release("2")
            released_at.append(fake.mono)

    pool.sleep = sleep_while_two_jobs_end
    claimed = pool.acquire("4", "dave", timeout=60)
    assert claimed.vm.job == "4" and released_at
    assert fake.mono - released_at[0] < poll, "it looked again at once, not after its stretched sleep"


def _waiting(pool: vp.Pool, *jobs: str) -> None:
    """Queue live requests (this test process) for the jobs, in order, as sleeping acquires would."""
    import dataclasses
    import os

    requests = [
        vp.Request(
            job=job,
            user="carol",
            since=time.time(),
            pid=os.getpid(),
            host=pool.host,
            pid_start=vp.process_start(os.getpid()),
        )
        for job in jobs
    ]
    pool.store.update(lambda state: (dataclasses.replace(state, requests=requests), None))


def test_a_release_hands_its_vm_to_the_first_waiter_in_the_same_write(
    setup: tuple[vp.Pool, FakeCloud, FakeRemote],
) -> None:
    pool, _, _ = setup
    pool = filled(pool, 2)
    first, second = (pool.acquire(job, "alice", timeout=1).vm.name for job in ("1", "2"))
    _waiting(pool, "8", "9")
    mark = pool.store.freed_mark()
    pool.release("2")
    state = pool.store.read()
    assert state.vm_named(second).job == "8" and state.vm_named(second).state == vp.BUSY
    assert [r.job for r in state.requests] == ["9"] and [r.job for r in state.handed] == ["8"]
    assert vp.vms_freed_since(mark, pool.store.freed_mark()) == 1, "the sleeping waiters are woken"
    pool.release("1")
    claimed = pool.acquire("9", "carol", timeout=1)
    assert claimed.vm.name == first and claimed.handed and not claimed.already_held
    assert [r.job for r in pool.store.read().handed] == ["8"]


def test_a_vm_handed_over_as_the_acquire_times_out_is_taken_not_dropped(
    setup: tuple[vp.Pool, FakeCloud, FakeRemote],
) -> None:
    pool, _, _ = setup
    fake = FakeTime()
    pool = timed(with_pool(pool, min=1, max=1), fake)
    pool.reconcile()
    pool.reconcile()
    held = pool.acquire("1", "alice", timeout=1).vm.name

    def sleep_past_the_deadline_while_job_1_ends(seconds: float) -> None:
        fake.sleep(10)
        if pool.store.read().vm_named(held).job == "1":
            pool.release("1")  # handed to job 2 after its last look, before its deadline's check

    pool.sleep = sleep_past_the_deadline_while_job_1_ends
    claimed = pool.acquire("2", "bob", timeout=5)
    assert claimed.vm.name == held and claimed.handed
    state = pool.store.read()
    assert state.vm_named(held).job == "2" and state.handed == [] and state.requests == []
