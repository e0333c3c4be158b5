"""Benchmark: the SSH probe step of a reconcile pass, one VM at a time vs in parallel.

Boots stand-in VMs (the test bed's sshd namespaces, no cloud needed) on 127.0.6.x and times
vmpool's probe step (`ReconcilePass._probe`: real fabric/paramiko against the pinned host keys, then one
locked state write) with `probe_parallelism` 1, 4 and 16: first with every sshd healthy, then
with some frozen before their banner (each such probe waits out `banner_timeout`). Checks the
outcome too: healthy VMs end Free, frozen ones Unusable. Needs root (namespaces, iptables).

    .venv/bin/python bench/bench_probes.py [--vms 20] [--frozen 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.cloud.vms, from a checkout

from bench_fast_path import write_config
from results import record

import vmpool as vp
from tests.cloud.vms import VmSupervisor

BANNER_TIMEOUT = 1.0


def config_with(directory: Path, parallelism: int) -> vp.Config:
    ssh = (
        f"connect_timeout = 1\nbanner_timeout = {BANNER_TIMEOUT}\nauth_timeout = 2\ncommand_timeout = 5\n"
        f"probe_parallelism = {parallelism}\n"
    )
    return vp.load_config(write_config(directory / f"vmpool-{parallelism}.conf", directory, 100, ssh))


def reset_state(store: vp.StateStore, probes: list[vp.ProbeSsh]) -> None:
    """Every VM Unusable(unreachable) but once healthy: the probe decides what it is now."""
    now = time.time()
    vms = [
        vp.Vm(
            name=p.name,
            state=vp.UNUSABLE,
            reason=vp.UNREACHABLE,
            since=now,
            created_at=now - 60,
            server_id=p.server_id,
            address=p.address,
            last_healthy=now - 30,
            host_keys=list(p.host_keys),
        )
        for p in probes
    ]
    store.update(lambda _: (vp.PoolState(pool="bench", vms=vms), None))


def timed_probe(directory: Path, parallelism: int, probes: list[vp.ProbeSsh], rounds: int) -> tuple[float, dict]:
    pool = vp.Pool(config_with(directory, parallelism))
    samples = []
    for _ in range(rounds):
        reset_state(pool.store, probes)
        started = time.perf_counter()
        vp.ReconcilePass(pool)._probe(probes)  # the step reconcile runs for every VM it wants to (re)check
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), {vm.name: vm.state for vm in pool.store.read().vms}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--frozen", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name in ("vmpool", "paramiko"):  # the figures only: the outcome is checked below
        logging.getLogger(name).addHandler(logging.NullHandler())
    ok = True
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        directory = Path(tmp)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "key")], check=True)
        public_key = (directory / "key.pub").read_text()
        sup = VmSupervisor(directory / "vms")
        try:
            started = time.perf_counter()
            probes = []
            for n in range(args.vms):
                vm_id, address = f"bench-{n:04d}", f"127.0.6.{n + 2}"
                sup.start(vm_id, address, public_key)
                keys = vp.host_keys_from_console(sup.console_text(vm_id))
                probes.append(vp.ProbeSsh(vm_id, f"id-{n}", address, tuple(keys)))
            print(f"{args.vms} stand-in VMs booted in {time.perf_counter() - started:.1f}s")

            print(f"probe step, {args.vms} healthy VMs (median of {args.rounds}):")
            healthy: dict[int, float] = {}
            for parallelism in (1, 4, 16):
                seconds, states = timed_probe(directory, parallelism, probes, args.rounds)
                healthy[parallelism] = seconds
                free = sum(1 for state in states.values() if state == vp.FREE)
                print(f"  probe_parallelism {parallelism:2d}: {seconds:6.2f} s   ({free}/{args.vms} Free)")
                ok &= free == args.vms

            frozen = {p.name for p in probes[: args.frozen]}
            for name in frozen:
                sup.set_fault(name, "hang")
            print(
                f"probe step, {args.frozen} of {args.vms} VMs frozen before the banner "
                f"(banner_timeout {BANNER_TIMEOUT:g}s, median of {args.rounds}):"
            )
            dead: dict[int, float] = {}
            for parallelism in (1, 16):
                seconds, states = timed_probe(directory, parallelism, probes, args.rounds)
                dead[parallelism] = seconds
                right = sum(1 for name, state in states.items() if (state == vp.FREE) == (name not in frozen))
                print(f"  probe_parallelism {parallelism:2d}: {seconds:6.2f} s   ({right}/{args.vms} classified right)")
                ok &= right == args.vms
            record(
                "probes",
                what=f"the SSH probe step of a pass, {args.vms} stand-in VMs, `probe_parallelism` "
                f"1 / 4 / 16; then {args.frozen} of them frozen before the banner (`banner_timeout` "
                f"{BANNER_TIMEOUT:g} s), 1 / 16",
                target="every VM classified right (no time target)",
                figure=f"healthy {' / '.join(f'{s:.2f}' for s in healthy.values())} s; "
                f"{args.frozen} frozen {' / '.join(f'{s:.2f}' for s in dead.values())} s",
                value=round(healthy[16], 2),
                unit="s",
                met=ok,
            )
        finally:
            sup.close()
    if not ok:
        print("FAILED: a probe classified a VM wrongly", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
