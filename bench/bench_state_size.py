"""Benchmark: acquire + release as the state grows, and whether the state's history stays bounded.

In process (the store and the policy only, no process start): one acquire + release of a Free VM
with 200 and 2,000 VM records. Target: no worse than linear, i.e. the 2,000-VM figure at most
10x the 200-VM one (x1.2 for noise). The share of it that is the policy's copies of the state (copy_state)
is printed for the policy's owner. Then the CLI (a new process each) at both sizes, and served jobs
on a 200-VM pool: once the history the state keeps is full (the last ENDED_JOBS_KEPT releases),
1,000 more jobs must not grow the state file (<= 2%).
Exit 1 when a target or a check fails.

    .venv/bin/python bench/bench_state_size.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_fast_path import VMPOOL, compile_vmpool, make_pool
from results import record

import vmpool as vp

SIZES = (200, 2000)
SLACK = 1.2


def median_of(rounds: int, run: object) -> float:
    samples = []
    for n in range(rounds):
        started = time.perf_counter()
        run(n)  # type: ignore[operator]
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    compile_vmpool()
    ok = True
    inproc: dict[int, float] = {}
    print(f"acquire + release vs state size (load {os.getloadavg()[0]:.1f}):")
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        for size in SIZES:
            directory = Path(tmp) / str(size)
            directory.mkdir()
            config = make_pool(directory, size)
            pool = vp.Pool(vp.load_config(config))

            def cycle(n: int, pool: vp.Pool = pool) -> None:
                pool.acquire(f"{1000 + n}", "u", timeout=5)
                pool.release(f"{1000 + n}")

            inproc[size] = median_of(args.rounds, cycle)
            state = pool.store.read()
            deepcopy = median_of(args.rounds, lambda _, state=state: vp.copy_state(state))
            load = median_of(args.rounds, lambda _, pool=pool: pool.store.load())
            to_text = getattr(vp, "state_text", None) or (  # an older vmpool (a baseline run): its own format
                lambda state: json.dumps(vp.state_to_json(state), indent=1, sort_keys=True)
            )
            text = median_of(args.rounds, lambda _, state=state, to_text=to_text: to_text(state))
            write = median_of(10, lambda _, pool=pool, state=state: pool.store.save(state))

            def cli(n: int, config: str = config) -> None:
                subprocess.run([VMPOOL, "--config", config, "acquire", f"{5000 + n}"], check=True, capture_output=True)
                subprocess.run([VMPOOL, "--config", config, "release", f"{5000 + n}"], check=True, capture_output=True)

            command = median_of(max(10, args.rounds // 3), cli)
            print(
                f"  {size:5d} VMs ({os.path.getsize(pool.store.path) / 1024:5.0f} KiB): in process "
                f"{inproc[size] * 1000:6.1f} ms; CLI (2 processes) {command * 1000:6.0f} ms"
            )
            print(
                f"  {'':5s}       per read-modify-write: load {load * 1000:5.1f} ms, policy's copy_state "
                f"{deepcopy * 1000:5.1f} ms (x1 per update), text {text * 1000:5.1f} ms, "
                f"write+fsync {write * 1000:5.1f} ms"
            )
        small, large = SIZES
        growth = inproc[large] / inproc[small]
        limit = large / small * SLACK
        print(
            f"  {large} vs {small} VMs: {growth:.1f}x for {large / small:.0f}x the records "
            f"(target <= {limit:.0f}x: no worse than linear)"
        )
        ok &= growth <= limit

        # The history the state keeps (ended_jobs: the last ENDED_JOBS_KEPT releases) fills first;
        # past that bound, serving more jobs must not grow the file.
        directory = Path(tmp) / "history"
        directory.mkdir()
        pool = vp.Pool(vp.load_config(make_pool(directory, 200)))
        served = 0

        def serve(jobs: int) -> int:
            nonlocal served
            for _ in range(jobs):
                pool.acquire(f"{100000 + served}", "u", timeout=5)
                pool.release(f"{100000 + served}")
                served += 1
            return os.path.getsize(pool.store.path)

        first = serve(20)
        full = serve(vp.ENDED_JOBS_KEPT)
        after = serve(1000)
        print(
            f"  history: state file {first} bytes after 20 jobs, {full} after {served - 1000:,} (the kept "
            f"history full), {after} after {served:,}: {(after / full - 1) * 100:+.1f}% over the last 1,000 "
            "(target <= +2%: bounded)"
        )
        ok &= after <= full * 1.02
        record(
            "state_size",
            what=f"acquire + release in process, {large:,} vs {small} VM records; then the state "
            "file over 1,000 more served jobs once its kept history is full",
            target=f"<= {limit:.0f}x (no worse than linear); the file grows <= 2%",
            figure=f"{growth:.1f}x ({inproc[small] * 1000:.1f} vs {inproc[large] * 1000:.1f} ms); "
            f"state file {(after / full - 1) * 100:+.1f}% over the last 1,000 jobs",
            value=round(growth, 1),
            unit="x",
            met=ok,
        )
    if not ok:
        print("FAILED: a target was missed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
