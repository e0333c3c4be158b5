"""Builders for the policy's tests: a config, VMs, servers and observations in a line each."""

from __future__ import annotations

from typing import Any

import vmpool as vp
from vmpool import FREE, Config, Observation, OpenStackConfig, PoolConfig, PoolState, Server, SshConfig, Vm

NOW = 1_000_000.0
HOST = "worker"


def config(**pool: Any) -> Config:
    defaults: dict[str, Any] = dict(
        name="p",
        min=0,
        max=4,
        min_free=0,
        state_file="/tmp/x/state.json",
        build_timeout=600,
        ready_timeout=300,
        unusable_timeout=600,
        idle_timeout=1800,
        delete_timeout=300,
        create_grace=120,
        protect_after_failures=3,
        backoff_initial=60,
        backoff_max=900,
    )
    defaults.update(pool)
    return Config(
        path="test.conf",
        pool=PoolConfig(**defaults),
        openstack=OpenStackConfig(
            auth_url="http://x", image="i", flavor="f", network="n", username="u", password="p", project_name="p"
        ),
        ssh=SshConfig(),
    )


def vm(
    name: str,
    state: vp.VmState = FREE,
    *,
    reason: str = "",
    since: float = NOW - 10,
    server_id: str | None = None,
    address: str | None = "127.0.1.2",
    job: str | None = None,
    healthy: bool = True,
    **extra: Any,
) -> Vm:
    return Vm(
        name=name,
        state=state,
        reason=reason,
        since=since,
        created_at=since,
        server_id=server_id if server_id is not None else f"id-{name}",
        address=address,
        job=job,
        user=extra.pop("user", "alice" if job else None),
        last_healthy=since if healthy else None,
        host_keys=extra.pop("host_keys", ["ssh-ed25519 AAAA"] if healthy else []),
        **extra,
    )


def server(name: str, status: str = vp.SERVER_ACTIVE, **extra: Any) -> Server:
    return Server(
        id=f"id-{name}", name=name, vm_name=name, status=status, address=extra.pop("address", "127.0.1.2"), **extra
    )


def seen(*servers: Server, **extra: Any) -> Observation:
    return Observation(servers=list(servers), host=HOST, **extra)


def the(state: PoolState, name: str) -> Vm:
    """The state's VM of that name (a test's own VMs: there)."""
    found = state.vm_named(name)
    assert found is not None, name
    return found


def live(*pids: int) -> frozenset[tuple[int, int]]:
    """Live waiters as the executor sees them, for requests made with no start time recorded."""
    return frozenset((pid, 0) for pid in pids)


def kinds(actions: list[vp.Action], kind: type) -> list:
    return [action for action in actions if isinstance(action, kind)]


def queued(*jobs: str, host: str = HOST) -> list[vp.Request]:
    """Waiting requests, in queue order: job N's acquire is pid 100 + N."""
    return [vp.Request(job, "bob", NOW - 30 + n, 100 + n, host) for n, job in enumerate(jobs)]


def health_state(**fields: Any) -> PoolState:
    """A PoolState whose one class ("default") has the health given as boot_failures,
    protected_since, backoff_until, backoff_delay (the keys a state file keeps it under)."""
    legacy = {name: fields.pop(name) for name in vp.LEGACY_HEALTH if name in fields}
    return PoolState(**fields, health={vp.DEFAULT_CLASS: vp.ClassHealth(**legacy)} if legacy else {})
