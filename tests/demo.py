"""`make demo`: a burst of Torque jobs through vmpool on the bundled local cloud.

Starts the test bed (real Keystone + Nova API, sshd VMs on 127.0.1.x), writes a pool config,
installs the Torque hooks into a scratch PBS_HOME, fills the pool to `min`, then submits a burst of
jobs of two users at once through tests/pbs_mom.py (prologue -> job starter -> epilogue, exactly
as pbs_mom runs them). The pool scales up for the burst and, once the jobs are done and the
VMs sit idle, back down to `min`. `vmpool status` is shown along the way; everything started is
stopped at the end.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.cloud.bed import Bed, leftovers
from tests.pbs_mom import Job, PbsMom, ensure_users

ROOT = Path(__file__).resolve().parent.parent
VMPOOL = str(Path(sys.executable).parent / "vmpool")
USERS = ("vmpt-alice", "vmpt-bob")
JOBS = 8
SCRIPT = """echo "job $PBS_JOBID of $(whoami) on VM $(hostname), node file: $(cat "$PBS_NODEFILE")"
echo "args: $*  workdir: $(pwd)"
sleep 3
echo done
"""


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def vmpool(config: str, *args: str) -> str:
    result = subprocess.run([VMPOOL, "--config", config, *args], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"vmpool {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def write_config(bed: Bed, directory: Path) -> str:
    key = directory / "id_pool"
    shutil.copy(bed.info["ssh_private_key"], key)
    key.chmod(0o600)
    sections = bed.vmpool_sections()  # [openstack] and [ssh] for this bed
    sections["pool"] = {
        "name": "demo",
        "min": "1",
        "max": "4",
        "min_free": "1",
        "state_file": f"{directory}/state/state.json",
        "log_file": f"{directory}/vmpool.log",
        "idle_timeout": "15",
        "acquire_timeout": "120",
        "acquire_poll": "0.3",
        "pass_interval": "1",
        "ready_timeout": "60",
    }
    sections["ssh"].update(
        private_key=str(key),
        known_hosts=f"{directory}/state/known_hosts",
        connect_timeout="5",
        banner_timeout="5",
        auth_timeout="5",
    )
    config = configparser.ConfigParser(interpolation=None)
    config.read_dict(sections)
    path = directory / "vmpool.conf"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        config.write(handle)  # private from the start: it holds the cloud password
    return str(path)


def install_hooks(directory: Path, config: str) -> PbsMom:
    pbs_home = directory / "torque"
    mom = PbsMom(pbs_home, starter=pbs_home / "mom_priv" / "vmpool" / "jobstarter", alarm=200)  # makes PBS_HOME
    # as a site installs them; the lines the installer asks a site to add to mom_priv/config
    # ($job_starter, $prologalarm) are what the demo's pbs_mom stand-in was just given
    subprocess.run(
        [
            str(ROOT / "hooks" / "install"),
            "install",
            "--pbs-home",
            str(pbs_home),
            "--vmpool",
            VMPOOL,
            "--vmpool-config",
            config,
            "--job-dir",
            str(directory / "jobs"),
            "--set",
            "REQUEUE_BACKOFF=5",
            "--set",
            "ACQUIRE_TIMEOUT=120",
        ],
        check=True,
        capture_output=True,
    )
    print(
        f"hooks installed in {pbs_home / 'mom_priv'} with hooks/install, as on a site (the demo's pbs_mom "
        "stand-in already has the $job_starter line the installer tells a site to add)"
    )
    return mom


def counts(config: str) -> dict[str, int]:
    data: dict[str, int] = json.loads(vmpool(config, "status", "--json"))["counts"]
    return data


def show_status(config: str, caption: str) -> None:
    print(f"--- vmpool status: {caption}\n{vmpool(config, 'status')}", flush=True)


def run_burst(mom: PbsMom, config: str) -> dict[str, tuple[int | None, int | None]]:
    results: dict[str, tuple[int | None, int | None]] = {}
    jobs = [Job(f"{100 + n}.demo", USERS[n % 2], script=SCRIPT, args=f"run {n}") for n in range(JOBS)]

    def one(job: Job) -> None:
        prologue, status, _ = mom.run(job, timeout=180)
        results[job.job_id] = (prologue.exit_code, status)

    threads = [threading.Thread(target=one, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    while any(thread.is_alive() for thread in threads):
        time.sleep(4)
        vmpool(config, "reconcile")  # cron does this every minute; the demo is in a hurry
        running = sum(thread.is_alive() for thread in threads)
        show_status(
            config,
            f"{time.monotonic() - started:.0f}s into the burst, {running} of {JOBS} jobs "
            "not finished (reconcile every 4 s)",
        )
    for thread in threads:
        thread.join()
    for job in jobs[:2]:  # what the job's owner got back, as TORQUE delivers it
        print(f"--- {mom.delivered_out_path(job)}:\n{mom.delivered_out(job)}", end="")
    for job in jobs:
        prologue_exit, status = results[job.job_id]
        if prologue_exit != 0 or status != 0:
            delivered = mom.delivered_err_path(job)
            why = delivered.read_text(errors="replace") if delivered.exists() else mom.err(job)
            print(f"--- {job.job_id}: prologue exit {prologue_exit}, job status {status}:\n{why}", end="")
    for job in jobs:  # the demo leaves nothing in its users' homes
        mom.delivered_out_path(job).unlink(missing_ok=True)
        mom.delivered_err_path(job).unlink(missing_ok=True)
    return results


def demo(bed: Bed, directory: Path, started: float) -> int:
    print(f"cloud up in {time.monotonic() - started:.0f}s: {bed.info['auth_url']}")
    config = write_config(bed, directory)
    say(f"creating the local users {' and '.join(USERS)} (if missing), the jobs' owners; they are kept")
    ensure_users(USERS)
    mom = install_hooks(directory, config)
    say("filling the pool to min = 1 (vmpool reconcile, as cron would)")
    deadline = time.monotonic() + 120
    while counts(config)["free"] < 1 and time.monotonic() < deadline:
        vmpool(config, "reconcile")
        time.sleep(1)
    show_status(config, "the pool filled to min = 1, before any job")
    say(f"a burst of {JOBS} jobs of {' and '.join(USERS)}: the pool scales up to max = 4")
    results = run_burst(mom, config)
    ok = sum(1 for prologue, status in results.values() if prologue == 0 and status == 0)
    print(f"{ok} of {JOBS} jobs ran and exited 0")
    say("jobs done; idle VMs above min are deleted after idle_timeout = 15s")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        vmpool(config, "reconcile")
        servers = bed.admin_nova().servers.list(search_opts={"all_tenants": True})
        if len(servers) <= 1 and sum(counts(config).values()) <= 1:
            break
        time.sleep(3)
    show_status(config, "after the burst, idle VMs deleted down to min = 1")
    say(f"demo finished in {time.monotonic() - started:.0f}s; stopping the cloud")
    return 0 if ok == JOBS else 1


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("make demo needs root (Torque hooks and the sshd VMs do)")
    print(
        f"the demo creates the local users {' and '.join(USERS)} (kept afterwards) and runs a local cloud "
        "on 127.0.0.0/8 (`make demo` installs missing system packages with apt-get before this)",
        flush=True,
    )
    directory = Path(tempfile.mkdtemp(prefix="vmpool-demo-", dir="/tmp"))
    directory.chmod(0o755)  # the job owners must reach the installed job starter
    say("starting the local cloud (Keystone, Nova API, placement, sshd VMs)")
    started = time.monotonic()
    try:
        bed = Bed.start(directory / "cloud")
        try:
            result = demo(bed, directory, started)
        finally:
            bed.stop()
        left = leftovers(directory / "cloud")
        print(
            "left behind: "
            + ("nothing (no process, mount or firewall rule of the demo)" if not left else "\n  ".join(["", *left]))
        )
        return 1 if left else result
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
