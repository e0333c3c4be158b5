"""Benchmark: job start latency through the real hooks, from the prologue's start to the job's first line.

tests/pbs_mom.py plays pbs_mom (as tests/test_hooks.py does) with the hooks installed the way the
Torque page (docs/torque.md) tells a site; vmpool runs against the local test bed. Warm: a pool with Free VMs, --jobs
(20) jobs one after another, each with its epilogue before the next. Per job: acquire (prologue
start -> vmpool's "acquired" log line), the rest of the prologue (per-job key, account preparation
over SSH as root), the job starter (start -> first output line on the VM, over SSH as the owner).
Cold: one job on an empty pool (the acquire boots a server). Target: warm median <= 1 s (printed,
with the share of the SSH connections; the hooks are not changed here). Needs root.

    .venv/bin/python bench/bench_job_start.py [--jobs 20]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.*, from a checkout

from bench_fast_path import compile_vmpool
from results import record

from tests.cloud.bed import Bed
from tests.conftest import VMPOOL, PoolHandle, wait_until
from tests.pbs_mom import Job, ensure_users
from tests.torque_node import USERS, Mom

TARGET = 1.0
VMPOOL_PATH = str(Path(VMPOOL).resolve())  # hooks/install refuses a path with '..' in it
SCRIPT = "#!/bin/bash\necho started\n"


def acquired_at(log_file: str, job_id: str) -> float:
    """When vmpool logged the job's acquire (wall clock)."""
    for line in Path(log_file).read_text().splitlines():
        if f"acquired by job {job_id} " in line:
            stamp = re.match(r"(\S+ \S+),(\d+)", line)
            assert stamp
            return (
                datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(stamp.group(2)) / 1000
            )
    raise AssertionError(f"no acquire of {job_id} in {log_file}")


def one_job(mom: Mom, job_id: str) -> tuple[float, float, float, float]:
    """(total, acquire, rest of the prologue, starter to first line), seconds."""
    job = Job(job_id, USERS[0], script=SCRIPT)
    mom.pbs.receive(job)
    started = time.time()
    prologue = mom.pbs.prologue(job)
    assert prologue.outcome == "run", mom.pbs.err(job)
    prologue_done = time.time()
    running = mom.pbs.start(job)
    out = mom.pbs.out_path(job)
    wait_until(lambda: "started" in out.read_text(errors="replace"), 60, "the job's first line", interval=0.005)
    first_line = time.time()
    status = running.wait(60)
    assert mom.pbs.epilogue(job, exit_status=status).exit_code == 0, mom.pbs.err(job)
    acquired = acquired_at(mom.pool.settings["pool"]["log_file"], job_id)
    return first_line - started, acquired - started, prologue_done - acquired, first_line - prologue_done


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    compile_vmpool()
    ensure_users(USERS)
    ok = True
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        bed = Bed.start(Path(tmp) / "bed")
        roots = [Path(tempfile.mkdtemp(prefix="vmpool-hooks-", dir="/tmp")) for _ in range(2)]
        for root in roots:  # as tests/test_hooks.py: outside root-only dirs, the job owners reach the starter
            root.chmod(0o755)
        try:
            (Path(tmp) / "warm").mkdir()
            pool = PoolHandle(bed, Path(tmp) / "warm", f"w{os.getpid() % 10000}")
            pool.write_config(pool={"min": 2, "max": 3, "min_free": 1})
            pool.reconcile_until(lambda: len(pool.vms("free")) >= 2, 180, "2 Free VMs")
            mom = Mom(roots[0], pool, vmpool=VMPOOL_PATH)
            print(
                f"warm pool: 2 Free VMs; {args.jobs} jobs through prologue, job starter, epilogue "
                f"(load {os.getloadavg()[0]:.1f})"
            )
            runs = [one_job(mom, f"{100 + n}.bench") for n in range(args.jobs)]
            names = (
                "prologue start -> first line",
                "  acquire",
                "  rest of the prologue (key, prepare over SSH)",
                "  job starter -> first line (SSH)",
            )
            for index, name in enumerate(names):
                samples = sorted(run[index] for run in runs)
                p95 = samples[max(0, round(0.95 * len(samples)) - 1)]
                print(f"  {name:48s} median {statistics.median(samples) * 1000:6.0f} ms  p95 {p95 * 1000:6.0f} ms")
            median = statistics.median(run[0] for run in runs)
            parts = [statistics.median(run[index] for run in runs) for index in (1, 2, 3)]
            print(f"  warm median {median:.2f} s (target <= {TARGET:g} s)")
            ok &= median <= TARGET
            pool.delete_everything()

            (Path(tmp) / "cold").mkdir()
            cold_pool = PoolHandle(bed, Path(tmp) / "cold", f"c{os.getpid() % 10000}")
            cold_pool.write_config(pool={"min": 0, "max": 2, "min_free": 0})
            cold = Mom(roots[1], cold_pool, vmpool=VMPOOL_PATH)
            total, acquire, rest, starter = one_job(cold, "900.bench")
            print(
                f"  cold (empty pool): {total:.1f} s = acquire {acquire:.1f} s (boot) + prologue {rest:.2f} s "
                f"+ starter {starter:.2f} s"
            )
            cold_pool.delete_everything()
            record(
                "job_start",
                what=f"job start through the real hooks, prologue start -> the job's first line, "
                f"median of {args.jobs} warm jobs; one cold job (empty pool)",
                target=f"warm median <= {TARGET:g} s",
                met=median <= TARGET,
                value=round(median, 2),
                unit="s",
                figure=f"warm {median:.2f} s = acquire {parts[0] * 1000:.0f} ms + rest of the prologue "
                f"{parts[1] * 1000:.0f} ms + job starter {parts[2] * 1000:.0f} ms; cold {total:.1f} s",
            )
        finally:
            import shutil

            for root in roots:
                shutil.rmtree(root, ignore_errors=True)
            bed.stop()
    if not ok:
        print("FAILED: the warm median is above the target", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
