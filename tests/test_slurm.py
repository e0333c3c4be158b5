"""vmpool's Slurm hooks end to end: a real slurmctld + slurmd (Debian 12's Slurm 22.05, started by
tests/slurm_cluster.py on loopback) run the hooks as `make install-slurm-hooks` installs them and
as its printed slurm.conf lines configure them; the real `vmpool` runs against the local cloud;
jobs run on its sshd VMs over OpenSSH.

Job owners are real non-root users of this machine, created if missing: vmps-alice and vmps-bob.
The node `vmgw` advertises CPUs = the pool's max (3, the `pool` fixture's): one job per VM.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TRACEBACK, VMPOOL, PoolHandle, wait_until
from tests.pbs_mom import ensure_users
from tests.slurm_cluster import NODE, SlurmCluster, missing
from tests.torque_node import user_traces

pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.skipif(
    bool(missing()), reason=f"Slurm is not installed ({', '.join(missing())} missing): "
                            "`make slurm-deps` (apt-get install slurmctld slurmd slurm-client munge)")]

USERS = ("vmps-alice", "vmps-bob")
CPUS = 3  # the pool fixture's [pool] max
SETTINGS = {"ACQUIRE_TIMEOUT": 60, "SSH_CONNECT_TIMEOUT": 3, "SCRUB_TIMEOUT": 20,
            "PREPARE_TIMEOUT": 20, "KILL_GRACE": 2}


def install(root: Path, vmpool_config: str, **settings: object) -> subprocess.CompletedProcess[str]:
    """The hooks as the README tells a site to install them (hooks in root/hooks, lua beside slurm.conf)."""
    settings = {**SETTINGS, **settings}
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install-slurm-hooks", f"SLURM_HOOKS_DIR={root / 'hooks'}",
         f"SLURM_CONF_DIR={root / 'etc'}", f"VMPOOL={VMPOOL}", f"VMPOOL_CONFIG={vmpool_config}",
         f"JOB_DIR={root / 'jobs'}", "HOOKS_SETTINGS=" + " ".join(f"{k}={v}" for k, v in settings.items())],
        capture_output=True, text=True, check=True)


def conf_lines(printed: str) -> dict[str, str]:
    """The slurm.conf lines install printed (not its comments)."""
    return dict(line.split("=", 1) for line in printed.splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    ensure_users(USERS)
    root = Path(tempfile.mkdtemp(prefix="vmpool-slurm-", dir="/tmp"))
    root.chmod(0o755)
    (root / "etc").mkdir(mode=0o755)
    printed = install(root, "/nonexistent/vmpool.conf").stdout  # each test installs its pool's
    cluster = SlurmCluster(root, cpus=CPUS, settings=conf_lines(printed))
    cluster.printed = printed  # type: ignore[attr-defined]
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, "the Slurm cluster left behind:\n" + "\n".join(left)


class Gateway:
    """The node `vmgw` with vmpool's Slurm hooks on one test pool; jobs' output in self.out_dir."""

    def __init__(self, slurm: SlurmCluster, pool: PoolHandle, **settings: object):
        self.slurm = slurm
        self.pool = pool
        self.out_dir = Path(tempfile.mkdtemp(prefix="vmps-out-", dir="/tmp"))
        self.out_dir.chmod(0o1777)
        self.install(**settings)

    def install(self, **settings: object) -> None:
        install(self.slurm.root, self.pool.config_path, **settings)

    def submit(self, user: str, script: str, *args: str, options: tuple[str, ...] = (), **kw: Any) -> str:
        return self.slurm.sbatch(user, script, args=args, options=(
            "-o", f"{self.out_dir}/%j.out", "-e", f"{self.out_dir}/%j.err", *options), **kw)

    def out(self, job: str) -> str:
        path = self.out_dir / f"{job}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def err(self, job: str) -> str:
        path = self.out_dir / f"{job}.err"
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self) -> str:
        path = self.slurm.root / "jobs" / "slurm-hooks.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def vm_of(self, job: str) -> dict:
        return next(vm for vm in self.pool.vms() if vm["job"] == job)

    def on_vm(self, vm: dict, *argv: str) -> tuple[int, str, str]:
        result: tuple[int, str, str] = self.pool.bed.vm_exec(vm["server_id"], list(argv))
        return result

    def done(self, job: str, timeout: float = 120) -> dict[str, str]:
        """The job once it has ended and its epilog has run (no longer COMPLETING)."""
        ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

        def finished() -> dict[str, str] | None:
            info = self.slurm.job(job)
            complete = info.get("JobState") in ended and "COMPLETING" not in self.slurm.node().get("State", "")
            return info if complete and not self.slurm.run("squeue", "-h", "-j", job, "-t", "CG",
                                                           check=False).stdout.strip() else None
        return wait_until(finished, timeout, f"job {job} to end and its epilog to run ({self.slurm.job(job)})", 0.3)

    def drained(self) -> bool:
        state = self.slurm.node().get("State", "")
        return any(word in state for word in ("DRAIN", "DOWN", "FAIL"))


@pytest.fixture
def gw(slurm: SlurmCluster, pool: PoolHandle) -> Iterator[Gateway]:
    handle = Gateway(slurm, pool)
    try:
        yield handle
        for path in sorted(handle.out_dir.iterdir()):  # a job owner reads these: never a traceback
            assert TRACEBACK not in path.read_text(errors="replace"), path.name
    finally:
        slurm.run("scancel", "--full", "--partition", "vmpool", check=False)
        wait_until(lambda: not slurm.run("squeue", "-h", check=False).stdout.strip(), 300,
                   "every job (and its epilog) to end")
        node = slurm.node()
        shutil.rmtree(handle.out_dir, ignore_errors=True)
        if handle.drained():  # the next tests need a working node; this one fails below
            slurm.scontrol("update", f"NodeName={NODE}", "State=RESUME", check=False)
        assert "DRAIN" not in node.get("State", ""), f"the node was drained: {node.get('Reason')}"


def vm_state(gw: Gateway, vm: dict) -> str:
    return next(v["state"] for v in gw.pool.vms() if v["name"] == vm["name"])


# --- a job's life ---


def test_a_job_runs_on_its_vm_with_its_args_cwd_env_output_and_exit_code(gw: Gateway) -> None:
    alice = pwd.getpwnam("vmps-alice")
    workdir = f"{alice.pw_dir}/project one"
    gw.slurm.run("mkdir", "-p", workdir, user="vmps-alice")
    job = gw.submit("vmps-alice", """#!/bin/bash
#SBATCH -J vmps
echo "whoami=$(whoami)"
echo "host=$(hostname)"
echo "jobid=$SLURM_JOB_ID"
echo "pwd=$(pwd)"
echo "args=$#:$1|$2"
echo "setting=$MY_SETTING"
echo "to stderr" >&2
echo secret > /tmp/alice-tmp; echo secret > /var/tmp/alice-vartmp
sleep 2
exit 7
""", "first", "second arg", options=("-D", workdir, "--export=ALL,MY_SETTING=it's $HOME; `x`"))

    wait_until(lambda: [vm for vm in gw.pool.vms() if vm["job"] == job], 90, "the job's VM")
    vm = gw.vm_of(job)
    assert (vm["state"], vm["user"]) == ("busy", "vmps-alice")
    wait_until(lambda: "whoami=" in gw.out(job), 60, f"the job's output ({gw.slurm.job(job)})")
    info = gw.done(job)

    out = gw.out(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "7:0"), (info, out, gw.err(job))
    assert "whoami=vmps-alice\n" in out
    vm_host = gw.on_vm(vm, "hostname")[1].strip()
    assert f"host={vm_host}\n" in out and vm_host != gw.slurm.run("hostname").stdout.strip()
    assert f"jobid={job}\n" in out
    assert f"pwd={workdir}\n" in out
    assert "args=2:first|second arg\n" in out
    assert "setting=it's $HOME; `x`\n" in out
    assert gw.err(job) == "to stderr\n"
    assert user_traces(gw, vm, "vmps-alice") == []  # type: ignore[arg-type]
    assert gw.on_vm(vm, "test", "-e", workdir)[0] != 0
    assert vm_state(gw, vm) == "free"
    assert not (gw.slurm.root / "jobs" / job).exists()
    assert not gw.drained()


def test_scancel_ends_the_job_on_its_vm(gw: Gateway) -> None:
    job = gw.submit("vmps-bob", "#!/bin/sh\necho started; echo oops >&2; exec sleep 1000\n")
    uid = str(pwd.getpwnam("vmps-bob").pw_uid)
    wait_until(lambda: gw.out(job) == "started\n" and "oops\n" in gw.err(job), 90,
               f"the job's first lines while it runs ({gw.slurm.job(job)})")
    vm = gw.vm_of(job)
    wait_until(lambda: gw.on_vm(vm, "pgrep", "-U", uid, "-x", "sleep")[0] == 0, 10, "the job's sleep on the VM")

    gw.slurm.run("scancel", job, user="vmps-bob")

    wait_until(lambda: gw.on_vm(vm, "pgrep", "-U", uid)[0] != 0, 30, "no process of the job owner on the VM")
    info = gw.done(job)
    assert info["JobState"] == "CANCELLED", info
    # slurmstepd signals the step's processes one by one: the starter hears SIGTERM first ("got
    # SIGTERM: ending the job on VM") or sees its ssh killed first ("ssh ... exited 255 ...; ending
    # the job on VM"); either way it ends the job on its VM (checked above: nothing of bob runs)
    assert "ending the job on VM" in gw.err(job), gw.err(job)
    assert user_traces(gw, vm, "vmps-bob") == []  # type: ignore[arg-type]
    assert vm_state(gw, vm) == "free"
    assert not gw.drained()


def test_the_time_limit_ends_the_job_on_its_vm(gw: Gateway) -> None:
    job = gw.submit("vmps-alice", "#!/bin/bash\necho started; sleep 1000; echo not reached\n",
                    options=("--time=1",))
    uid = str(pwd.getpwnam("vmps-alice").pw_uid)
    wait_until(lambda: gw.out(job) == "started\n", 90, f"the job to start ({gw.slurm.job(job)})")
    vm = gw.vm_of(job)

    info = gw.done(job, timeout=240)  # a 1-minute limit; slurmctld checks limits every ~30 s

    assert info["JobState"] == "TIMEOUT", info
    assert "DUE TO TIME LIMIT" in gw.err(job)
    # the starter forwards its SIGTERM, or (if the ssh client died of it first) ends the job itself
    assert f"ending the job on VM {vm['name']}" in gw.err(job), gw.err(job)
    assert "not reached" not in gw.out(job)
    assert gw.on_vm(vm, "pgrep", "-U", uid)[0] != 0
    assert vm_state(gw, vm) == "free"
    assert not gw.drained()


def test_two_users_at_once_see_nothing_of_each_other(gw: Gateway) -> None:
    script = """#!/bin/bash
echo "$(whoami) secret" > "$HOME/secret"; echo x > "/tmp/$(whoami)-tmp"
while [ ! -e /etc/vmps-go ]; do sleep 0.2; done  # the test opens it once both jobs run
echo "homes=$(ls /home | tr '\\n' ' ')"
echo "users=$(ps -eo user= | sort -u | tr '\\n' ' ')"
echo "tmp=$(ls /tmp | tr '\\n' ' ')"
for other in vmps-alice vmps-bob; do cat "/home/$other/secret" 2>/dev/null; done; true
"""
    jobs = {user: gw.submit(user, script) for user in USERS}
    wait_until(lambda: all(gw.slurm.state(job) == "RUNNING" for job in jobs.values())
               and len({vm["job"] for vm in gw.pool.vms("busy")} & set(jobs.values())) == 2, 120,
               "both jobs running on VMs at once")
    vms = {user: gw.vm_of(job) for user, job in jobs.items()}
    assert vms["vmps-alice"]["name"] != vms["vmps-bob"]["name"]
    for vm in vms.values():
        assert gw.on_vm(vm, "touch", "/etc/vmps-go")[0] == 0

    infos = {user: gw.done(job) for user, job in jobs.items()}

    for user, other in (("vmps-alice", "vmps-bob"), ("vmps-bob", "vmps-alice")):
        out = gw.out(jobs[user])
        assert infos[user]["JobState"] == "COMPLETED", (infos[user], out, gw.err(jobs[user]))
        assert f"homes={user} \n" in out, out
        assert other not in out.split("users=")[1].split("\n")[0], out
        assert f"tmp={user}-tmp \n" in out, out
        assert f"{user} secret\n" in out and f"{other} secret" not in out
        assert user_traces(gw, vms[user], user) == []  # type: ignore[arg-type]
        # On the other VM: a stand-in VM shows the node's /etc/passwd until a useradd there copies
        # it up, so only what a job could leave (home, processes, files) counts.
        assert [t for t in user_traces(gw, vms[other], user) if t != "account"] == []  # type: ignore[arg-type]
    assert sorted(vm_state(gw, vm) for vm in vms.values()) == ["free", "free"]
    for vm in vms.values():
        gw.on_vm(vm, "rm", "-f", "/etc/vmps-go")


def test_with_the_pool_at_max_jobs_wait_and_nothing_is_drained(gw: Gateway) -> None:
    jobs = [gw.submit(USERS[i % 2], "#!/bin/bash\nsleep 3; echo done\n") for i in range(CPUS + 1)]
    most: list[str] = []

    def all_done() -> bool:
        nonlocal most
        assert not gw.drained(), gw.slurm.node()
        servers = [f"{s.name} {s.status} {getattr(s, 'OS-EXT-STS:task_state', None)}" for s in gw.pool.servers()]
        most = max(most, servers, key=len)
        states = [gw.slurm.state(job) for job in jobs]
        if states.count("RUNNING") == CPUS:
            waiting = [gw.slurm.job(job) for job, state in zip(jobs, states, strict=True) if state == "PENDING"]
            assert [info["Reason"] for info in waiting] in ([], ["Resources"], ["Priority"]), waiting
        return all(state == "COMPLETED" for state in states)

    wait_until(all_done, 240, "every job to complete", interval=0.5)

    assert len(most) <= CPUS, (f"the cloud held {len(most)} of the pool's servers (max {CPUS}): {most}\n"
                               + Path(gw.pool.settings["pool"]["log_file"]).read_text())
    assert [gw.out(job) for job in jobs] == ["done\n"] * len(jobs)
    assert not gw.drained()


# --- failures ---


def test_a_cloud_failure_in_the_prolog_requeues_the_job_without_draining_the_node(gw: Gateway) -> None:
    gw.pool.bed.set_behaviour(f"^{gw.pool.prefix}", error=True)  # every boot fails
    gw.install(ACQUIRE_TIMEOUT=4)
    job = gw.submit("vmps-alice", "#!/bin/bash\necho ran\n")

    info = wait_until(lambda: (i := gw.slurm.job(job)) and int(i.get("Restarts", "0")) >= 1 and i, 120,
                      f"the job to be requeued ({gw.slurm.job(job)})")

    assert "no VM became free within 4s; the job is requeued in 0s" in info.get("AdminComment", ""), info
    assert not gw.drained(), gw.slurm.node()
    wait_until(lambda: f"epilog {job}: " in gw.log(), 60, "the epilog of the requeued attempt")
    # the epilog of the job whose prolog failed: nothing held, nothing waiting, nothing of the job left
    assert not [vm for vm in gw.pool.vms() if vm["job"] == job]
    assert gw.pool.status()["waiting"] == []
    assert not (gw.slurm.root / "jobs" / job).exists()
    assert gw.out(job) == "", "the job ran without a VM"

    gw.pool.bed.clear_behaviours()  # the cloud is back: the requeued job runs
    gw.install()
    info = gw.done(job, timeout=400)  # eligible again after Slurm's CredExpire (120 s), then a boot

    assert info["JobState"] == "COMPLETED" and gw.out(job) == "ran\n", (info, gw.err(job), gw.log())
    assert not gw.drained()


def test_a_job_of_a_system_user_is_cancelled_by_the_prolog_with_the_reason(gw: Gateway) -> None:
    job = gw.slurm.run("sbatch", "--parsable", "-o", f"{gw.out_dir}/%j.out", "--wrap", "id",
                       cwd=str(gw.out_dir)).stdout.strip()  # root's

    info = gw.done(job)

    assert info["JobState"] == "CANCELLED", info
    assert "below MIN_UID=1000" in info.get("AdminComment", ""), info
    assert gw.out(job) == ""
    assert not (gw.out_dir / f"vmpool-{job}.log").exists(), "written as root"
    assert gw.pool.vms() == [] and gw.pool.servers() == []
    assert not gw.drained()


def test_interactive_and_multi_node_jobs_are_refused_at_submit_time(gw: Gateway) -> None:
    salloc = gw.slurm.run("salloc", "--no-shell", user="vmps-alice", check=False, timeout=30)
    srun = gw.slurm.run("srun", "true", user="vmps-alice", check=False, timeout=30)
    multi = gw.slurm.run("sbatch", "-N", "2", "--wrap", "true", user="vmps-alice", check=False,
                         cwd=str(gw.out_dir))

    for result in (salloc, srun):
        assert result.returncode != 0
        assert "vmpool: interactive jobs (salloc, srun outside a batch job) cannot run" in result.stderr
    assert multi.returncode != 0 and "multi-node and heterogeneous jobs are not supported" in multi.stderr
    assert gw.slurm.run("squeue", "-h").stdout.strip() == ""
    assert gw.pool.servers() == []


def test_install_prints_slurm_conf_lines_above_the_hooks_worst_case(slurm: SlurmCluster) -> None:
    lines = conf_lines(slurm.printed)  # type: ignore[attr-defined]
    hooks = slurm.root / "hooks"
    assert lines["Prolog"] == f"{hooks}/prolog" and lines["Epilog"] == f"{hooks}/epilog"
    assert lines["PrologFlags"] == "Alloc" and lines["JobSubmitPlugins"] == "lua"
    s = SETTINGS
    worst_prolog = s["ACQUIRE_TIMEOUT"] + 15 + s["PREPARE_TIMEOUT"] + 30
    assert int(lines["PrologEpilogTimeout"]) > worst_prolog
    assert int(lines["KillWait"]) > s["KILL_GRACE"] + s["SSH_CONNECT_TIMEOUT"]
    lua = (slurm.root / "etc" / "job_submit.lua").read_text()
    assert f'local STARTER = "{hooks}/jobstarter"' in lua


def test_reconcile_asks_the_real_scontrol_and_frees_the_vm_of_a_job_that_ended_without_its_epilog(
        gw: Gateway) -> None:
    """vmpool's `[batch] system = slurm` against the real scontrol: a held (pending) job is alive,
    a cancelled one is gone; VMs held under their ids by hand play a lost epilog."""
    env = {**os.environ, "SLURM_CONF": str(gw.slurm.conf)}
    gw.pool.write_config(batch={"system": "slurm"}, pool={"job_gone_grace": 1})
    pending = gw.submit("vmps-alice", "#!/bin/bash\ntrue\n", options=("--hold",))
    ended = gw.submit("vmps-bob", "#!/bin/bash\ntrue\n", options=("--hold",))
    gw.slurm.run("scancel", ended)
    assert (gw.slurm.state(pending), gw.slurm.state(ended)) == ("PENDING", "CANCELLED")
    for job, user in ((pending, "vmps-alice"), (ended, "vmps-bob")):
        gw.pool.run("acquire", job, "--user", user, env=env)
    lost = gw.vm_of(ended)

    def reconciled() -> bool:  # cron's passes, with this cluster's slurm.conf
        gw.pool.run("reconcile", env=env)
        return lost["server_id"] not in {s.id for s in gw.pool.servers()}
    wait_until(reconciled, 90, "the VM of the ended job deleted", interval=0.3)

    assert [vm["job"] for vm in gw.pool.vms("busy")] == [pending], "the pending job keeps its VM"
    assert "gone without epilogue" in Path(gw.pool.settings["pool"]["log_file"]).read_text()
    gw.slurm.run("scancel", pending)
    gw.pool.run("release", pending)


def test_a_job_cancelled_while_its_prolog_waits_for_a_vm_holds_nothing_afterwards(gw: Gateway) -> None:
    gw.pool.bed.set_behaviour(f"^{gw.pool.prefix}", spawn_delay=15)  # a slow boot
    job = gw.submit("vmps-alice", "#!/bin/bash\necho ran\n")
    wait_until(lambda: [w for w in gw.pool.status()["waiting"] if w["job"] == job], 60,
               "the prolog's acquire waiting for a VM")

    gw.slurm.run("scancel", job, user="vmps-alice")
    info = gw.done(job, timeout=180)

    assert info["JobState"] == "CANCELLED", info
    assert gw.out(job) == "", "the job ran"
    assert not [vm for vm in gw.pool.vms() if vm["job"] == job], gw.pool.vms()
    assert gw.pool.status()["waiting"] == []
    assert not (gw.slurm.root / "jobs" / job).exists()
    assert f"epilog {job}: " in gw.log()
    assert not gw.drained()
