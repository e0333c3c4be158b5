"""VM classes end to end (issue 19): [class NAME] sections read and checked; flavors of different
sizes on the bed's real Nova, learned through its API; the job's cores, memory and GPUs choose the
VM; the project's quota in cores lets some boots through and the rest wait; single-use VMs; a
one-flavor state file from before classes read and used as it is."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import vmpool as vp
from tests.conftest import ROOT, PoolHandle, wait_until
from tests.pbs_mom import Job
from tests.test_config import GOOD, write
from tests.test_submit_filter import SCRIPT, assert_passed, assert_refused, install_filter, run_batch
from tests.torque_node import Mom
from tests.vm_classes import SIZES, flavor_of, use_classes

# --- the config ---

CLASSES = GOOD.replace("min = 1\n", "max_cores = 64\nmax_memory = 256G\nbigger_vm_may_serve = true\n") + (
    "\n[class small]\nflavor = f1\nmin_free = 1\n\n[class big]\nflavor = f8\nimage = img8\nmax = 2\nsingle_use = true\n"
)


def test_class_sections_are_read_with_the_pool_s_limits(tmp_path: Path) -> None:
    pool = vp.load_config(write(tmp_path, CLASSES)).pool
    assert [(c.name, c.flavor, c.min_free, c.max, c.single_use) for c in pool.vm_classes] == [
        ("small", "f1", 1, 0, False),
        ("big", "f8", 0, 2, True),
    ]
    assert (pool.max_cores, pool.max_memory, pool.bigger_vm_may_serve) == (64, 262144, True)
    assert pool.class_named("big").image == "img8"


def test_a_config_without_classes_is_the_one_class_default_of_its_flavor(tmp_path: Path) -> None:
    pool = vp.load_config(write(tmp_path, GOOD)).pool
    assert [(c.name, c.flavor, c.min, c.max, c.min_free) for c in pool.vm_classes] == [("default", "1", 1, 3, 1)]
    import dataclasses  # a pool changed after loading (the replay's --set, a test) keeps its one class in step

    changed = dataclasses.replace(pool, min=0, max=5, min_free=2).vm_classes
    assert [(c.flavor, c.min, c.max, c.min_free) for c in changed] == [("1", 0, 5, 2)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[class big]\nflavor = f8\n", "[class big]\n"), r"\[class big\] flavor = '': is required"),
        (("max = 2\n", "max = 9\n"), r"\[class big\] max = 9: must be between 1 and the pool's max \(3\)"),
        (("min_free = 1\n", "min_free = x\n"), r"\[class small\] min_free = 'x': expected a whole number"),
        (("min_free = 1\n", "cores = 4\n"), r"\[class small\] unknown key 'cores'"),
        (("[class big]", "[class big one]"), r"\[class big one\]: a class name is letters"),
        (("max_cores = 64\n", "max_cores = 64\nmin = 1\n"), r"\[pool\] min: set min in each \[class NAME\]"),
        (("max_memory = 256G", "max_memory = lots"), r"\[pool\] max_memory = 'lots': expected a size"),
    ],
)
def test_class_errors_name_the_section_and_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(vp.ConfigError, match=message):
        vp.load_config(write(tmp_path, CLASSES.replace(*change, 1)))


# --- over the bed ---


def test_the_job_s_cores_and_memory_choose_its_vm_and_a_job_no_class_fits_is_refused(
    pool: PoolHandle, flavors: dict[str, Any]
) -> None:
    use_classes(pool, **SIZES)
    pool.write_config(pool={"max": 4})
    medium = pool.run("acquire", "1", "--user", "alice", "--cores", "4", "--mem", "6G")
    busy = pool.vms("busy")
    assert [(vm["class"], vm["job"], vm["address"]) for vm in busy] == [("medium", "1", medium.stdout.strip())]
    assert flavor_of(pool, busy[0]["server_id"]) == "cls-4c8g"
    small = pool.run("acquire", "2", "--user", "alice")  # 1 core, no memory: the smallest class
    assert flavor_of(pool, pool.status()["vms"][[vm["job"] for vm in pool.vms()].index("2")]["server_id"]) == "cls-1c2g"
    assert small.stdout.strip() != medium.stdout.strip()

    refused = pool.run("acquire", "3", "--cores", "16", "--mem", "64gb", check=False)
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "job 3 asks for 16 cores, 64G memory: more than any class of the pool offers "
            "(the largest, gpu, has 8 cores, 32G memory, 1 GPU(s))"
        )
    )
    status = pool.status()
    assert status["waiting"] == [] and len(status["vms"]) == 2  # nothing booted for it
    sizes = {entry["name"]: entry["size"] for entry in status["classes"]}
    assert sizes["gpu"] == {"cores": 8, "memory": 32768, "gpus": 1}  # from the flavor's extra specs
    assert sizes["medium"] == {"cores": 4, "memory": 8192, "gpus": 0}
    table = pool.run("status").stdout
    assert "class medium (4 cores, 8G memory): min 0, max 4, min_free 0, desired 1; free 0, busy 1" in table
    assert "a bigger class's Free VM may not serve a smaller job" in table
    pool.run("release", "1")
    pool.run("release", "2")

    # the fast path: a Free VM of the job's class is claimed without the cloud, its client unimported
    pool.bed.reset_counts()
    result, imported = pool.run_in_process(
        "acquire", "4", "--cores", "3", modules=("novaclient", "fabric", "keystoneauth1")
    )
    assert result.returncode == 0 and imported == [], result.stderr
    assert result.stdout.splitlines()[0] == medium.stdout.strip()  # the medium VM, Free again
    assert sum(pool.bed.counts().values()) == 0, pool.bed.counts()


def test_a_single_use_vm_is_deleted_after_its_job_and_a_spare_is_always_ready(
    pool: PoolHandle, flavors: dict[str, Any]
) -> None:
    use_classes(pool, once={"flavor": "cls-1c2g", "single_use": "true", "min_free": 1})
    first = pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free single-use spare")[0]
    pool.run("acquire", "5", "--user", "alice", "--timeout", "5")  # the spare: at once, no boot
    pool.run("release", "5")
    gone = pool.vms("unusable")[0]
    assert (gone["name"], gone["tainted"]) == (first["name"], "single-use: served job 5")
    pool.reconcile_until(
        lambda: first["server_id"] not in {server.id for server in pool.servers()} and pool.vms("free"),
        90,
        "the used VM deleted and a new spare Free",
    )
    assert first["name"] not in {vm["name"] for vm in pool.vms()}


def test_a_project_quota_in_cores_lets_some_boots_through_and_the_rest_wait(
    pool: PoolHandle, flavors: dict[str, Any]
) -> None:
    project = pool.bed.info["project_id"]
    used = {limit.name: limit.value for limit in pool.bed.nova().limits.get().absolute}["totalCoresUsed"]
    pool.bed.set_quota(project, cores=used + 9)  # room for two 4-core VMs, not three
    try:
        use_classes(pool, medium={"flavor": "cls-4c8g"})
        pool.write_config(pool={"max": 4})
        waiting = [pool.spawn("acquire", str(job), "--cores", "4", "--timeout", "60") for job in (11, 12, 13)]
        pool.reconcile_until(lambda: len(pool.vms("busy")) == 2, 90, "two jobs on the two VMs the quota allows")
        for _ in range(3):
            pool.run("reconcile")
        status = pool.status()
        log = Path(pool.settings["pool"]["log_file"]).read_text()
        assert len(pool.servers()) == 2 and len(status["vms"]) == 2, log
        assert len(status["waiting"]) == 1 and status["backoff_until"] is None and not status["last_cloud_error"], log
        assert "class medium: not creating 1 VM(s): the project's quota maxTotalCores" in log
        assert "HTTP 403" not in log and "not created" not in log  # never asked past the quota
        timed_out = pool.run("acquire", "14", "--cores", "4", "--timeout", "2", check=False)
        assert "job 14: no VM within 2s: " in timed_out.stderr  # and it names the limit to raise:
        assert "creates of class medium held back by the project's quota maxTotalCores" in timed_out.stderr
        done = [proc for proc in waiting if proc.poll() is not None]
        assert len(done) == 2 and all(proc.returncode == 0 for proc in done)
        first = next(vm for vm in pool.vms("busy"))
        pool.run("release", first["job"])  # its VM goes to the third job: nothing over quota
        wait_until(lambda: all(proc.poll() is not None for proc in waiting), 60, "the third job's VM")
        assert [proc.returncode for proc in waiting] == [0, 0, 0] and len(pool.servers()) == 2
    finally:
        pool.bed.set_quota(project, cores=1000)


PRE_CLASSES = "20fea6d"  # the last vmpool before VM classes


def test_a_one_flavor_state_file_from_before_classes_is_read_and_used_as_it_is(
    pool: PoolHandle, tmp_path: Path
) -> None:
    """vmpool as it was before classes (commit PRE_CLASSES of this repository) fills the pool; this
    one claims and frees its VM; the older one reads the state this one wrote."""
    old = tmp_path / "old"
    old.mkdir()
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{PRE_CLASSES}:vmpool.py"], capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip(f"needs the git history (commit {PRE_CLASSES}): {shown.stderr.strip()}")
    (old / "vmpool.py").write_text(shown.stdout)

    def old_vmpool(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(old)}
        command = [sys.executable, "-m", "vmpool", "--config", pool.config_path, *args]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=old)
        assert result.returncode == 0, result.stderr
        return result

    pool.write_config(pool={"min": 1})
    wait_until(
        lambda: old_vmpool("reconcile") and json.loads(old_vmpool("status", "--json").stdout)["counts"]["free"],
        90,
        "a Free VM made by the old vmpool",
    )
    written = json.loads(Path(pool.state_file).read_text())
    assert "flavors" not in written and all("vm_class" not in vm for vm in written["vms"])
    address = pool.run("acquire", "21", "--user", "alice", "--timeout", "5").stdout.strip()
    assert pool.vms("busy")[0]["class"] == "default" and pool.vms("busy")[0]["address"] == address
    pool.run("release", "21")
    after = json.loads(old_vmpool("status", "--json").stdout)
    assert after["counts"]["free"] == 1 and after["vms"][0]["address"] == address


def test_verify_checks_each_class_s_own_flavor_and_image(pool: PoolHandle, flavors: dict[str, Any]) -> None:
    from tests.test_cli_e2e import verdicts

    use_classes(pool, small={"flavor": "cls-1c2g"}, big={"flavor": "no-such-flavor", "image": "no-such-image"})
    found = verdicts(pool.run("verify", check=False).stdout)
    assert found["[class small] flavor"] == "ok" and found["[openstack] image"] == "ok"
    assert found["[class big] flavor"].startswith("FAILED: the cloud has no flavor with ID 'no-such-flavor'")
    assert found["[class big] image"].startswith("FAILED: the cloud has no image with ID 'no-such-image'")
    use_classes(pool, **SIZES)
    assert set(verdicts(pool.run("verify").stdout).values()) == {"ok"}


# --- Torque: the prologue passes the job's resources, as pbs_mom gives them, to acquire ---


@pytest.mark.xdist_group("torque-node")
def test_torque_jobs_of_ppn_1_4_and_8_at_once_each_run_on_a_vm_of_their_class(
    mom: Mom, flavors: dict[str, Any]
) -> None:
    use_classes(mom.pool, **SIZES)
    mom.pool.write_config(pool={"max": 4})
    jobs = [
        Job(f"30{n}.vmpool-test.example", "vmpt-alice", "#!/bin/bash\nnproc\n", ppn=ppn, mem=mem)
        for n, (ppn, mem) in enumerate(((1, ""), (4, "6gb"), (8, "")))
    ]
    for job in jobs:
        mom.pbs.receive(job)
    with ThreadPoolExecutor(len(jobs)) as threads:
        runs = list(threads.map(mom.pbs.prologue, jobs))
    assert [run.outcome for run in runs] == ["run"] * 3, [mom.pbs.err(job) for job in jobs]
    placed = {job.ppn: mom.vm_of(job) for job in jobs}
    assert {ppn: vm["class"] for ppn, vm in placed.items()} == {1: "small", 4: "medium", 8: "big"}
    assert {ppn: flavor_of(mom.pool, vm["server_id"]) for ppn, vm in placed.items()} == {
        1: "cls-1c2g",
        4: "cls-4c8g",
        8: "cls-8c32g",
    }
    for job in jobs:
        assert mom.pbs.start(job).wait(60) == 0
        assert mom.pbs.end(job, exit_status=0).exit_code == 0
    assert len(mom.pool.vms("free")) == 3

    too_big = Job("309.vmpool-test.example", "vmpt-alice", "#!/bin/bash\ntrue\n", ppn=16, mem="64gb")
    mom.pbs.receive(too_big)
    refused = mom.pbs.prologue(too_big)
    assert refused.outcome == "abort", mom.pbs.err(too_big)  # exit 1: the job is never run
    assert "job 309.vmpool-test.example asks for 16 cores, 64G memory: more than any class of the pool offers" in (
        mom.told(too_big)
    )
    assert "(the largest, gpu, has 8 cores, 32G memory, 1 GPU(s)) (job aborted)" in mom.told(too_big)
    assert len(mom.pool.vms()) == 3  # nothing booted for it


# --- Torque: a job no class fits is refused at qsub by the submit filter ---

POOL_CLASSES = "CLASSES=small:1:2048:0+medium:4:8192:0+big:8:32768:0+gpu:8:32768:1"


@pytest.mark.parametrize(
    ("resources", "told"),
    [
        ("nodes=1:ppn=16", "this job asks for 16 cores: more than any class"),
        ("nodes=1:ppn=8,mem=64gb", "this job asks for 8 cores, 64G memory: more than any class"),
        ("nodes=1:ppn=2:gpus=2", "this job asks for 2 cores, 2 GPU(s): more than any class"),
        ("ncpus=4,pmem=10gb", "this job asks for 4 cores, 40G memory: more than any class"),
    ],
)
def test_the_submit_filter_refuses_a_job_no_class_fits_naming_the_largest(
    resources: str, told: str, tmp_path: Path
) -> None:
    dest, done = install_filter(tmp_path, POOL_CLASSES)
    assert done.returncode == 0, done.stderr
    outcome = run_batch(["-q", "vmpool", "-l", resources, "job.sh"], SCRIPT, tmp_path, dest)
    assert_refused(outcome, told, "the largest, gpu, has 8 cores, 32G memory, 1 GPU(s)")


@pytest.mark.parametrize("resources", ["nodes=1:ppn=8,mem=32gb", "nodes=1:ppn=1:gpus=1", "mem=2048mb", "walltime=1:00"])
def test_the_submit_filter_passes_a_job_some_class_fits(resources: str, tmp_path: Path) -> None:
    dest, _ = install_filter(tmp_path, POOL_CLASSES)
    assert_passed(run_batch(["-q", "vmpool", "-l", resources, "job.sh"], SCRIPT, tmp_path, dest), SCRIPT)
    assert_passed(run_batch(["-q", "other", "-l", "nodes=1:ppn=64", "job.sh"], SCRIPT, tmp_path, dest), SCRIPT)


def test_the_submit_filter_refuses_classes_it_cannot_read(tmp_path: Path) -> None:
    _, done = install_filter(tmp_path, "CLASSES=small:1:2048")
    assert done.returncode != 0
    assert "CLASSES entry 'small:1:2048' is not NAME:CORES:MEMORY_MIB:GPUS" in done.stderr


@pytest.mark.xdist_group("torque-node")
@pytest.mark.parametrize(
    ("resources", "told"),
    [
        ("nodes=1:ppn=$(touch /tmp/vmpt-pwned)", " is not a whole number of cores or GPUs"),
        ("nodes=1:ppn=4,mem=6gb;touch /tmp/vmpt-pwned", " is not a size"),
    ],
)
def test_resources_the_prologue_cannot_read_abort_the_job_before_acquire(mom: Mom, resources: str, told: str) -> None:
    from tests.test_hooks import PWNED, traced_vmpool

    Path(PWNED).unlink(missing_ok=True)
    trace = traced_vmpool(mom)
    job = Job("311.server", "vmpt-alice", f"#!/bin/bash\ntouch {PWNED}\n")
    mom.pbs.receive(job)
    argv = mom.pbs.prologue_argv(job)
    argv[4] = resources
    assert mom.pbs.prologue(job, argv=argv).outcome == "abort"
    assert "cannot read the job's resources: " in mom.told(job) and f"{told} (job aborted)" in mom.told(job)
    assert "acquire" not in (trace.read_text() if trace.exists() else "")
    assert not os.path.exists(PWNED) and mom.pool.servers() == []


def test_a_pass_that_decides_the_waiting_jobs_classes_reads_the_quota_before_creating(tmp_path: Path) -> None:
    """The first pass learns the flavors and decides the queued jobs' classes in its decision: it must
    have read the project's limits for the creates that decision makes."""
    from tests.test_pool import FakeCloud, FakeRemote

    class QuotaCloud(FakeCloud):
        def flavor_size(self, flavor: str) -> dict[str, int]:
            return {"vcpus": 4, "ram": 8192, "gpus": 0}

        def absolute_limits(self) -> dict[str, int]:
            self.calls.append("limits")
            return {"maxTotalCores": 9, "totalCoresUsed": 0}

    config = vp.Config(
        path="test.conf",
        pool=vp.PoolConfig(
            name="p", max=3, state_file=str(tmp_path / "state.json"), classes=(vp.ClassConfig("medium", "f4"),)
        ),
        openstack=vp.OpenStackConfig(auth_url="http://127.0.0.1:9", image="i", network="n"),
        ssh=vp.SshConfig(private_key=str(tmp_path / "key"), known_hosts=str(tmp_path / "known_hosts")),
    )
    cloud = QuotaCloud()
    pool = vp.Pool(config, cloud=cloud, remote=FakeRemote())
    pid = os.getpid()
    waiter = frozenset({(pid, vp.process_start(pid))})

    def queue(state: vp.PoolState, job: str) -> tuple[vp.PoolState, Any]:
        return vp.plan_acquire(
            state,
            job,
            "alice",
            time.time(),
            pid,
            pool.host,
            waiter,
            pid_start=vp.process_start(pid),
            want=vp.Want(4, 0, 0),
            pool=pool.config.pool,
        )

    for job in ("1", "2", "3"):  # queued before any pass knew the flavor: their class is not decided yet
        pool._update(functools.partial(queue, job=job))
    assert [r.vm_class for r in pool.store.read().requests] == ["", "", ""]
    pool.reconcile()
    assert cloud.calls.count("create") == 2 and "limits" in cloud.calls
    assert [r.vm_class for r in pool.store.read().requests] == ["medium"] * 3


def test_failed_boots_protect_their_own_class_and_the_others_keep_booting(
    pool: PoolHandle, flavors: dict[str, Any]
) -> None:
    """Boots of the big flavor end in ERROR (its hosts are broken): that class goes into protected
    mode, `check` names it, a big job's acquire says why it got nothing; the small class boots."""
    use_classes(
        pool,
        small={"flavor": "cls-1c2g"},
        big={"flavor": "cls-8c32g", "min_free": 2},
    )
    pool.write_config(pool={"max": 6, "protect_after_failures": 2})
    pool.bed.set_behaviour(f"^{pool.prefix}", error=True, flavor="cls-8c32g")

    def big_class() -> dict[str, Any]:
        return next(entry for entry in pool.status()["classes"] if entry["name"] == "big")

    pool.reconcile_until(lambda: big_class()["protected_since"], 180, "the big class in protected mode")
    big = big_class()
    assert big["boot_failures"] >= 2 and big["backoff_until"]
    assert next(entry for entry in pool.status()["classes"] if entry["name"] == "small")["protected_since"] is None
    pool.run("acquire", "1", "--user", "alice", "--timeout", "120")  # a small VM boots for it meanwhile
    assert [(vm["class"], vm["job"]) for vm in pool.vms("busy")] == [("small", "1")]
    assert "PROTECTED MODE of class big since" in pool.run("status").stdout
    check = pool.run("check", "--wait-warning", "1", check=False)
    assert check.returncode == 2 and "protected mode of class big: boots keep failing" in check.stdout, check.stdout
    perfdata = check.stdout.partition(" | ")[2]
    assert "protected_big=1" in perfdata and "protected_small=0" in perfdata and "oldest_wait_big=0s" in perfdata

    big_job = pool.run("acquire", "2", "--user", "alice", "--cores", "8", "--timeout", "3", check=False)
    assert big_job.returncode != 0
    assert "job 2: no VM within 3s: " in big_job.stderr and "protected mode of class big since" in big_job.stderr

    # the hosts mended: a canary boots, the class leaves protected mode
    pool.bed.clear_behaviours()
    pool.run("reconcile", "--clear-protection")
    pool.reconcile_until(lambda: big_class()["counts"]["free"] >= 1, 120, "a big VM booted")
    assert big_class()["protected_since"] is None and pool.status()["protected_since"] is None
    pool.run("release", "1")


def check_figures(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """`vmpool check`'s perfdata as numbers (units dropped)."""
    pairs = (item.split(";")[0].split("=", 1) for item in result.stdout.partition(" | ")[2].split())
    return {label: int(value.rstrip("s")) for label, value in pairs}


def test_a_class_s_own_wait_thresholds_judge_its_waiting_jobs_in_check(
    pool: PoolHandle, flavors: dict[str, Any]
) -> None:
    use_classes(pool, small={"flavor": "cls-1c2g"}, gpu={"flavor": "cls-gpu", "check_wait_warning": "3600"})
    pool.settings.setdefault("check", {})
    pool.write_config(pool={"max": 2}, check={"wait_warning": "1", "wait_critical": ""})
    pool.run("reconcile")  # the flavors' sizes learned
    pool.run("pause", "--reason", "to keep the jobs waiting")
    gpu = pool.spawn("acquire", "7", "--user", "alice", "--gpus", "1", "--timeout", "120")
    wait_until(lambda: pool.status()["waiting"], 30, "the gpu job to wait")
    calm = wait_until(
        lambda: (
            (r := pool.run("check", "--paused", "ok", check=False)) and check_figures(r)["oldest_wait_gpu"] >= 2 and r
        ),
        60,
        "the gpu job to wait 2s",
    )
    assert calm.returncode == 0, calm.stdout  # seconds for a gpu VM: within its class's 3600s
    assert check_figures(calm)["waiting_gpu"] == 1 and check_figures(calm)["oldest_wait"] >= 2
    small = pool.spawn("acquire", "8", "--user", "alice", "--timeout", "120")
    loud = wait_until(
        lambda: (r := pool.run("check", "--paused", "ok", check=False)).returncode == 1 and r,
        60,
        "the small job's wait to pass [check] wait_warning",
    )
    status_line = loud.stdout.partition(" | ")[0]
    assert "a job has waited" in status_line and "for a VM of class small (threshold 0:1)" in status_line, loud.stdout
    assert "class gpu" not in status_line
    for waiter in (gpu, small):
        waiter.kill()
        waiter.communicate()


def test_a_class_whose_image_the_cloud_refuses_backs_off_alone(pool: PoolHandle, flavors: dict[str, Any]) -> None:
    """Nova answers 400 for the big class's image: that class backs off and its job is told; a job
    of the small class gets its VM all the same, from the same passes."""
    use_classes(pool, small={"flavor": "cls-1c2g"}, big={"flavor": "cls-8c32g", "image": "no-such-image"})
    pool.write_config(pool={"max": 4})
    pool.run("reconcile")  # the flavors' sizes learned
    big = pool.spawn("acquire", "1", "--user", "alice", "--cores", "8", "--timeout", "20")
    wait_until(lambda: pool.status()["waiting"], 30, "the big job to wait")
    small = pool.run("acquire", "2", "--user", "alice", "--timeout", "90")
    assert small.stdout.strip() and [vm["class"] for vm in pool.vms("busy")] == ["small"]
    _, err = big.communicate(timeout=60)
    assert big.returncode != 0
    assert "image" in err.lower() or "cloud refused creates of class big" in err, err
    classes = {entry["name"]: entry for entry in pool.status()["classes"]}
    assert classes["big"]["backoff_until"] and classes["small"]["backoff_until"] is None
    log = Path(pool.settings["pool"]["log_file"]).read_text()
    assert "check [class big] and [openstack] image, flavor" in log and "backing off of class big" in log
    pool.run("release", "2")


# --- the batch node's size ---


def test_capacity_asks_nova_for_sizes_not_learned_yet_and_without_a_cloud_says_how_to_get_them(
    pool: PoolHandle, flavors: dict[str, Any]
) -> None:
    import socket

    use_classes(pool, small={"flavor": "cls-1c2g"}, medium={"flavor": "cls-4c8g", "max": 1})
    served = pool.settings["openstack"]["auth_url"]

    before_any_pass = pool.run("capacity")  # no state file yet: the sizes come from Nova

    assert before_any_pass.stdout == "cores=6\nmemory=12288\ngpus=0\nvms=3\nclasses=small:1:2048:0+medium:4:8192:0\n"
    assert not Path(pool.state_file).exists(), "a read-out writes nothing"
    assert json.loads(pool.run("capacity", "--json").stdout) == {
        "schema": "vmpool-capacity",
        "version": 1,
        "pool": pool.name,
        "cores": 6,
        "memory": 12288,
        "gpus": 0,
        "vms": 3,
        "classes": "small:1:2048:0+medium:4:8192:0",
    }
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v3"
    pool.write_config(openstack={"auth_url": closed})
    unreachable = pool.run("capacity", check=False)
    assert unreachable.returncode == 5 and unreachable.stdout == "", unreachable
    assert "the size of flavor cls-1c2g is not known yet and Nova cannot tell it" in unreachable.stderr
    assert "run `vmpool capacity` where the cloud is reachable" in unreachable.stderr.strip().splitlines()[-1]

    pool.write_config(openstack={"auth_url": served})
    pool.run("reconcile")  # a pass learns the sizes into the state: no cloud needed afterwards
    pool.write_config(openstack={"auth_url": closed})
    assert pool.run("capacity").stdout == before_any_pass.stdout
