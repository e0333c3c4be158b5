"""The state store: atomic writes, locking, corrupt or foreign files left untouched."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

import vmpool as vp


def store(tmp_path: Path, lock_timeout: float = 5) -> vp.StateStore:
    return vp.StateStore(str(tmp_path / "state" / "state.json"), "p", lock_timeout)


def add_vm(state: vp.PoolState) -> tuple[vp.PoolState, None]:
    state.vms.append(vp.Vm(name=f"v{len(state.vms)}", state=vp.FREE, since=1.0, created_at=1.0))
    return state, None


def test_missing_state_is_an_empty_pool_and_first_write_is_private(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.read() == vp.PoolState(pool="p")
    s.update(add_vm)
    mode = os.stat(s.path).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(s.path)).st_mode) == 0o700
    assert [vm.name for vm in s.read().vms] == ["v0"]
    data = json.loads(Path(s.path).read_text())
    assert (data["schema"], data["version"]) == ("vmpool-state", 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "corrupt state"),
        ('{"schema": "vmpool-state", "version": 1, "pool": "p", "vms": [{"nam', "corrupt state"),
        ("", "corrupt state"),
        ('{"hello": "world"}', "not a vmpool state file"),
        ('{"schema": "vmpool-state", "version": 99, "pool": "p"}', "newer vmpool"),
        ('{"schema": "vmpool-state", "version": 1, "pool": "other"}', "belongs to pool 'other'"),
        ('{"schema": "vmpool-state", "version": 1, "pool": "p", "vms": [{"x": 1}]}', "malformed state"),
    ],
)
def test_bad_state_is_refused_and_left_untouched(tmp_path: Path, content: str, message: str) -> None:
    s = store(tmp_path)
    os.makedirs(os.path.dirname(s.path), mode=0o700)
    Path(s.path).write_text(content)
    os.chmod(s.path, 0o600)
    with pytest.raises(vp.StateError, match=message) as caught:
        s.update(add_vm)
    assert caught.value.exit_code == 4
    assert Path(s.path).read_text() == content


def test_group_writable_state_is_refused(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.update(add_vm)
    os.chmod(s.path, 0o666)
    with pytest.raises(vp.StateError, match="writable by group/others"):
        s.read()


def test_world_readable_state_is_made_private_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path)
    s.update(add_vm)
    os.chmod(s.path, 0o644)
    assert [vm.name for vm in s.read().vms] == ["v0"]
    assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o600
    assert "readable by group/others (mode 0644); made it 0600" in caplog.text


def test_failed_write_keeps_the_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path)
    s.update(add_vm)
    before = Path(s.path).read_text()

    def power_loss(src: str, dst: str) -> None:
        raise OSError("power lost before rename")

    monkeypatch.setattr(os, "replace", power_loss)
    with pytest.raises(vp.StateAccessError, match="power lost"):  # one sentence, never a traceback
        s.update(add_vm)
    assert Path(s.path).read_text() == before
    assert [p.name for p in Path(s.path).parent.iterdir() if p.name.endswith(".tmp")] == []


def test_write_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "f.json"
    vp.write_atomically(str(target), "x")
    assert synced[0].startswith(str(tmp_path / ".f.json.")) and synced[-1] == str(tmp_path)


def _hold_lock(path: str, ready: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event) -> None:
    s = vp.StateStore(path, "p", 5)
    with s.locked():
        ready.set()
        done.wait(30)


def test_lock_timeout_is_a_distinct_error(tmp_path: Path) -> None:
    s = store(tmp_path, lock_timeout=0.3)
    os.makedirs(os.path.dirname(s.path), mode=0o700)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(s.path, ready, done))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(vp.LockTimeout) as caught:
            s.update(add_vm)
        assert caught.value.exit_code == 7
    finally:
        done.set()
        holder.join(10)
    s.update(add_vm)  # free again once the holder let go


def _add_many(path: str, count: int) -> None:
    s = vp.StateStore(path, "p", 30)
    for _ in range(count):
        s.update(add_vm)


def test_concurrent_writers_lose_no_update(tmp_path: Path) -> None:
    s = store(tmp_path)
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_add_many, args=(s.path, 25)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(s.read().vms) == 100


def test_reconcile_lock_is_exclusive(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "state.json")
    with vp.reconcile_lock(path) as first:
        assert first
        ctx = multiprocessing.get_context("fork")
        queue = ctx.SimpleQueue()

        def probe() -> None:
            with vp.reconcile_lock(path) as got:
                queue.put(got)

        child = ctx.Process(target=probe)
        child.start()
        child.join(10)
        assert queue.get() is False
    with vp.reconcile_lock(path) as again:
        assert again


def test_temp_files_of_a_killed_writer_are_swept_under_the_lock(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.update(add_vm)
    leftover = Path(s.path).parent / ".state.json.abc123.tmp"
    leftover.write_text("half a state")
    other = Path(s.path).parent / ".known_hosts.x.tmp"
    other.write_text("not ours")
    s.update(add_vm)
    assert not leftover.exists() and other.exists()


def _hold_lock_writing(path: str, ready: Any, seconds: float) -> None:
    """Hold the lock for `seconds`, replacing the state every 50 ms: a lock that is busy, not stuck."""
    s = vp.StateStore(path, "p", 30)
    with s.locked():
        ready.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.save(s.load())
            time.sleep(0.05)


def test_a_lock_busy_past_lock_timeout_while_the_state_keeps_changing_is_waited_for(tmp_path: Path) -> None:
    """A burst of commands taking their turns is not a stuck holder: a release must not be lost to it."""
    s = store(tmp_path, lock_timeout=0.4)
    os.makedirs(os.path.dirname(s.path), mode=0o700)
    s.save(vp.PoolState(pool="p"))
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock_writing, args=(s.path, ready, 1.5))
    holder.start()
    try:
        assert ready.wait(10)
        began = time.monotonic()
        s.update(add_vm)
        assert time.monotonic() - began > 0.4, "it waited past lock_timeout, as the state kept changing"
    finally:
        holder.join(10)
    assert [vm.name for vm in s.load().vms] == ["v0"]
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock_writing, args=(s.path, ready, 1.5))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(vp.LockTimeout):  # a caller with a deadline of its own (acquire) retries itself
            s.update(add_vm, lock_timeout=0.4)
    finally:
        holder.join(10)
