"""Benchmark on the local test bed: a scale-up burst, and Nova requests per reconcile pass.

Scale-up: a pool with min = N (50) and nothing in it; the proxy delays every create POST by
--post-delay seconds (a real Nova takes 0.5-2 s). One reconcile pass sends the creates: the
time until every create has been sent and recorded, then passes until all N are Free. The
baseline in the same run is the same burst by the vmpool given with --baseline (a directory
holding an older vmpool.py, e.g. `git show 0c74bed:vmpool.py`), whose creates go one after
another. Target: creates sent in <= 0.25x the baseline's time.

Requests per pass: with the N servers Free, the proxy's counts of one cron pass must not grow
with the pool: one server list (and at most a token), no per-server GET.
Exit 1 when a target or a check fails. Needs root (the bed's stand-in VMs).

    .venv/bin/python bench/bench_cloud.py [--vms 50] [--post-delay 1.0] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.*, from a checkout

from bench_fast_path import compile_vmpool

from tests.cloud.bed import Bed
from tests.conftest import PoolHandle, wait_until

TARGET = 0.25


def settings_known_to(vmpool_py: Path, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The config sections and keys an older vmpool.py knows (its *Config dataclasses' fields)."""
    import dataclasses
    import importlib.util
    spec = importlib.util.spec_from_file_location("vmpool_baseline", vmpool_py)
    assert spec and spec.loader
    old = importlib.util.module_from_spec(spec)
    sys.modules["vmpool_baseline"] = old  # dataclasses look their module up
    spec.loader.exec_module(old)
    known = {name.removesuffix("Config").lower(): {f.name for f in dataclasses.fields(cls)}
             for name, cls in vars(old).items() if name.endswith("Config") and dataclasses.is_dataclass(cls)}
    return {section: {key: value for key, value in values.items() if key in known[section]}
            for section, values in settings.items() if section in known}


def scale_up(bed: Bed, directory: Path, name: str, vms: int, env: dict[str, str]) -> tuple[float, float, int]:
    """(seconds until every create was sent and recorded, seconds until all Free, requests per pass)."""
    directory.mkdir()
    pool = PoolHandle(bed, directory, name)
    pool.settings["pool"].update({"min": vms, "max": vms, "min_free": 0, "build_timeout": 300, "ready_timeout": 300,
                                  "create_grace": 120})
    baseline = env.get("PYTHONPATH")
    if baseline:  # an older vmpool refuses what it does not know: its config holds only its own keys
        pool.settings = settings_known_to(Path(baseline) / "vmpool.py", pool.settings)
    pool.write_config()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        # cwd: `python -m` puts it first on sys.path, before PYTHONPATH: run from the checkout, the
        # baseline would be this vmpool.py
        done = subprocess.run([sys.executable, "-m", "vmpool", "--config", pool.config_path, *args],
                              capture_output=True, text=True, env=env, cwd=directory)
        if done.returncode:
            raise SystemExit(f"vmpool {' '.join(args)} ({name}) exited {done.returncode}: {done.stderr.strip()}")
        return done

    started = time.monotonic()
    run("reconcile")
    sent = time.monotonic() - started
    creating = sum(1 for vm in pool.vms() if vm["reason"] == "creating")
    assert creating == 0, f"{creating} creates still unsent after the pass"

    def all_free() -> bool:
        run("reconcile")
        return len(pool.vms("free")) == vms

    wait_until(all_free, 600, f"{vms} Free VMs", interval=0.5)
    free = time.monotonic() - started
    bed.reset_counts()
    run("reconcile")
    counts = bed.counts()
    requests = sum(counts.values())
    print(f"    one cron pass over {vms} Free VMs: {requests} requests at the proxy: "
          + ", ".join(f"{key} x{n}" for key, n in sorted(counts.items())))
    ssh_costs(pool)
    pool.delete_everything()
    return sent, free, requests


def ssh_costs(pool: PoolHandle, rounds: int = 20) -> None:
    """What one ssh to a pool VM costs the hooks: a new connection each time vs an OpenSSH ControlMaster."""
    import statistics
    vm = pool.vms("free")[0]
    control = Path(pool.dir) / "cm-%C"
    base = ["ssh", "-i", pool.key, "-o", f"UserKnownHostsFile={pool.known_hosts}", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-l", "root", vm["address"]]

    def timed(extra: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run([*base[:1], *extra, *base[1:], "true"], check=True, capture_output=True)
        return time.perf_counter() - started

    fresh = statistics.median(timed([]) for _ in range(rounds))
    master = ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}", "-o", "ControlPersist=30"]
    timed(master)  # opens the master
    reused = statistics.median(timed(master) for _ in range(rounds))
    subprocess.run([*base[:1], "-o", f"ControlPath={control}", "-O", "exit", *base[1:]], capture_output=True)
    print(f"    ssh root@vm true (median of {rounds}): new connection {fresh * 1000:.0f} ms, "
          f"through a ControlMaster {reused * 1000:.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--post-delay", type=float, default=1.0)
    parser.add_argument("--baseline", help="directory with the vmpool.py to compare with")
    args = parser.parse_args()
    compile_vmpool()
    ok = True
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        started = time.monotonic()
        bed = Bed.start(Path(tmp) / "bed")
        try:
            print(f"test bed up in {time.monotonic() - started:.0f}s; every create POST delayed {args.post_delay:g}s "
                  f"(load {os.getloadavg()[0]:.1f})")
            bed.add_fault("nova", "POST", r"/servers$", "delay", delay=args.post_delay)
            runs = [("this vmpool", os.environ.copy())]
            if args.baseline:
                runs.insert(0, ("baseline", {**os.environ, "PYTHONPATH": args.baseline}))
            results = {}
            for label, env in runs:
                name = f"b{len(results)}{os.getpid() % 1000}"
                sent, free, requests = scale_up(bed, Path(tmp) / name, name, args.vms, env)
                results[label] = sent
                print(f"  {label:12s} 0 -> {args.vms}: every create sent {sent:6.1f} s, all Free {free:6.1f} s")
                ok &= requests <= 3
            if args.baseline:
                ratio = results["this vmpool"] / results["baseline"]
                print(f"  creates sent: {ratio:.2f}x the baseline (target <= {TARGET}x)")
                ok &= ratio <= TARGET
        finally:
            bed.stop()
    if not ok:
        print("FAILED: a target was missed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
