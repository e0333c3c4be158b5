"""vmpool's Slurm hooks end to end: a real slurmctld + two slurmd (Debian 12's Slurm 22.05, started
by tests/slurm_cluster.py on loopback) run the hooks as `make install-slurm-hooks` installs them
and as its printed slurm.conf lines configure them; the real `vmpool` runs against the local
cloud; jobs run on its sshd VMs over OpenSSH.

The cluster is a site's: an ordinary node `cn1` in the default partition `batch` beside the pool's
node `vmgw` (partition `vmpool`, not the default), the site's own prolog and epilog in
`prolog.d/`/`epilog.d/` globs with vmpool's linked in beside them, and the site's own
job_submit.lua (it sets each job's comment) calling vmpool's module.

The essential job-starter tests (a job runs on its VM and returns its exit code; `scancel` ends
it there) run twice: on that cluster (`ProctrackType=proctrack/linuxproc`) and on the same cluster
started under `ProctrackType=proctrack/cgroup` (cgroup v1's freezer), skipped with the reason where
this machine cannot run it.

Job owners are real non-root users of this machine, created if missing: vmps-alice and vmps-bob.
The node `vmgw` advertises CPUs = the pool's max (3, the `pool` fixture's, of 1-vCPU VMs: what
`vmpool capacity` says): one job per VM. The `slurm_classes` cluster's vmgw is as big as install
prints from `vmpool capacity` for a pool of three VM classes (CPUs, RealMemory, Gres=gpu).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TRACEBACK, VMPOOL, PoolHandle, wait_until
from tests.pbs_mom import ensure_users
from tests.slurm_cluster import (
    NODE,
    ORDINARY_NODE,
    PARTITION,
    SlurmCluster,
    cgroup_v1_missing,
    free_port,
    missing,
)
from tests.torque_node import user_traces
from tests.vm_classes import flavor_of, use_classes

pytestmark = [
    pytest.mark.xdist_group("slurm"),
    pytest.mark.skipif(
        bool(missing()),
        reason=f"Slurm is not installed ({', '.join(missing())} missing): "
        "`make slurm-deps` (apt-get install slurmctld slurmd slurm-client munge)",
    ),
]

USERS = ("vmps-alice", "vmps-bob")
CPUS = 3  # the pool fixture's [pool] max
SETTINGS = {
    "ACQUIRE_TIMEOUT": 60,
    "SSH_CONNECT_TIMEOUT": 3,
    "SCRUB_TIMEOUT": 20,
    "PREPARE_TIMEOUT": 20,
    "KILL_GRACE": 2,
}


SITE_LUA = """-- the site's own submit filter
local vmpool = dofile("{module}")
function slurm_job_submit(job_desc, part_list, submit_uid)
   job_desc.comment = "site filter ran"
   return vmpool.job_submit(job_desc, part_list, submit_uid)
end
function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return vmpool.job_modify(job_desc, job_rec, part_list, modify_uid)
end
return slurm.SUCCESS
"""
# The site's own prolog and epilog: a line per job and node in ROOT/site.log.
SITE_HOOK = """#!/bin/sh
echo "$0 $SLURMD_NODENAME $SLURM_JOB_ID" >> {log}
"""


def install(
    root: Path,
    vmpool_config: str,
    *make_args: str,
    check: bool = True,
    conf_dir: Path | None = None,
    **settings: object,
) -> subprocess.CompletedProcess[str]:
    """The hooks as the docs tell a site to install them (hooks in root/hooks, lua beside slurm.conf)."""
    settings = {**SETTINGS, **settings}
    return subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT),
            "install-slurm-hooks",
            f"SLURM_HOOKS_DIR={root / 'hooks'}",
            f"SLURM_CONF_DIR={conf_dir or root / 'etc'}",
            f"VMPOOL={VMPOOL}",
            f"VMPOOL_CONFIG={vmpool_config}",
            f"JOB_DIR={root / 'jobs'}",
            f"SLURM_NODES={NODE}",
            "NOT_DEFAULT=1",
            *make_args,
            "HOOKS_SETTINGS=" + " ".join(f"{k}={v}" for k, v in settings.items()),
        ],
        capture_output=True,
        text=True,
        check=check,
    )


def conf_lines(printed: str) -> dict[str, str]:
    """The slurm.conf lines install printed (not its comments)."""
    return dict(line.split("=", 1) for line in printed.splitlines() if line and not line.startswith("#"))


def site_files(root: Path) -> dict[str, str]:
    """The site's own job_submit.lua, prolog and epilog, before vmpool's install; vmpool's hooks
    linked in beside them as install's printed lines say. Returns the Prolog=/Epilog= globs."""
    etc = root / "etc"
    (etc / "job_submit.lua").write_text(SITE_LUA.format(module=etc / "vmpool_submit.lua"))
    (etc / "job_submit.lua").chmod(0o644)
    globs = {}
    for kind in ("prolog", "epilog"):
        hooks_d = etc / f"{kind}.d"
        hooks_d.mkdir(mode=0o755)
        site = hooks_d / f"10-site-{kind}"
        site.write_text(SITE_HOOK.format(log=root / "site.log"))
        site.chmod(0o755)
        (hooks_d / "90-vmpool").symlink_to(root / "hooks" / kind)
        globs[kind.capitalize()] = f"{hooks_d}/*"
    return globs


def node_size(printed: str) -> dict[str, str]:
    """The pool's node's size install printed (`vmpool capacity`'s): CPUs, RealMemory, Gres."""
    line = next(line for line in printed.splitlines() if line.startswith("# NodeName=<the pool's node> "))
    return dict(word.split("=", 1) for word in line.split()[2:] if "=" in word)


@contextmanager
def site_cluster(proctrack: str = "linuxproc", vmpool_config: str = "") -> Iterator[SlurmCluster]:
    """The site's cluster with vmpool's hooks installed, started, and stopped (clean) at the end;
    with VMPOOL_CONFIG, its node vmgw as big as install says that pool holds at once (else CPUs =
    CPUS, the `pool` fixture's max of 1-vCPU VMs)."""
    ensure_users(USERS)
    root = Path(tempfile.mkdtemp(prefix=f"vmpool-slurm-{proctrack}-", dir="/tmp"))
    root.chmod(0o755)
    (root / "etc").mkdir(mode=0o755)
    globs = site_files(root)
    printed = install(root, vmpool_config or "/nonexistent/vmpool.conf").stdout  # each test installs its pool's
    cpus, size = CPUS, ""
    if vmpool_config:
        sized = node_size(printed)
        cpus, size = (
            int(sized["CPUs"]),
            " ".join(f"{key}={sized[key]}" for key in ("RealMemory", "Gres") if key in sized),
        )
    cluster = SlurmCluster(
        root, cpus=cpus, settings={**conf_lines(printed), **globs}, proctrack=proctrack, node_size=size
    )
    cluster.printed = printed  # type: ignore[attr-defined]
    try:
        try:
            cluster.start()
        except AssertionError:
            if proctrack == "cgroup" and (why := cluster.cgroup_errors()):
                pytest.skip(f"slurmd cannot run proctrack/cgroup on this machine: {why}")
            raise
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, "the Slurm cluster left behind:\n" + "\n".join(left)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    with site_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_cgroup() -> Iterator[SlurmCluster]:
    """The same cluster under ProctrackType=proctrack/cgroup (started by the first test asking)."""
    if why := cgroup_v1_missing():
        pytest.skip(f"proctrack/cgroup cannot run on this machine: {why}")
    with site_cluster("cgroup") as cluster:
        yield cluster


# The classes of the pools on the `slurm_classes` cluster (three VMs at most): what its node holds.
CLASSES: dict[str, dict[str, Any]] = {
    "small": {"flavor": "cls-1c2g"},
    "medium": {"flavor": "cls-4c8g", "max": 1},
    # the bed's Nova has no host with a VGPU inventory: the class says its GPU itself (`gpus =`, as
    # for a flavor whose PCI passthrough Nova's extra specs do not show), so its VM can boot
    "gpu": {"flavor": "cls-8c32g", "gpus": 1, "max": 1},
}


@pytest.fixture(scope="session")
def slurm_classes(bed: Any, flavors: dict[str, Any]) -> Iterator[SlurmCluster]:
    """The same cluster, its node vmgw as big as a pool of CLASSES holds at once (install prints
    it from `vmpool capacity`): CPUs, RealMemory and Gres=gpu (gres.conf naming empty files)."""
    directory = Path(tempfile.mkdtemp(prefix="vmps-classes-", dir="/tmp"))
    try:
        sizing = PoolHandle(bed, directory, "tsizing")
        use_classes(sizing, **CLASSES)
        with site_cluster("linuxproc", sizing.config_path) as cluster:
            yield cluster
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Gateway:
    """The node `vmgw` with vmpool's Slurm hooks on one test pool; jobs' output in self.out_dir."""

    def __init__(self, slurm: SlurmCluster, pool: PoolHandle, **settings: object):
        self.slurm = slurm
        self.pool = pool
        self.out_dir = Path(tempfile.mkdtemp(prefix="vmps-out-", dir="/tmp"))
        self.out_dir.chmod(0o1777)
        self.install(**settings)

    def install(self, **settings: Any) -> None:
        install(self.slurm.root, self.pool.config_path, **settings)

    def submit(self, user: str, script: str, *args: str, options: tuple[str, ...] = (), **kw: Any) -> str:
        return self.slurm.sbatch(
            user,
            script,
            args=args,
            options=("-p", PARTITION, "-o", f"{self.out_dir}/%j.out", "-e", f"{self.out_dir}/%j.err", *options),
            **kw,
        )

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
            return (
                info
                if complete and not self.slurm.run("squeue", "-h", "-j", job, "-t", "CG", check=False).stdout.strip()
                else None
            )

        return wait_until(finished, timeout, f"job {job} to end and its epilog to run ({self.slurm.job(job)})", 0.3)

    def drained(self) -> bool:
        state = self.slurm.node().get("State", "")
        return any(word in state for word in ("DRAIN", "DOWN", "FAIL"))


@pytest.fixture
def gw(request: pytest.FixtureRequest, pool: PoolHandle) -> Iterator[Gateway]:
    """The pool's node; on the proctrack/cgroup cluster when parametrized ("cgroup", indirect), or
    ("classes") a pool of CLASSES on the cluster sized for it."""
    kind = getattr(request, "param", "linuxproc")
    slurm: SlurmCluster = request.getfixturevalue(
        {"cgroup": "slurm_cgroup", "classes": "slurm_classes"}.get(kind, "slurm")
    )
    if kind == "classes":
        use_classes(pool, **CLASSES)
    handle = Gateway(slurm, pool)
    try:
        yield handle
        for path in sorted(handle.out_dir.iterdir()):  # a job owner reads these: never a traceback
            assert TRACEBACK not in path.read_text(errors="replace"), path.name
    finally:
        slurm.run("scancel", "--full", check=False)
        wait_until(
            lambda: not slurm.run("squeue", "-h", check=False).stdout.strip(), 300, "every job (and its epilog) to end"
        )
        node = slurm.node()
        shutil.rmtree(handle.out_dir, ignore_errors=True)
        if handle.drained():  # the next tests need a working node; this one fails below
            slurm.scontrol("update", f"NodeName={NODE}", "State=RESUME", check=False)
        assert "DRAIN" not in node.get("State", ""), f"the node was drained: {node.get('Reason')}"


def vm_state(gw: Gateway, vm: dict) -> str:
    return next(v["state"] for v in gw.pool.vms() if v["name"] == vm["name"])


# --- a job's life ---

# The job starter's essentials, also under proctrack/cgroup.
BOTH_PROCTRACKS = pytest.mark.parametrize("gw", ["linuxproc", "cgroup"], indirect=True)


def step_processes(gw: Gateway, job: str) -> dict[str, str]:
    """The processes of job JOB's batch step on the node (the job starter, its ssh...), each with
    its freezer cgroup."""
    found = {}
    for pid, cmd in gw.slurm.job_processes():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job}".encode() in environ and not cmd.startswith("slurmstepd"):
                found[f"{pid} {cmd}"] = gw.slurm.freezer_cgroup(pid)
        except OSError:
            continue  # ended meanwhile
    return found


@BOTH_PROCTRACKS
def test_a_job_runs_on_its_vm_with_its_args_cwd_env_output_and_exit_code(gw: Gateway) -> None:
    alice = pwd.getpwnam("vmps-alice")
    workdir = f"{alice.pw_dir}/project one"
    gw.slurm.run("mkdir", "-p", workdir, user="vmps-alice")
    job = gw.submit(
        "vmps-alice",
        """#!/bin/bash
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
""",
        "first",
        "second arg",
        options=("-D", workdir, "--export=ALL,MY_SETTING=it's $HOME; `x`"),
    )

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


def test_an_ordinary_job_runs_on_the_ordinary_node_untouched_beside_a_pool_job(gw: Gateway) -> None:
    """The site's default partition `batch` (node cn1) and the pool's, at once: the site's own
    job_submit.lua, prolog and epilog run for both; vmpool's hooks only for the pool's job."""
    script = '#!/bin/bash\necho "node=$SLURMD_NODENAME host=$(hostname)"; head -n 1 "$0"; sleep 3\n'
    ordinary = gw.slurm.sbatch("vmps-bob", script, options=("-o", f"{gw.out_dir}/%j.out"))
    pooled = gw.submit("vmps-alice", script)
    held: set[str] = set()

    def both_done() -> bool:
        held.update(vm["job"] for vm in gw.pool.vms() if vm["job"])
        return all(gw.slurm.state(job) == "COMPLETED" for job in (ordinary, pooled))

    wait_until(both_done, 180, f"both jobs to complete ({gw.slurm.job(ordinary)}, {gw.slurm.job(pooled)})", 0.3)
    gw.done(pooled)
    gw.done(ordinary)

    info = gw.slurm.job(ordinary)
    assert (info["NodeList"], info["Partition"]) == (ORDINARY_NODE, "batch"), info
    host = gw.slurm.run("hostname").stdout.strip()
    assert gw.out(ordinary) == f"node={ORDINARY_NODE} host={host}\n#!/bin/bash\n", "it ran on cn1 as written"
    assert gw.out(pooled).startswith(f"node={NODE} host="), gw.out(pooled)
    assert f"host={host}\n" not in gw.out(pooled), "the pool's job ran on its VM"
    assert held == {pooled}, held
    assert f" {ordinary}: " not in gw.log(), gw.log()
    assert f"prolog {pooled}: VM ready" in gw.log()
    site = (gw.slurm.root / "site.log").read_text()
    etc = gw.slurm.root / "etc"
    for kind in ("prolog", "epilog"):
        assert f"{etc}/{kind}.d/10-site-{kind} {ORDINARY_NODE} {ordinary}\n" in site, site
        assert f"{etc}/{kind}.d/10-site-{kind} {NODE} {pooled}\n" in site, site
    assert gw.slurm.job(ordinary).get("Comment") == gw.slurm.job(pooled).get("Comment") == "site filter ran"
    assert not gw.drained() and "DRAIN" not in gw.slurm.node(ORDINARY_NODE).get("State", "")


@BOTH_PROCTRACKS
def test_scancel_ends_the_job_on_its_vm(gw: Gateway) -> None:
    job = gw.submit("vmps-bob", "#!/bin/sh\necho started; echo oops >&2; exec sleep 1000\n")
    uid = str(pwd.getpwnam("vmps-bob").pw_uid)
    wait_until(
        lambda: gw.out(job) == "started\n" and "oops\n" in gw.err(job),
        90,
        f"the job's first lines while it runs ({gw.slurm.job(job)})",
    )
    vm = gw.vm_of(job)
    wait_until(lambda: gw.on_vm(vm, "pgrep", "-U", uid, "-x", "sleep")[0] == 0, 10, "the job's sleep on the VM")
    if gw.slurm.proctrack == "cgroup":  # the starter and its ssh client are the step's, for slurmstepd
        step = step_processes(gw, job)
        assert any("jobstarter" in process for process in step), step
        assert all(cgroup.endswith(f"/job_{job}/step_batch") for cgroup in step.values()), step

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
    job = gw.submit("vmps-alice", "#!/bin/bash\necho started; sleep 1000; echo not reached\n", options=("--time=1",))
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
    wait_until(
        lambda: (
            all(gw.slurm.state(job) == "RUNNING" for job in jobs.values())
            and len({vm["job"] for vm in gw.pool.vms("busy")} & set(jobs.values())) == 2
        ),
        120,
        "both jobs running on VMs at once",
    )
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
    # one class of 1-vCPU VMs: the node's CPUs, what the pool holds at once, are its max in VMs
    assert gw.pool.run("capacity").stdout.startswith(f"cores={CPUS}\n")
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

    assert len(most) <= CPUS, (
        f"the cloud held {len(most)} of the pool's servers (max {CPUS}): {most}\n"
        + Path(gw.pool.settings["pool"]["log_file"]).read_text()
    )
    assert [gw.out(job) for job in jobs] == ["done\n"] * len(jobs)
    assert not gw.drained()


# --- VM classes: the job's allocation chooses its VM ---


@pytest.mark.timeout(600)  # the sized cluster's start, then the jobs: on a loaded machine more than 300 s
@pytest.mark.parametrize("gw", ["classes"], indirect=True)
def test_a_job_s_cpus_memory_and_gpus_choose_its_vm_s_class_and_one_no_class_fits_is_refused_at_sbatch(
    gw: Gateway,
) -> None:
    capacity = dict(line.split("=", 1) for line in gw.pool.run("capacity").stdout.splitlines())
    node = gw.slurm.node()
    assert (node["CPUTot"], node["RealMemory"], node["Gres"]) == (
        capacity["cores"],
        capacity["memory"],
        f"gpu:{capacity['gpus']}",
    ), node
    refused = gw.slurm.run(
        "sbatch", "-p", PARTITION, "-c", "1", "--mem=40G", "--wrap", "true", user="vmps-alice", check=False, cwd="/tmp"
    )  # the node has the memory, no VM has
    assert refused.returncode != 0
    assert (
        "vmpool: this job asks for 1 cores, 40G memory: more than any class of the pool behind the partition"
        " vmpool offers (the largest, gpu, has 8 cores, 32G memory, 1 GPU(s)); ask for less, or use another"
        " partition (-p)"
    ) in refused.stderr, refused.stderr

    script = "#!/bin/bash\nsleep 2; echo ran\n"
    jobs = {
        "medium": gw.submit("vmps-alice", script, options=("-c", "4", "--mem=6G")),
        "small": gw.submit("vmps-bob", script, options=("-c", "1")),
        "gpu": gw.submit("vmps-bob", script, options=("-c", "2", "--gres=gpu:1")),
    }
    held: dict[str, tuple[str, str]] = {}

    def all_ended() -> bool:
        held.update({vm["job"]: (vm["class"], vm["server_id"]) for vm in gw.pool.vms() if vm["job"]})
        return all(gw.slurm.state(job) in ("COMPLETED", "FAILED", "CANCELLED") for job in jobs.values())

    wait_until(all_ended, 240, f"the jobs to end ({[gw.slurm.state(job) for job in jobs.values()]})", 0.3)

    assert [gw.done(job)["JobState"] for job in jobs.values()] == ["COMPLETED"] * 3, gw.log()
    assert [gw.out(job) for job in jobs.values()] == ["ran\n"] * 3
    chosen = {name: (held[job][0], flavor_of(gw.pool, held[job][1])) for name, job in jobs.items()}
    assert chosen == {"medium": ("medium", "cls-4c8g"), "small": ("small", "cls-1c2g"), "gpu": ("gpu", "cls-8c32g")}


# --- failures ---


def test_a_cloud_failure_in_the_prolog_requeues_the_job_without_draining_the_node(gw: Gateway) -> None:
    gw.pool.bed.set_behaviour(f"^{gw.pool.prefix}", error=True)  # every boot fails
    gw.install(ACQUIRE_TIMEOUT=4)
    job = gw.submit("vmps-alice", "#!/bin/bash\necho ran\n")

    info = wait_until(
        lambda: (i := gw.slurm.job(job)) and int(i.get("Restarts", "0")) >= 1 and i,
        120,
        f"the job to be requeued ({gw.slurm.job(job)})",
    )

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
    job = gw.slurm.run(
        "sbatch", "--parsable", "-p", PARTITION, "-o", f"{gw.out_dir}/%j.out", "--wrap", "id", cwd=str(gw.out_dir)
    ).stdout.strip()  # root's

    info = gw.done(job)

    assert info["JobState"] == "CANCELLED", info
    assert "below MIN_UID=1000" in info.get("AdminComment", ""), info
    assert gw.out(job) == ""
    assert not (gw.out_dir / f"vmpool-{job}.log").exists(), "written as root"
    assert gw.pool.vms() == [] and gw.pool.servers() == []
    assert not gw.drained()


def test_interactive_and_multi_node_jobs_are_refused_at_submit_time(gw: Gateway) -> None:
    salloc = gw.slurm.run("salloc", "-p", PARTITION, "--no-shell", user="vmps-alice", check=False, timeout=30)
    srun = gw.slurm.run("srun", "-p", PARTITION, "true", user="vmps-alice", check=False, timeout=30)
    multi = gw.slurm.run(
        "sbatch", "-p", PARTITION, "-N", "2", "--wrap", "true", user="vmps-alice", check=False, cwd=str(gw.out_dir)
    )

    for result in (salloc, srun):
        assert result.returncode != 0
        assert "vmpool: interactive jobs (salloc, srun outside a batch job) cannot run" in result.stderr
    assert multi.returncode != 0 and "multi-node and heterogeneous jobs are not supported" in multi.stderr
    assert gw.slurm.run("squeue", "-h").stdout.strip() == ""
    assert gw.pool.servers() == []


def test_install_prints_only_what_the_pool_needs_and_keeps_the_sites_submit_filter(slurm: SlurmCluster) -> None:
    lines = conf_lines(slurm.printed)  # type: ignore[attr-defined]
    hooks = slurm.root / "hooks"
    assert set(lines) == {"PrologFlags", "PrologEpilogTimeout", "KillWait", "JobSubmitPlugins"}, lines
    assert lines["PrologFlags"] == "Alloc" and lines["JobSubmitPlugins"] == "lua"
    assert int(lines["KillWait"]) > SETTINGS["KILL_GRACE"] + SETTINGS["SSH_CONNECT_TIMEOUT"]
    assert f"#   ln -s {hooks}/prolog {slurm.root}/etc/prolog.d/90-vmpool\n" in slurm.printed  # type: ignore[attr-defined]
    etc = slurm.root / "etc"
    assert (etc / "job_submit.lua").read_text() == SITE_LUA.format(module=etc / "vmpool_submit.lua")
    module = (etc / "vmpool_submit.lua").read_text()
    assert f'local STARTER = "{hooks}/jobstarter"' in module and "local IS_DEFAULT = false" in module
    assert (hooks / "vmpool-slurm.conf").read_text().splitlines()[1:] == [f"PARTITION={PARTITION}", f"NODES={NODE}"]
    # installed before any pool (its config missing): the node's size is not guessed, install says how to get it
    assert "# NodeName=<the pool's node> CPUs=<cores> RealMemory=<memory> [Gres=gpu:<gpus>] ...\n" in slurm.printed  # type: ignore[attr-defined]
    assert f"# Run `{VMPOOL} --config /nonexistent/vmpool.conf capacity` where the cloud is reachable" in slurm.printed  # type: ignore[attr-defined]
    assert "checks no VM classes" in slurm.printed  # type: ignore[attr-defined]


def test_install_never_replaces_a_sites_own_job_submit_lua_without_force(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    site = "-- the site's\nfunction slurm_job_submit(j, p, u) return slurm.SUCCESS end\nreturn slurm.SUCCESS\n"
    (etc / "job_submit.lua").write_text(site)

    refused = install(tmp_path, "/nonexistent/vmpool.conf", check=False)

    assert refused.returncode != 0
    assert f"{etc}/job_submit.lua is the site's own job_submit.lua: nothing installed" in refused.stderr
    assert f'local vmpool = dofile("{etc}/vmpool_submit.lua")' in refused.stderr
    assert TRACEBACK not in refused.stderr
    assert (etc / "job_submit.lua").read_text() == site and not (tmp_path / "hooks").exists()

    forced = install(tmp_path, "/nonexistent/vmpool.conf", "FORCE=1")

    backups = list(etc.glob("job_submit.lua.vmpool-backup.*"))
    assert len(backups) == 1 and backups[0].read_text() == site, backups
    assert f"it is kept as {backups[0]}" in forced.stderr
    assert (etc / "job_submit.lua").read_text().startswith("-- vmpool-hooks: slurm job_submit.lua\n")
    again = install(tmp_path, "/nonexistent/vmpool.conf")  # vmpool's own: replaced without a word
    assert again.stderr == "" and len(list(etc.glob("job_submit.lua.vmpool-backup.*"))) == 1
    # no pool to ask (its config missing): the module checks no classes, and install says so
    # (the session cluster's module is rewritten by each test's install of its pool: not read here)
    assert 'local CLASSES = ""' in (etc / "vmpool_submit.lua").read_text() and "checks no VM classes" in again.stdout


# --- the hooks on every node: a stand-in vmpool, no Slurm ---

STUB_VMPOOL = """#!/bin/bash
[[ $3 == capacity ]] && exit 3  # install asks; its config is missing
echo "$3 $4" >> {root}/vmpool.log
echo "$*" >> {root}/vmpool-args.log
case $3 in
    acquire) [[ -e {root}/answer ]] || exit 2; cat {root}/answer ;;
    release) exit 1 ;;
esac
"""


# scontrol as slurmctld answers `scontrol -o show job N` (ROOT/job, when there: the job's line);
# anything else (and without ROOT/job) as the real one does, here without a usable slurm.conf.
STUB_SCONTROL = """#!/bin/sh
case "$*" in "-o show job "*) [ -e {root}/job ] && exec cat {root}/job ;; esac
exec {root}/bin/scontrol.real "$@"
"""
JOB_LINE = (
    "JobId={job} JobName={name} UserId=vmps-alice(1001) JobState=RUNNING Reason=Prolog Partition=vmpool"
    " NodeList=vmgw NumNodes=1 NumCPUs=1 {tasks} CPUs/Task=1 TRES=cpu=1,node=1,billing=1"
    " MinCPUsNode=1 {memory} MinTmpDiskNode=0 Features=(null) {tres} Command=(null) WorkDir=/tmp\n"
)


def job_line(name: str = "x", memory: str = "MinMemoryNode=0", tres: str = "", tasks: str = "NumTasks=1") -> str:
    """`scontrol -o show job 77` (the fields the prolog reads, between others)."""
    return JOB_LINE.format(job=77, name=name, memory=memory, tres=tres, tasks=tasks)


@pytest.fixture
def stubbed() -> Iterator[Path]:
    """vmpool's Slurm hooks installed as on a site, with their own prolog.d, and a stand-in vmpool
    that logs each call to ROOT/vmpool.log (and its arguments to ROOT/vmpool-args.log): `acquire`
    refuses the job, or (with ROOT/answer) gives a VM at 127.0.0.1 on a closed port; `release`
    fails. `scontrol -o show job` answers ROOT/job (a job asking for no memory)."""
    root = Path(tempfile.mkdtemp(prefix="vmps-stub-", dir="/tmp"))
    root.chmod(0o755)
    try:
        (root / "bin").mkdir()
        shutil.copy("/usr/bin/scontrol", root / "bin" / "scontrol.real")
        (root / "bin" / "scontrol").write_text(STUB_SCONTROL.format(root=root))
        (root / "bin" / "scontrol").chmod(0o755)
        (root / "job").write_text(job_line())
        (root / "etc").mkdir(mode=0o755)
        (root / "etc" / "slurm.conf").write_text("NotASlurmKey=1\n")
        stub = root / "vmpool"
        stub.write_text(STUB_VMPOOL.format(root=root))
        stub.chmod(0o755)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "key")], check=True)
        (root / "known_hosts").write_text("127.0.0.1 " + (root / "key.pub").read_text())
        (root / "answer.ok").write_text(
            f"VMPOOL_VM_NAME=vm-1\nVMPOOL_SERVER_ID=s-1\nVMPOOL_ADDRESS=127.0.0.1\nVMPOOL_SSH_USER=root\n"
            f"VMPOOL_SSH_PORT={free_port()}\nVMPOOL_SSH_KEY={root}/key\nVMPOOL_KNOWN_HOSTS={root}/known_hosts\n"
            "VMPOOL_ALREADY_HELD=no\n"
        )
        printed = install(root, "/nonexistent/vmpool.conf", f"VMPOOL={stub}").stdout
        (root / "printed").write_text(printed)
        for kind in ("prolog", "epilog"):
            (root / "etc" / f"{kind}.d").mkdir()
            (root / "etc" / f"{kind}.d" / "90-vmpool").symlink_to(root / "hooks" / kind)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_hook(
    root: Path,
    kind: str,
    partition: str,
    node: str,
    job: str = "77",
    binds: tuple[str, ...] = (),
    **slurmd_env: str,
) -> subprocess.CompletedProcess[str]:
    """ROOT/etc/KIND.d/90-vmpool (the link) as slurmd runs it for vmps-alice's job JOB (one CPU,
    no GPU; SLURMD_ENV adds to its environment), in a mount namespace where ROOT/bin/NAME stands
    for /usr/bin/NAME (scontrol, and each of BINDS): `scontrol -o show job` answers ROOT/job;
    scontrol's other calls and scancel fail at once (their slurm.conf is unusable: nothing goes to
    the network)."""
    alice = pwd.getpwnam("vmps-alice")
    mounts = " && ".join(f"mount --bind {root}/bin/{name} /usr/bin/{name}" for name in ("scontrol", *binds))
    wrap = ("unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "wrap")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SLURM_JOB_ID": job,
        "SLURM_JOB_USER": "vmps-alice",
        "SLURM_JOB_UID": str(alice.pw_uid),
        "SLURM_JOB_GID": str(alice.pw_gid),
        "SLURM_JOB_PARTITION": partition,
        "SLURMD_NODENAME": node,
        "SLURM_JOB_WORK_DIR": "/nonexistent",
        "SLURM_CONF": str(root / "etc" / "slurm.conf"),
        "SLURM_JOB_CPUS_PER_NODE": "1",
        **slurmd_env,
    }
    return subprocess.run(
        [*wrap, str(root / "etc" / f"{kind}.d" / "90-vmpool")], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_hooks_leave_every_other_job_of_the_cluster_alone(stubbed: Path) -> None:
    ensure_users(USERS)
    for partition, node in (("gpu", NODE), ("batch", ORDINARY_NODE), (PARTITION, ORDINARY_NODE), ("", "")):
        for kind in ("prolog", "epilog"):
            result = run_hook(stubbed, kind, partition, node)
            assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), (partition, node, result)
    assert not (stubbed / "vmpool.log").exists(), (stubbed / "vmpool.log").read_text()
    assert not (stubbed / "jobs" / "slurm-hooks.log").exists()

    # the pool's job on the pool's node, through the link in prolog.d: the hooks find their library
    run_hook(stubbed, "prolog", PARTITION, NODE)
    run_hook(stubbed, "epilog", PARTITION, NODE)

    assert (stubbed / "vmpool.log").read_text().splitlines()[:2] == ["acquire 77", "release 77"]
    log = (stubbed / "jobs" / "slurm-hooks.log").read_text()
    assert "prolog 77: job cancelled: vmpool prologue 77: vmpool refused the job" in log, log
    assert "epilog 77: epilogue exit 2" in log, log


@pytest.mark.parametrize(
    ("cpus", "job", "asked"),
    [
        ("4", job_line(memory="MinMemoryNode=6G"), "--cores 4 --mem 6144 --gpus 0"),
        ("4", job_line(memory="MinMemoryCPU=1500M", tres="TresPerNode=gres:gpu:2"), "--cores 4 --mem 6000 --gpus 2"),
        ("1", job_line(tres="TresPerJob=gres:gpu:a100:1"), "--cores 1 --mem 0 --gpus 1"),
        ("2", job_line(tres="TresPerTask=gres:gpu:1", tasks="NumTasks=2"), "--cores 2 --mem 0 --gpus 2"),
    ],
    ids=["mem", "mem-per-cpu,gres", "gpus", "gpus-per-task"],
)
def test_the_prolog_asks_for_the_job_s_cpus_memory_and_gpus_on_the_node(
    stubbed: Path, cpus: str, job: str, asked: str
) -> None:
    ensure_users(USERS)
    (stubbed / "job").write_text(job)

    run_hook(stubbed, "prolog", PARTITION, NODE, SLURM_JOB_CPUS_PER_NODE=cpus)

    acquire = (stubbed / "vmpool-args.log").read_text().splitlines()[0]
    assert acquire.startswith("--config /nonexistent/vmpool.conf acquire 77 ") and acquire.endswith(asked), acquire


@pytest.mark.parametrize(
    ("cpus", "job", "outcome"),
    [
        ("1", job_line(memory="MinMemoryNode=lots"), "job cancelled: cannot read the job's memory"),
        # the job's own name must not choose its memory or GPUs: a field shown twice is not read
        (
            "1",
            job_line(name="a MinMemoryNode=1M", memory="MinMemoryNode=64G"),
            "job cancelled: scontrol shows the job's MinMemoryNode twice",
        ),
        (
            "1",
            job_line(name="a TresPerNode=gres:gpu:0", tres="TresPerNode=gres:gpu:1"),
            "job cancelled: scontrol shows the job's TresPerNode twice",
        ),
        ("1", job_line(tres="TresPerJob=gres:gpu:lots"), "job cancelled: cannot read the job's GPUs"),
        ("4(x2)", job_line(), "job cancelled: the job's CPUs"),
        ("1", None, "job requeued: scontrol cannot tell the job's memory and GPUs"),  # slurmctld does not answer
    ],
    ids=["memory", "forged-memory", "forged-gpus", "gpus", "cpus", "scontrol-silent"],
)
def test_an_allocation_the_prolog_cannot_read_cancels_the_job_and_a_silent_slurmctld_requeues_it(
    stubbed: Path, cpus: str, job: str | None, outcome: str
) -> None:
    ensure_users(USERS)
    if job is None:
        (stubbed / "job").unlink()
    else:
        (stubbed / "job").write_text(job)

    result = run_hook(stubbed, "prolog", PARTITION, NODE, SLURM_JOB_CPUS_PER_NODE=cpus)

    log = (stubbed / "jobs" / "slurm-hooks.log").read_text()
    assert result.returncode == 0 and f"prolog 77: {outcome}" in log, log
    assert "could not set the job's AdminComment" in log, "Slurm was told (here: unreachable)"
    assert not (stubbed / "vmpool.log").exists(), "no VM asked for"


BUDGET_WRAPPER = """#!/bin/sh
echo "$(basename "$0") $1 $2 $3 $4 $5" >> {log}  # the budget and the command (one line)
case $(basename "$0") in sleep) exit 0 ;; esac
case " $* " in *" ssh -F /dev/null "*) [ -e {ssh_ok} ] && {{ cat >/dev/null; exit 0; }} ;; esac
exec {real} "$@"
"""


def budgets(log: Path) -> list[tuple[int, str]]:
    """Each bounded wait the hook made, as seconds and what: `timeout [--foreground] [-k K] N CMD`
    is N + K, `sleep N` is N."""
    waits = []
    for line in log.read_text().splitlines():
        words = line.split()
        if words[0] == "sleep":
            waits.append((int(words[1]), line))
            continue
        index, kill_after = 1, 0
        while words[index].startswith("-"):
            if words[index] in ("-k", "--kill-after"):
                kill_after = int(words[index + 1])
                index += 1
            index += 1
        waits.append((int(words[index]) + kill_after, line))
    return waits


def test_the_printed_timeout_is_the_hooks_worst_case_as_they_run_it(stubbed: Path) -> None:
    """The prolog's and the epilog's longest paths, with every bounded call logged (`timeout` and
    `sleep` replaced, in a mount namespace, by a wrapper that logs its budget): the sums must be
    the worst cases install printed, so a timeout that grows in a hook grows the printed value."""
    ensure_users(USERS)
    bin_dir = stubbed / "bin"
    shutil.copy("/usr/bin/timeout", bin_dir / "timeout.real")
    log = stubbed / "budgets.log"
    for name in ("timeout", "sleep"):
        wrapper = bin_dir / name
        wrapper.write_text(BUDGET_WRAPPER.format(log=log, ssh_ok=stubbed / "ssh-ok", real=bin_dir / "timeout.real"))
        wrapper.chmod(0o755)
    binds = ("timeout", "sleep")
    (stubbed / "answer.ok").rename(stubbed / "answer")
    printed = (stubbed / "printed").read_text()
    worst = re.search(r"worst case: prolog (\d+)s, epilog (\d+)s", printed)
    assert worst, printed

    # the prolog: the job's memory (scontrol), a VM, its preparation fails (no sshd), the owner
    # told (nowhere writable: both tries), every release fails, Slurm unreachable (AdminComment,
    # requeue, AdminComment, scancel)
    result = run_hook(stubbed, "prolog", PARTITION, NODE, binds=binds)
    prolog = budgets(log)
    log.unlink()
    # the epilog of a job whose VM was prepared: its scrub fails, every release fails
    (stubbed / "ssh-ok").touch()
    run_hook(stubbed, "prolog", PARTITION, NODE, job="78", binds=binds)
    (stubbed / "ssh-ok").unlink()
    log.unlink()
    run_hook(stubbed, "epilog", PARTITION, NODE, job="78", binds=binds)
    epilog = budgets(log)

    hooks_log = (stubbed / "jobs" / "slurm-hooks.log").read_text()
    assert result.returncode == 0 and "prolog 77: job requeued (prologue exit 2): " in hooks_log, hooks_log
    assert "scontrol requeue failed" in hooks_log and "scancel failed" in hooks_log, hooks_log
    assert "epilog 78: epilogue exit 2: " in hooks_log and "scrub of VM vm-1" in hooks_log, hooks_log
    assert sum(seconds for seconds, _ in prolog) == int(worst[1]), "\n".join(line for _, line in prolog)
    assert sum(seconds for seconds, _ in epilog) == int(worst[2]), "\n".join(line for _, line in epilog)
    timeout = int(conf_lines(printed)["PrologEpilogTimeout"])
    assert timeout >= max(int(worst[1]), int(worst[2])) + 30, printed


def test_reconcile_asks_the_real_scontrol_and_frees_the_vm_of_a_job_that_ended_without_its_epilog(gw: Gateway) -> None:
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
    wait_until(
        lambda: [w for w in gw.pool.status()["waiting"] if w["job"] == job], 60, "the prolog's acquire waiting for a VM"
    )

    gw.slurm.run("scancel", job, user="vmps-alice")
    info = gw.done(job, timeout=180)

    assert info["JobState"] == "CANCELLED", info
    assert gw.out(job) == "", "the job ran"
    assert not [vm for vm in gw.pool.vms() if vm["job"] == job], gw.pool.vms()
    assert gw.pool.status()["waiting"] == []
    assert not (gw.slurm.root / "jobs" / job).exists()
    assert f"epilog {job}: " in gw.log()
    assert not gw.drained()
