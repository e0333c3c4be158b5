"""Benchmark: `vmpool simulate`'s speed, in replayed jobs per second.

A generated three-month log of 20,000 jobs (tests/joblog.py: the shape of a batch cluster's, with
bursts) replayed through the pool's policy with max 32, min_free 1, idle_timeout 1800 and 60 s
boots, in process. Target: the whole log within a minute (>= 333 jobs/s), on a 2-core machine.
Exit 1 when it misses.

    .venv/bin/python bench/bench_simulate.py [--jobs 20000] [--days 91]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.*, from a checkout

from results import record

import vmpool as vp
from tests.joblog import generate_swf

TARGET_SECONDS = 60.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--days", type=float, default=91)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        log = Path(tmp) / "generated.swf"
        log.write_text(generate_swf(args.jobs, args.days))
        pool = vp.PoolConfig(max=32, min_free=1, idle_timeout=1800)
        config = vp.Config(path="", pool=pool, openstack=vp.OpenStackConfig(), ssh=vp.SshConfig())
        jobs = vp.read_job_log(str(log)).jobs
        started, cpu = time.monotonic(), time.process_time()
        replay = vp.Replay(jobs, config, vp.SimCloudSettings(boot_time=60)).run()
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    summary = vp.replay_outcome(replay).summary()
    rate = len(jobs) / elapsed
    limit = TARGET_SECONDS * len(jobs) / 20000
    print(
        f"replayed {len(jobs):,} jobs over {args.days:g} days in {elapsed:.1f} s ({cpu:.1f} s CPU, load "
        f"{os.getloadavg()[0]:.1f}): {rate:,.0f} jobs/s; target <= {limit:.0f} s"
    )
    print(
        f"  wait mean {summary['wait']['mean']:.0f} s, p95 {summary['wait']['p95']:.0f} s; "
        f"{summary['vm_hours']:,.0f} VM-hours for {summary['job_hours']:,.0f} job-hours; {summary['boots']:,} boots"
    )
    met = elapsed <= limit
    record(
        "simulate",
        what=f"`vmpool simulate`: a generated {args.days:g}-day log of {len(jobs):,} jobs replayed "
        "through the policy (max 32, 60 s boots), in process",
        target=f"<= {limit:.0f} s (>= {len(jobs) / limit:.0f} jobs/s)",
        figure=f"{elapsed:.1f} s, {rate:,.0f} jobs/s ({cpu:.1f} s CPU)",
        value=round(rate),
        unit="jobs/s",
        met=met,
        details={"cpu_seconds": round(cpu, 1), "summary": summary},
    )
    if not met:
        print("FAILED: the replay is slower than its target", file=sys.stderr)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
