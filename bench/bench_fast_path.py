"""Benchmark: acquire of a Free VM and release, the path every prologue and epilogue takes.

Each command runs as a new process, as the hooks run it, against a state-seeded pool of Free
VMs; the baseline, measured in the same run and interleaved with it, is the floor of the
mandated imports: `python -c "import click, filelock"`. Target: median acquire and median
release each <= 1.3x that floor. Then `-X importtime` of an acquire and a release: novaclient,
keystoneauth1, openstacksdk, fabric, paramiko, prometheus_client and nagiosplugin must not be
imported. The config points the cloud at a
closed loopback port: if the fast path ever called the cloud, the benchmark would fail loudly.
Besides the wall times, each command's CPU (user + system, median) against the floor's: other
users' load on the machine swings the wall ratio by a tenth or more between runs, the CPU
ratio far less, so it says whether a change in the wall ratio is vmpool's (no target of its own).
Exit 1 when a target or a check fails.

    .venv/bin/python bench/bench_fast_path.py [--vms 200] [--rounds 40]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import record

import vmpool as vp

VMPOOL = str(Path(sys.executable).parent / "vmpool")
FLOOR = [sys.executable, "-c", "import click, filelock"]
HEAVY = ("novaclient", "keystoneauth1", "openstack", "fabric", "paramiko", "prometheus_client", "nagiosplugin")
TARGET = 1.3


def compile_vmpool() -> None:
    """Byte-compile vmpool.py as `pip install` does at a site: with PYTHONDONTWRITEBYTECODE set (as on
    the shared test machine) every new process would otherwise compile the module again (~60 ms)."""
    import py_compile

    py_compile.compile(vp.__file__, doraise=True)


# Three VM classes, as issue 19 benchmarks the fast path with them: (name, flavor, vCPUs, RAM MiB, GPUs)
CLASSES = (("small", "f1", 1, 2048, 0), ("medium", "f4", 4, 8192, 0), ("large", "f8", 8, 32768, 0))


def class_sections(classes: int) -> str:
    return "".join(f"[class {name}]\nflavor = {flavor}\n" for name, flavor, *_ in CLASSES[:classes])


def add_classes_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--classes N: the pool's VMs of the first N of CLASSES (0: no [class] sections)."""
    parser.add_argument("--classes", type=int, default=0, choices=range(len(CLASSES) + 1), help=help)


def write_config(path: Path, directory: Path, max_vms: int, ssh: str = "", classes: int = 0) -> str:
    """A bench pool's config; its cloud is a closed loopback port (nothing here may call it)."""
    path.write_text(f"""{class_sections(classes)}[pool]
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
[batch]
system = none
[ssh]
private_key = {directory}/key
known_hosts = {directory}/known_hosts
{ssh}""")
    path.chmod(0o600)
    key = directory / "key"  # acquire insists the key exists; bench_reconcile_scale.py made a real one
    if not key.exists():
        key.write_text("not a key: this bench never logs in to a VM\n")
        key.chmod(0o600)
    return str(path)


def seeded_state(vms: int, now: float, classes: int = 0) -> vp.PoolState:
    """Free VMs; with classes, dealt out over them in turn, and their flavors known (as Nova told)."""
    named = CLASSES[:classes]
    return vp.PoolState(
        pool="bench",
        vms=[
            vp.Vm(
                name=f"bench-{n:04d}",
                state=vp.FREE,
                since=now,
                created_at=now,
                server_id=f"id-{n}",
                address=f"127.9.{n // 250}.{n % 250 + 2}",
                last_healthy=now,
                host_keys=["ssh-ed25519 AAAA"],
                vm_class=named[n % len(named)][0] if named else vp.DEFAULT_CLASS,
            )
            for n in range(vms)
        ],
        flavors={flavor: {"vcpus": cores, "ram": ram, "gpus": gpus} for _, flavor, cores, ram, gpus in named},
    )


def make_pool(directory: Path, vms: int, classes: int = 0) -> str:
    config = write_config(directory / "vmpool.conf", directory, vms, classes=classes)
    store = vp.StateStore(f"{directory}/state/state.json", "bench", 10)
    state = seeded_state(vms, time.time(), classes)
    store.update(lambda _: (state, None))
    return str(config)


def figures(name: str, samples: list[float]) -> float:
    samples = sorted(samples)
    p95 = samples[int(len(samples) * 0.95) - 1]
    median = statistics.median(samples)
    print(
        f"  {name:34s} n={len(samples):3d}  median {median * 1000:7.1f} ms"
        f"  p95 {p95 * 1000:7.1f} ms  max {samples[-1] * 1000:7.1f} ms"
    )
    return median


CPU: dict[str, list[float]] = {}  # CPU seconds of each kind of command (timed's `kind`)


def timed(argv: list[str], kind: str = "") -> float:
    """Wall seconds of one command; its CPU seconds go to CPU[kind]."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(kind, []).append(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)
    return wall


def imported_by(argv: list[str]) -> tuple[set[str], dict[str, int]]:
    """Modules a command imports (python -X importtime) and each one's cumulative microseconds."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, check=True)
    cumulative = {}
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cum, name = line.split("|")
            cumulative[name.strip()] = int(cum)
    return set(cumulative), cumulative


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=40)
    add_classes_option(parser, "VM classes in the pool (0: the one class of a config without [class] sections)")
    args = parser.parse_args()
    compile_vmpool()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        config = make_pool(Path(tmp), args.vms, args.classes)
        floor, acquire, release = [], [], []
        for n in range(args.rounds):  # interleaved, so noise hits the floor and vmpool alike
            floor.append(timed(FLOOR, "floor"))
            acquire.append(timed([VMPOOL, "--config", config, "acquire", str(n)], "acquire"))
            floor.append(timed(FLOOR, "floor"))
            release.append(timed([VMPOOL, "--config", config, "release", str(n)], "release"))
        kinds = f", {args.classes} VM classes" if args.classes else ""
        print(
            f"warm fast path, {args.vms} Free VMs{kinds}, each command a new process (load {os.getloadavg()[0]:.1f}):"
        )
        base = figures('floor: python -c "import click, filelock"', floor)
        ratios, medians, cpu = {}, {}, {}
        for name, samples in (("acquire", acquire), ("release", release)):
            medians[name] = figures(f"vmpool {name}", samples)
            ratios[name] = medians[name] / base
            cpu[name] = statistics.median(CPU[name]) / statistics.median(CPU["floor"])
            print(
                f"  {'':34s} {ratios[name]:.2f}x the floor (target <= {TARGET}x); CPU {cpu[name]:.2f}x the floor's "
                f"({statistics.median(CPU[name]) * 1000:.1f} vs {statistics.median(CPU['floor']) * 1000:.1f} ms)"
            )
            ok &= ratios[name] <= TARGET

        pool = vp.Pool(vp.load_config(config))
        inproc = []
        for n in range(args.rounds):
            started = time.perf_counter()
            pool.acquire(f"{1000 + n}", "u", timeout=5)
            pool.release(f"{1000 + n}")
            inproc.append(time.perf_counter() - started)
        figures("in-process acquire + release", inproc)

        floor_modules, _ = imported_by(FLOOR[1:])
        heavy_seen: list[str] = []
        for command in ("acquire", "release"):
            modules, cumulative = imported_by([VMPOOL, "--config", config, command, "99"])
            heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
            extra = sorted(
                ((cumulative[m], m) for m in modules - floor_modules if "." not in m and m != "vmpool"), reverse=True
            )[:6]
            print(
                f"  -X importtime, {command}: vmpool {cumulative.get('vmpool', 0) / 1000:.1f} ms cumulative; "
                f"beyond the floor: {', '.join(f'{m} {us / 1000:.1f}' for us, m in extra)} ms; "
                f"heavy modules: {', '.join(heavy) or 'none'}"
            )
            ok &= not heavy
            heavy_seen = heavy_seen or heavy
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import novaclient.client, fabric"], check=True)
        print(f"  (for scale: importing novaclient + fabric alone takes {(time.perf_counter() - start) * 1000:.0f} ms)")
        record(
            f"fast_path_{args.classes}_classes" if args.classes else "fast_path",
            what=f"warm `acquire` and `release` of a Free VM ({args.vms} VMs{kinds}), each a new process, "
            'median, vs the import floor `python -c "import click, filelock"`',
            target=f"<= {TARGET}x the floor each; no cloud or SSH library imported",
            figure=f"acquire {ratios['acquire']:.2f}x, release {ratios['release']:.2f}x "
            f"({medians['acquire'] * 1000:.1f} / {medians['release'] * 1000:.1f} vs {base * 1000:.1f} ms); "
            f"CPU {cpu['acquire']:.2f}x, {cpu['release']:.2f}x; "
            f"heavy modules imported: {', '.join(heavy_seen) or 'none'}",
            value=round(max(ratios.values()), 2),
            unit="x",
            met=ok,
            details={
                "rounds": args.rounds,
                "vms": args.vms,
                "classes": args.classes,
                "cpu_ms": {kind: round(statistics.median(seconds) * 1000, 1) for kind, seconds in CPU.items()},
            },
        )
    if not ok:
        print("FAILED: a target was missed or a heavy module was imported", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
