"""Benchmark: acquire of a Free VM and release, the path every prologue and epilogue takes.

Prints latency figures for the real CLI (a new process each time, as the hooks run it) and for
the in-process path, plus what a command imports. The config points the cloud at a closed
loopback port: if the fast path ever called the cloud, the benchmark would fail loudly.

    .venv/bin/python bench/bench_fast_path.py [--vms 30] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vmpool as vp

VMPOOL = str(Path(sys.executable).parent / "vmpool")


def write_config(path: Path, directory: Path, max_vms: int, ssh: str = "") -> str:
    """A bench pool's config; its cloud is a closed loopback port (nothing here may call it)."""
    path.write_text(f"""[pool]
name = bench
max = {max_vms}
state_file = {directory}/state/state.json
[openstack]
auth_url = http://127.0.0.1:9/v3
username = u
password = p
project_name = p
image = i
flavor = f
network = n
[ssh]
private_key = {directory}/key
known_hosts = {directory}/known_hosts
{ssh}""")
    path.chmod(0o600)
    return str(path)


def make_pool(directory: Path, vms: int) -> str:
    config = write_config(directory / "vmpool.conf", directory, vms)
    store = vp.StateStore(f"{directory}/state/state.json", "bench", 10)
    now = time.time()
    state = vp.PoolState(pool="bench", vms=[
        vp.Vm(name=f"bench-{n:04d}", state=vp.FREE, since=now, created_at=now, server_id=f"id-{n}",
              address=f"127.0.9.{n + 2}", last_healthy=now, host_keys=["ssh-ed25519 AAAA"]) for n in range(vms)])
    store.update(lambda _: (state, None))
    return str(config)


def figures(name: str, samples: list[float]) -> None:
    samples = sorted(samples)
    p95 = samples[int(len(samples) * 0.95) - 1]
    print(f"{name:34s} n={len(samples):3d}  median {statistics.median(samples) * 1000:7.1f} ms"
          f"  p95 {p95 * 1000:7.1f} ms  max {samples[-1] * 1000:7.1f} ms")


def cli_round(config: str, job: str) -> tuple[float, float]:
    started = time.perf_counter()
    subprocess.run([VMPOOL, "--config", config, "acquire", job], check=True, capture_output=True)
    acquired = time.perf_counter()
    subprocess.run([VMPOOL, "--config", config, "release", job], check=True, capture_output=True)
    return acquired - started, time.perf_counter() - acquired


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = make_pool(Path(tmp), args.vms)
        acquire, release = zip(*(cli_round(config, str(n)) for n in range(args.rounds)), strict=True)
        figures("CLI acquire (new process)", list(acquire))
        figures("CLI release (new process)", list(release))
        pool = vp.Pool(vp.load_config(config))
        inproc = []
        for n in range(args.rounds):
            started = time.perf_counter()
            pool.acquire(f"{1000 + n}", "u", timeout=5)
            pool.release(f"{1000 + n}")
            inproc.append(time.perf_counter() - started)
        figures("in-process acquire + release", inproc)
        code = ("import sys, vmpool; vmpool.main(['--config', sys.argv[1], 'acquire', '99']); "
                "heavy = ('novaclient', 'keystoneauth1', 'fabric', 'paramiko'); "
                "print('HEAVY=' + ','.join(m for m in heavy if m in sys.modules))")
        loaded = subprocess.run([sys.executable, "-c", code, config], capture_output=True, text=True, check=True)
        heavy = loaded.stdout.rsplit("HEAVY=", 1)[1].strip()
        print(f"heavy modules imported by acquire: {heavy or 'none'}")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import novaclient.client, fabric"], check=True)
        print(f"(for scale: importing novaclient + fabric alone takes {(time.perf_counter() - start) * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
