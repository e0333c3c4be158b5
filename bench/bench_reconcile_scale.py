"""Benchmark: one reconcile pass over a large pool with dead VMs, at the default SSH settings.

A state-seeded pool of --vms (500) Free VMs behind stand-in sshds (the test bed's namespaced
sshd, no cloud: an in-process Cloud lists every server ACTIVE). Several VMs share one sshd (its
address and host keys), so 500 VMs need only a few dozen sshds; --drop (50) of the VMs sit
behind sshds whose packets are dropped, --frozen (10) behind sshds frozen before the banner.
The pass probes every VM (real fabric/paramiko, pinned host keys) with the default timeouts;
past 100 VMs in one worker process per core. Printed beside the wall: the CPU vmpool spent (this
process and its probe workers) and the machine's busy CPU, the stand-in sshds' included.

Baseline in the same run: the same pass at the old default probe_parallelism = 16. Target: the
pass at the defaults takes <= connect_timeout + 5 s; every VM is classified right; the peak
number of threads and file descriptors is bounded by probe_parallelism (WAITS_PER_LOGIN threads
and sockets per login slot, and the logins' own), not by the pool. The stand-in sshds that play
many VMs each take as many unauthenticated connections as those VMs' own sshds would together.
Needs root (namespaces, iptables). Exit 1 when a target or a check fails.

    .venv/bin/python bench/bench_reconcile_scale.py [--vms 500] [--drop 50] [--frozen 10] [--sshds 30]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.cloud.vms, from a checkout

from bench_fast_path import write_config
from results import record

import vmpool as vp
from tests.cloud.vms import VmSupervisor
from tests.cloud_fakes import AlonePoolProject


class ListedCloud(AlonePoolProject):
    """The Cloud protocol over a fixed list: every server ACTIVE (the Nova side is bench_cloud.py's)."""

    def __init__(self, servers: list[vp.Server]):
        self.servers = servers

    def list_servers(self) -> list[vp.Server]:
        return list(self.servers)

    def create_server(self, name: str, vm_class: str = vp.DEFAULT_CLASS) -> str:
        raise vp.CloudError("no creates in this benchmark")

    def delete_server(self, server_id: str) -> None:
        raise vp.CloudError("no deletes in this benchmark")

    def console_output(self, server_id: str) -> str:
        return ""


class Peak:
    """Samples the threads and open descriptors of this process and its children while a pass runs."""

    def __init__(self) -> None:
        self.threads = self.fds = 0
        self.worker_cpu: dict[int, float] = {}  # probe worker -> its CPU seconds, last seen
        self.client_cpu = self.machine_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            threads = fds = 0
            for pid in [os.getpid(), *probe_workers()]:
                try:
                    threads += len(os.listdir(f"/proc/{pid}/task"))
                    fds += len(os.listdir(f"/proc/{pid}/fd"))
                    if pid != os.getpid():
                        self.worker_cpu[pid] = process_cpu(pid)
                except OSError:
                    continue
            self.threads, self.fds = max(self.threads, threads), max(self.fds, fds)

    def __enter__(self) -> Peak:
        self._cpu = time.process_time()
        self._machine = machine_busy()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        # vmpool's side of the pass (this process and its probe workers) and the whole machine's,
        # the stand-in VMs' sshds included: on a site they run elsewhere
        self.client_cpu = time.process_time() - self._cpu + sum(self.worker_cpu.values())
        self.machine_cpu = machine_busy() - self._machine


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def machine_busy() -> float:
    """CPU seconds every core of the machine spent busy so far (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def probe_workers() -> list[int]:
    """This process's probe workers (multiprocessing's forkserver and the workers it forked), not
    the stand-in VMs, which are its children too."""
    workers = []
    for pid in descendants(os.getpid()):
        try:
            if b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
        except OSError:
            continue
    return workers


def descendants(root: int) -> list[int]:
    """Every process below root (children, theirs...), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--drop", type=int, default=50)
    parser.add_argument("--frozen", type=int, default=10)
    parser.add_argument("--sshds", type=int, default=30, help="healthy sshds the healthy VMs share")
    args = parser.parse_args()
    for name in ("vmpool", "paramiko"):
        logging.getLogger(name).addHandler(logging.NullHandler())
        logging.getLogger(name).propagate = False
    ok = True
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        directory = Path(tmp)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "key")], check=True)
        public_key = (directory / "key.pub").read_text()
        # One stand-in sshd plays ~15 VMs, each of which would have its own sshd and its own
        # MaxStartups (10 unauthenticated connections): this one takes theirs together.
        sup = VmSupervisor(directory / "vms", sshd_options="MaxStartups 200:30:400\n")
        try:
            started = time.perf_counter()
            kinds = {"ok": args.sshds, "drop": max(1, args.drop // 10), "hang": max(1, args.frozen // 5)}
            sshds: dict[str, list[tuple[str, list[str]]]] = {kind: [] for kind in kinds}
            index = 0
            for kind, count in kinds.items():
                for _ in range(count):
                    vm_id, address = f"sshd-{index:03d}", f"127.0.7.{index + 2}"
                    sup.start(vm_id, address, public_key)
                    sshds[kind].append((address, vp.host_keys_from_console(sup.console_text(vm_id))))
                    if kind != "ok":
                        sup.set_fault(vm_id, kind)
                    index += 1
            print(
                f"{index} stand-in sshds booted in {time.perf_counter() - started:.0f}s (load {os.getloadavg()[0]:.1f})"
            )
            # VMs: the dead ones spread through the list, as they would be in a real pool
            dead = ["drop"] * args.drop + ["hang"] * args.frozen
            step = args.vms // len(dead)
            layout = ["ok"] * args.vms
            for n, kind in enumerate(dead):
                layout[n * step] = kind
            now = time.time()
            vms, servers, expected = [], [], {}
            for n, kind in enumerate(layout):
                address, keys = sshds[kind][n % len(sshds[kind])]
                name = f"bench-{n:04d}"
                vms.append(
                    vp.Vm(
                        name=name,
                        state=vp.FREE,
                        since=now,
                        created_at=now - 600,
                        server_id=f"id-{n}",
                        address=address,
                        last_healthy=now,
                        host_keys=list(keys),
                    )
                )
                servers.append(
                    vp.Server(
                        id=f"id-{n}",
                        name=name,
                        status=vp.SERVER_ACTIVE,
                        address=address,
                        vm_name=name,
                        created_at=now - 600,
                    )
                )
                expected[name] = vp.FREE if kind == "ok" else vp.UNUSABLE
            counts = {kind: layout.count(kind) for kind in kinds}
            print(
                f"{args.vms} VMs: {counts['ok']} healthy, {counts['drop']} dropping packets, "
                f"{counts['hang']} frozen before the banner; default ssh timeouts (connect 10 s)"
            )
            results = {}
            for label, extra in (
                ("probe_parallelism 16 (old default)", "probe_parallelism = 16\n"),
                (f"defaults (probe_parallelism {vp.SshConfig().probe_parallelism})", ""),
            ):
                config = vp.load_config(write_config(directory / "vmpool.conf", directory, args.vms, extra))
                pool = vp.Pool(config, cloud=ListedCloud(servers))
                pool.store.update(
                    lambda _: (
                        vp.PoolState(
                            pool="bench", vms=[vp.Vm(**{**vm.__dict__, "host_keys": list(vm.host_keys)}) for vm in vms]
                        ),
                        None,
                    )
                )
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                with Peak() as peak:
                    started = time.perf_counter()
                    pool.reconcile()
                    wall = time.perf_counter() - started
                after = pool.store.read().vms
                states = {vm.name: vm.state for vm in after}
                right = sum(1 for name, state in states.items() if expected.get(name) == state)
                for vm in [vm for vm in after if expected.get(vm.name) != vm.state][:3]:
                    print(f"    wrong: {vm.name} {vm.address} is {vm.state}: {vm.reason}")
                grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
                print(
                    f"  {label:36s} pass {wall:5.1f} s; {right}/{args.vms} classified right; "
                    f"peak {peak.threads} threads, {peak.fds} fds; max RSS +{grew:.0f} MiB"
                )
                print(
                    f"  {'':36s} CPU: vmpool {peak.client_cpu:.1f} s (this process and its probe workers); "
                    f"the machine {peak.machine_cpu:.1f} s of {os.cpu_count()} x {wall:.1f} s "
                    "(the stand-in sshds share its cores)"
                )
                results[label] = wall
                ok &= right == args.vms
            baseline, wall = results.values()
            target = config.ssh.connect_timeout + 5
            print(
                f"  defaults vs the old default: {wall / baseline:.2f}x; target: pass <= connect_timeout + 5 "
                f"= {target:g} s"
            )
            ok &= wall <= target
            record(
                "reconcile_scale",
                what=f"one reconcile pass, {args.vms} VMs ({counts['drop']} dropping packets, "
                f"{counts['hang']} frozen before the banner), default SSH timeouts",
                target=f"<= connect_timeout + 5 = {target:g} s; every VM classified right",
                figure=f"{wall:.1f} s ({wall / baseline:.2f}x the old default `probe_parallelism` 16's "
                f"{baseline:.1f} s); CPU: vmpool {peak.client_cpu:.1f} s; peak {peak.threads} threads",
                value=round(wall, 1),
                unit="s",
                met=ok,
            )
        finally:
            sup.close()
    if not ok:
        print("FAILED: a target was missed or a VM was classified wrongly", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
