"""vmpool's Torque hooks end to end: tests/pbs_mom.py plays pbs_mom, the real `vmpool` runs
against the local cloud (Keystone + Nova over HTTP), jobs run on its sshd VMs over OpenSSH.

Job owners are real non-root users of this machine, created if missing: vmpt-alice and
vmpt-bob (the job starter runs as them), and vmpt-carol, whose primary group vmpt-staff has a gid
other than her uid. The stand-in VMs are an overlay of this machine's
root, so they see those users' /etc/passwd lines until the prologue's useradd/usermod copies
/etc/passwd up; their /home, /tmp, /var/tmp, /dev/shm and process tables are their own.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT, VMPOOL, wait_until
from tests.pbs_mom import (
    JOB_EXEC_FAIL2,
    JOB_EXEC_RETRY_PROLOGUE,
    HookRun,
    Job,
    PbsMom,
    ensure_system_user,
    ensure_user_with_group,
)
from tests.torque_node import BACKOFF, CAROL, Mom, messages, user_traces

# The node's job owners, home directories and job ids are this machine's: one worker runs these tests
# (and test_job_end's, which use the same node), one after another, as one pbs_mom runs its jobs.
pytestmark = pytest.mark.xdist_group("torque-node")

# --- a job's life ---


def test_a_job_runs_on_a_vm_as_its_owner_and_leaves_no_trace(mom: Mom) -> None:
    alice = pwd.getpwnam("vmpt-alice")
    workdir = f"{mom.submit_dir(alice)}/project one"  # where she ran qsub: it exists on the node
    subprocess.run(["mkdir", workdir], check=True, user=alice.pw_uid, group=alice.pw_gid, extra_groups=[])
    job = Job(
        "101.vmpool-test.example",
        "vmpt-alice",
        name="hooks",
        workdir=workdir,
        args='first "second arg"',
        variables={"MY_SETTING": "it's $HOME; `x`"},
        script="""#!/bin/bash
#PBS -N hooks
echo "whoami=$(whoami)"
echo "host=$(hostname)"
echo "jobid=$PBS_JOBID"
echo "workdir=$PBS_O_WORKDIR pwd=$(pwd)"
echo "args=$#:$1|$2"
echo "setting=$MY_SETTING"
echo "nodefile=$(cat "$PBS_NODEFILE")"
echo "to stderr" >&2
echo secret > /tmp/alice-tmp; echo secret > /var/tmp/alice-vartmp; echo secret > /dev/shm/alice-shm
# a process escaping the job's session; wait until it has (pbs_mom-like, the job's session is
# killed when the job ends, and a child still on its way out of it would go with it)
setsid sh -c 'touch /tmp/alice-escaped; exec sleep 1000' </dev/null >/dev/null 2>&1 &
for i in $(seq 100); do [ -e /tmp/alice-escaped ] && break; sleep 0.05; done
exit 3
""",
    )
    mom.pbs.receive(job)
    first = mom.pbs.prologue(job)
    assert first.outcome == "run", messages(mom, job)
    vm = mom.vm_of(job)
    assert (vm["state"], vm["user"]) == ("busy", "vmpt-alice")
    again = mom.pbs.prologue(job)  # a requeued job runs its prologue again: same VM, still fine
    assert again.outcome == "run", messages(mom, job)
    assert mom.vm_of(job)["name"] == vm["name"]

    status = mom.pbs.start(job).wait(60)

    out = mom.pbs.out(job)
    assert status == 3, (out, mom.pbs.err(job))
    assert "whoami=vmpt-alice\n" in out
    vm_host = mom.on_vm(vm, "hostname")[1].strip()
    assert f"host={vm_host}\n" in out and vm_host != os.uname().nodename
    assert f"jobid={job.job_id}\n" in out
    assert f"workdir={workdir} pwd={workdir}\n" in out
    assert "args=2:first|second arg\n" in out
    assert "setting=it's $HOME; `x`\n" in out
    assert f"nodefile={vm_host}\n" in out
    assert mom.pbs.err(job) == "to stderr\n"
    assert sorted(user_traces(mom, vm, "vmpt-alice")) == ["account", "files", "home", "processes"]

    epilogue = mom.pbs.end(job, exit_status=status)

    assert epilogue.exit_code == 0, messages(mom, job)
    # TORQUE copies the spool files, as Alice, to her workdir and removes them
    delivered = {path: path.stat() for path in (mom.pbs.delivered_out_path(job), mom.pbs.delivered_err_path(job))}
    assert sorted(path.name for path in delivered) == ["hooks.e101", "hooks.o101"]  # qsub took #PBS -N hooks
    assert all(info.st_uid == alice.pw_uid for info in delivered.values())
    assert (mom.pbs.delivered_out(job), mom.pbs.delivered_err(job)) == (out, "to stderr\n")
    assert not mom.pbs.out_path(job).exists() and not mom.pbs.err_path(job).exists()
    assert user_traces(mom, vm, "vmpt-alice") == []
    assert mom.on_vm(vm, "test", "-e", workdir)[0] != 0
    assert [v["state"] for v in mom.pool.vms() if v["name"] == vm["name"]] == ["free"]
    assert not (mom.job_dir / job.job_id).exists()
    assert mom.pbs.epilogue(job, exit_status=status).exit_code == 0, "the epilogue must be idempotent"


def test_output_streams_and_a_signalled_job_is_killed_on_its_vm(mom: Mom) -> None:
    job = Job("102", "vmpt-bob", script="echo started; echo oops >&2; exec sleep 1000\n")
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    vm = mom.vm_of(job)
    uid = str(pwd.getpwnam("vmpt-bob").pw_uid)
    running = mom.pbs.start(job)

    # (two SSH streams, two files: the .ER line may land a moment after the .OU line)
    wait_until(
        lambda: mom.pbs.out(job) == "started\n" and "oops\n" in mom.pbs.err(job),
        30,
        "the job's first lines in .OU and .ER while it runs",
    )
    wait_until(lambda: mom.on_vm(vm, "pgrep", "-U", uid, "-x", "sleep")[0] == 0, 10, "the job's sleep on the VM")
    assert running.process.poll() is None

    # qdel: SIGTERM to the session, SIGKILL after kill_delay (longer than KILL_GRACE, as the
    # README asks: the starter then ends before pbs_mom's SIGKILL, on a busy machine too)
    running.signal(signal.SIGTERM, kill_delay=60)

    # The job's shell died of SIGTERM on the VM; the starter dies of it too: 256 + 15 as on a
    # plain node, not a normal exit 143.
    assert running.wait(60) == 256 + signal.SIGTERM, messages(mom, job)
    wait_until(lambda: mom.on_vm(vm, "pgrep", "-U", uid)[0] != 0, 10, "no process of the job owner on the VM")
    marker = f"/home/vmpt-bob/.vmpool-jobs/{job.job_id}.cancelled"
    assert mom.on_vm(vm, "test", "-e", marker)[0] != 0, "the cancelled mark outlived the job's run"
    assert mom.pbs.end(job, exit_status=256 + signal.SIGTERM).exit_code == 0, messages(mom, job)
    assert mom.pbs.delivered_out(job) == "started\n"
    assert "oops\n" in mom.pbs.delivered_err(job) and "got SIGTERM" in mom.pbs.delivered_err(job)
    assert [v["state"] for v in mom.pool.vms() if v["name"] == vm["name"]] == ["free"]


def test_a_failed_scrub_leaves_the_vm_unusable(mom: Mom) -> None:
    job = Job("103", "vmpt-alice", script="true\n")
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    vm = mom.vm_of(job)
    assert mom.pbs.start(job).wait(60) == 0
    mom.pool.bed.vm_fault(vm["server_id"], "refuse")

    epilogue = mom.pbs.end(job, exit_status=0)

    assert epilogue.exit_code == 2
    assert "scrub of VM" in mom.pbs.delivered_err(job) and "will serve no other job" in mom.pbs.delivered_err(job)
    after = next(v for v in mom.pool.vms() if v["name"] == vm["name"])
    assert after["state"] == "unusable" and "scrub failed" in (after["reason"] or ""), after
    assert after["job"] is None or after["job"] != job.job_id or after["state"] != "busy"
    assert not (mom.job_dir / job.job_id).exists()


def test_no_vm_in_time_requeues_after_the_backoff(mom: Mom) -> None:
    mom.pool.bed.set_behaviour(f"^{mom.pool.prefix}", error=True)  # every boot fails
    Mom.__init__(mom, mom.root, mom.pool, ACQUIRE_TIMEOUT=3)
    job = Job("104", "vmpt-alice", script="echo ran\n")
    reason = "no VM became free within 3s; the job is requeued in 2s"

    for attempt in (1, 2):  # TORQUE requeues the job; the next attempt fails the same way
        mom.pbs.receive(job)
        prologue = mom.pbs.prologue(job)

        assert prologue.outcome == "requeue" and prologue.exit_code == 2, messages(mom, job)
        assert prologue.job_exit_status == JOB_EXEC_RETRY_PROLOGUE
        assert prologue.seconds >= 3 + BACKOFF
        assert not (mom.job_dir / job.job_id).exists()
        assert not [vm for vm in mom.pool.vms() if vm["job"] == job.job_id]
        assert mom.pool.status().get("waiting", []) == []
        assert mom.pbs.end(job, prologue.job_exit_status).exit_code == 0, messages(mom, job)
        # TORQUE delivers a requeued attempt's .o/.e; the reason is in the .e, and in the log
        assert reason in mom.pbs.delivered_err(job) and mom.pbs.delivered_out(job) == ""
        assert mom.told(job).count(reason) == attempt

    mom.pool.bed.clear_behaviours()  # the cloud boots VMs again
    Mom.__init__(mom, mom.root, mom.pool)
    prologue, status, epilogue = mom.pbs.run(job)

    assert (prologue.exit_code, status, epilogue.exit_code) == (0, 0, 0), messages(mom, job)
    # the rerun's files replace the requeued attempts'; only the log keeps why they did not run
    assert (mom.pbs.delivered_out(job), mom.pbs.delivered_err(job)) == ("ran\n", "")
    told = mom.told(job).splitlines()
    assert len(told) == 2 and all(line.endswith(f"vmpool prologue {job.job_id}: {reason}") for line in told), told


# --- bad input, permissions ---

PWNED = "/tmp/vmpt-pwned"


def traced_vmpool(mom: Mom) -> Path:
    """Reinstall the hooks with VMPOOL a wrapper that logs its calls; the log's path."""
    trace = mom.root / "vmpool-calls"
    tracer = mom.root / "vmpool-tracer"
    tracer.write_text(f'#!/bin/sh\necho "$*" >> {trace}\nexec {VMPOOL} "$@"\n')
    tracer.chmod(0o755)
    Mom.__init__(mom, mom.root, mom.pool, vmpool=str(tracer))
    trace.unlink(missing_ok=True)  # the installer's own call (`vmpool capacity`, the node's size): not the hooks'
    return trace


@pytest.mark.parametrize(
    "position, value",
    [
        (0, f"1;touch {PWNED}"),
        (0, "../../etc/passwd"),
        (0, f"$(touch {PWNED})"),
        (0, "123.server/../../x"),
        (0, "123 456"),
        (0, ""),
        (0, "123\nserver"),
        (0, "-rf"),
        (1, f"vmpt-alice;touch {PWNED}"),
        (1, "../root"),
        (1, "-rf"),
        (1, "$(id)"),
        (1, "root"),
        (1, "nosuchuser"),
        (2, "users`id`"),
        (7, "/var/spool/torque/../../etc/shadow"),
        ("workdir", "/home/vmpt-alice/../../etc"),
        ("workdir", "relative/dir"),
    ],
)
def test_bad_input_aborts_the_job_and_runs_nothing(mom: Mom, position: int | str, value: str) -> None:
    Path(PWNED).unlink(missing_ok=True)  # a failed earlier run's, not this one's
    trace = traced_vmpool(mom)
    job = Job("105.server", "vmpt-alice", script=f"touch {PWNED}\n")
    if position == "workdir":
        job.workdir = value
    mom.pbs.receive(job)
    argv = [job.job_id, job.user, "vmpt-alice", job.name, job.resources, job.queue, "", str(mom.pbs.script_path(job))]
    if isinstance(position, int):
        argv[position] = value

    prologue = mom.pbs.prologue(job, argv=argv)
    epilogue_argv = [*argv[:4], "0", job.resources, "walltime=0", job.queue, "", str(JOB_EXEC_FAIL2), argv[7]]
    epilogue = mom.pbs.end(job, JOB_EXEC_FAIL2, argv=epilogue_argv)

    assert prologue.outcome == "abort", messages(mom, job)
    # TORQUE delivers nothing; the reason stays in the mom's spool .ER (and syslog), for the
    # admin: the prologue writes nothing as a user it could not verify
    assert mom.pbs.delivered_nothing(job) and mom.told(job) == ""
    assert "(job aborted)" in mom.pbs.err(job)
    calls = trace.read_text() if trace.exists() else ""
    assert "acquire" not in calls
    if epilogue.exit_code == 1:  # argv the epilogue can check: it refuses it too
        assert "nothing done" in mom.pbs.err(job) and calls == ""
    else:  # a well-formed but unusable job: the epilogue only makes sure no VM stays held
        assert (
            epilogue.exit_code == 0
            and calls.split()
            == ["--config", mom.pool.config_path, "release", argv[0], "--unusable"] + calls.split()[5:]
        )
    assert not os.path.exists(PWNED)
    # nothing but the epilogue's "job ended" mark (when it got as far as writing it)
    assert [path.name for path in mom.job_dir.iterdir()] in ([], [f".ended.{argv[0]}"])
    assert mom.pool.vms() == [] and mom.pool.servers() == []


HOOKS_CONF = Path("mom_priv") / "vmpool" / "vmpool-hooks.conf"


@pytest.mark.parametrize(
    "breakage, problem",
    [
        (lambda mom: (mom.pbs_home / HOOKS_CONF).chmod(0o664), "vmpool-hooks.conf is mode 664: writable by group"),
        (
            lambda mom: os.chown(mom.pbs_home / HOOKS_CONF, pwd.getpwnam("vmpt-alice").pw_uid, -1),
            "vmpool-hooks.conf is owned by uid",
        ),
        (lambda mom: (mom.pbs_home / HOOKS_CONF).parent.chmod(0o775), "mom_priv/vmpool is mode 775: writable by group"),
        (lambda mom: (mom.pbs_home / HOOKS_CONF).with_name("vm-prepare.sh").chmod(0o666), "vm-prepare.sh is mode 666"),
        (lambda mom: (mom.root / "vmpool-tracer").chmod(0o775), "vmpool-tracer is mode 775: writable by group"),
        (
            lambda mom: os.chown(mom.root / "vmpool-tracer", pwd.getpwnam("vmpt-bob").pw_uid, -1),
            "vmpool-tracer is owned by uid",
        ),
    ],
)
def test_hooks_refuse_a_config_or_vmpool_that_is_not_root_s_alone(mom: Mom, breakage, problem: str) -> None:
    trace = traced_vmpool(mom)
    breakage(mom)
    job = Job("107", "vmpt-alice", script=f"touch {PWNED}\n")

    prologue, status, epilogue = mom.pbs.run(job)

    # The prologue neither reads the file's settings nor runs what it names: the job is aborted
    # with the reason (for the admin: the mom's spool .ER and syslog); the epilogue refuses too.
    assert prologue.outcome == "abort" and status == JOB_EXEC_FAIL2, messages(mom, job)
    assert epilogue.exit_code == 2
    reason = next(line for line in mom.pbs.err(job).splitlines() if line.startswith("vmpool prologue:"))
    assert "the hooks' configuration is unusable: refusing" in reason and problem in reason, reason
    assert "(job aborted)" in reason
    assert not trace.exists(), trace.read_text()
    assert mom.pool.vms() == [] and not os.path.exists(PWNED)


def test_a_system_account_s_job_is_refused_and_told_why_only_where_that_is_safe(mom: Mom) -> None:
    system = ensure_system_user("vmpt-daemon")  # uid below MIN_UID=1000
    own, shared, root_s = mom.root / "daemon-own", mom.root / "shared", mom.root / "root-own"
    own.mkdir(mode=0o755)
    os.chown(own, system.pw_uid, system.pw_gid)
    shared.mkdir(mode=0o1777)  # /tmp-like: root's, anyone may add entries
    shared.chmod(0o1777)
    root_s.mkdir(mode=0o755)
    trace = traced_vmpool(mom)
    jobs = {"108": (system.pw_name, own), "109": (system.pw_name, shared), "110": ("root", root_s)}
    home_log = Path(system.pw_dir) / "vmpool-109.log"
    home_log.unlink(missing_ok=True)  # an earlier run's
    try:
        for job_id, (user, workdir) in jobs.items():
            job = Job(job_id, user, script=f"touch {PWNED}\n", workdir=str(workdir))
            prologue, status, _ = mom.pbs.run(job)
            assert prologue.outcome == "abort" and status == JOB_EXEC_FAIL2, messages(mom, job)
            assert mom.pbs.delivered_nothing(job)  # TORQUE delivers no .o/.e of such a job
            assert "below MIN_UID=1000: the pool runs no jobs of system accounts (job aborted)" in mom.pbs.err(job)

        # in its own workdir, as itself: where a refused job's reason goes for other refusals
        told = own / "vmpool-108.log"
        assert told.stat().st_uid == system.pw_uid
        assert f"user vmpt-daemon has uid {system.pw_uid}, below MIN_UID=1000" in told.read_text()
        # never into a directory others control: its home (its own) instead
        assert not (shared / "vmpool-109.log").exists()
        assert home_log.stat().st_uid == system.pw_uid and "below MIN_UID" in home_log.read_text()
        # never as root
        assert list(root_s.iterdir()) == [] and not Path("/root/vmpool-110.log").exists()
        assert "acquire" not in (trace.read_text() if trace.exists() else "")
        assert mom.pool.vms() == [] and not os.path.exists(PWNED)
    finally:
        home_log.unlink(missing_ok=True)


def test_the_job_starter_fails_loudly_without_a_vm(mom: Mom) -> None:
    job = Job("106", "vmpt-alice", script=f"touch {PWNED}\n")
    mom.pbs.receive(job)

    status = mom.pbs.start(job).wait(30)
    mom.pbs.end(job, status)

    assert status == 255
    assert "this job has no VM" in mom.pbs.delivered_err(job)
    assert not os.path.exists(PWNED)


def break_prologue_mode(mom: Mom) -> None:
    (mom.pbs_home / "mom_priv" / "prologue").chmod(0o775)


def break_epilogue_owner(mom: Mom) -> None:
    os.chown(mom.pbs_home / "mom_priv" / "epilogue", pwd.getpwnam("vmpt-alice").pw_uid, -1)


def break_prologue_exec(mom: Mom) -> None:
    (mom.pbs_home / "mom_priv" / "prologue").chmod(0o600)


def break_prologue_symlink(mom: Mom) -> None:
    prologue = mom.pbs_home / "mom_priv" / "prologue"
    prologue.rename(mom.root / "prologue")
    prologue.symlink_to(mom.root / "prologue")


def break_starter_exec(mom: Mom) -> None:
    (mom.pbs_home / "mom_priv" / "vmpool" / "jobstarter").chmod(0o644)


def break_library_writable(mom: Mom) -> None:
    (mom.pbs_home / "mom_priv" / "vmpool" / "vmpool-hooks.sh").chmod(0o666)


def break_mom_priv_owner(mom: Mom) -> None:
    os.chown(mom.pbs_home / "mom_priv", pwd.getpwnam("vmpt-bob").pw_uid, -1)


def break_vmpool_path(mom: Mom) -> None:
    conf = mom.pbs_home / "mom_priv" / "vmpool" / "vmpool-hooks.conf"
    conf.write_text(conf.read_text().replace(f"VMPOOL={VMPOOL}", "VMPOOL=/nonexistent/vmpool"))


def test_install_prints_the_mom_config_lines_that_match_what_it_installed(mom: Mom) -> None:
    lines = mom.install.stdout.splitlines()
    starter = mom.pbs_home / "mom_priv" / "vmpool" / "jobstarter"
    assert f"$job_starter {starter}" in lines, mom.install.stdout
    alarm = next(int(line.split()[1]) for line in lines if line.startswith("$prologalarm "))
    conf = dict(
        line.split("=", 1)
        for line in (mom.pbs_home / "mom_priv" / "vmpool" / "vmpool-hooks.conf").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert (conf["ACQUIRE_TIMEOUT"], conf["REQUEUE_BACKOFF"]) == ("60", "2")  # HOOKS_SETTINGS reached it
    worst = sum(int(conf[key]) for key in ("ACQUIRE_TIMEOUT", "PREPARE_TIMEOUT", "RELEASE_TIMEOUT", "REQUEUE_BACKOFF"))
    assert alarm > worst, "the alarm must not kill a prologue that is still within its own timeouts"
    assert starter.stat().st_mode & 0o111 and (mom.pbs_home / "mom_priv" / "prologue").stat().st_uid == 0


@pytest.mark.parametrize(
    "breakage, message, mom_refuses",
    [
        (break_prologue_mode, "prologue is mode 775: group/world-writable", True),
        (break_epilogue_owner, "epilogue is owned by uid", True),
        (break_prologue_exec, "not executable by its owner", True),
        (break_prologue_symlink, "must be a regular file", True),
        (break_starter_exec, "jobstarter is mode 644: job owners cannot use it", False),
        (break_library_writable, "vmpool-hooks.sh is mode 666", False),
        (break_mom_priv_owner, "mom_priv is owned by uid", False),
        (break_vmpool_path, "VMPOOL=/nonexistent/vmpool", False),
    ],
)
def test_wrong_permissions_are_caught_by_the_check(mom: Mom, breakage, message: str, mom_refuses: bool) -> None:
    check = ["make", "-s", "-C", str(ROOT), "check-hooks", f"PBS_HOME={mom.pbs_home}"]
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    breakage(mom)

    result = subprocess.run(check, capture_output=True, text=True)

    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Torque would requeue the jobs" in result.stderr
    if mom_refuses:  # what Torque would do instead: requeue the job, again and again
        assert PbsMom.permission_problem(mom.pbs_home / "mom_priv" / "prologue") or PbsMom.permission_problem(
            mom.pbs_home / "mom_priv" / "epilogue"
        )


# --- isolation, requeue safety ---


def test_two_jobs_of_different_users_run_at_once_and_cannot_see_each_other(mom: Mom) -> None:
    script = """echo "$(whoami) secret" > "$HOME/secret"; echo x > "/tmp/$(whoami)-tmp"
sleep 4
echo "homes=$(ls /home | tr '\\n' ' ')"
echo "users=$(ps -eo user= | sort -u | tr '\\n' ' ')"
echo "tmp=$(ls /tmp | tr '\\n' ' ')"
for other in vmpt-alice vmpt-bob; do cat "/home/$other/secret" 2>/dev/null; done; true
"""
    jobs = [Job("201", "vmpt-alice", script=script), Job("202", "vmpt-bob", script=script)]
    prologues: dict[str, HookRun] = {}
    for job in jobs:
        mom.pbs.receive(job)
    threads = [
        threading.Thread(target=lambda job=job: prologues.update({job.user: mom.pbs.prologue(job)})) for job in jobs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(p.outcome == "run" for p in prologues.values()), [messages(mom, job) for job in jobs]
    vms = {job.user: mom.vm_of(job) for job in jobs}
    assert vms["vmpt-alice"]["name"] != vms["vmpt-bob"]["name"]

    running = [mom.pbs.start(jobs[0]), mom.pbs.start(jobs[1], exec_with_exec=True)]
    statuses = [job.wait(60) for job in running]

    assert statuses == [0, 0], [messages(mom, job) for job in jobs]
    outs = {job.job_id: mom.pbs.out(job) for job in jobs}
    for job, other in ((jobs[0], "vmpt-bob"), (jobs[1], "vmpt-alice")):
        out = outs[job.job_id]
        assert f"homes={job.user} \n" in out, out
        assert other not in out.split("users=")[1].split("\n")[0], out
        assert f"tmp={job.user}-tmp \n" in out, out
        assert f"{job.user} secret\n" in out and f"{other} secret" not in out
    # Alice's key opens neither Bob's VM nor Bob's account; Bob's key is not hers to read.
    alice = pwd.getpwnam("vmpt-alice")
    for user in ("vmpt-bob", "vmpt-alice"):
        result = subprocess.run(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-i",
                str(mom.job_dir / "201" / "id_ed25519"),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=5",
                "-l",
                user,
                vms["vmpt-bob"]["address"],
                "true",
            ],
            capture_output=True,
            text=True,
            user=alice.pw_uid,
            group=alice.pw_gid,
            extra_groups=[],
            timeout=30,
        )
        assert result.returncode == 255 and "Permission denied" in result.stderr, result.stderr
    stolen = subprocess.run(
        ["cat", str(mom.job_dir / "202" / "id_ed25519")],
        capture_output=True,
        user=alice.pw_uid,
        group=alice.pw_gid,
        extra_groups=[],
    )
    assert stolen.returncode != 0 and not stolen.stdout
    for job, status in zip(jobs, statuses, strict=True):
        assert mom.pbs.end(job, status).exit_code == 0, messages(mom, job)
        assert mom.pbs.delivered_out(job) == outs[job.job_id], "each owner gets what the job wrote"
        assert mom.pbs.delivered_out_path(job).stat().st_uid == job.owner.pw_uid
    assert sorted(vm["state"] for vm in mom.pool.vms()) == ["free", "free"]


def test_a_prologue_killed_by_the_alarm_while_waiting_is_requeued_and_holds_no_vm(mom: Mom) -> None:
    job = Job("301", "vmpt-alice", script="true\n")
    mom.pbs.receive(job)
    mom.pool.bed.set_behaviour(f"^{mom.pool.prefix}", spawn_delay=60)

    prologue = mom.pbs.prologue(job, alarm=6)  # time to ask for a VM; it is still booting when the alarm strikes

    assert prologue.exit_code is None and prologue.outcome == "requeue"
    # vmpool acquire runs in the prologue's process group: the alarm's SIGKILL ends it too
    wait_until(
        lambda: subprocess.run(["pgrep", "-f", f"acquire {job.job_id} "]).returncode != 0,
        10,
        "the killed prologue's acquire to be gone",
    )
    mom.pool.run("reconcile")  # cron: drops the dead acquire's request, drives the VM it asked for
    assert mom.pool.status()["waiting"] == []
    assert prologue.job_exit_status is not None
    epilogue = mom.pbs.end(job, prologue.job_exit_status)
    assert epilogue.exit_code == 0, messages(mom, job)
    assert not [vm for vm in mom.pool.vms() if vm["job"] == job.job_id]
    assert not (mom.job_dir / job.job_id).exists()
    assert mom.pool.servers(), "the VM booted for the job stays in the pool"


def test_a_prologue_killed_by_the_alarm_while_preparing_leaves_its_vm_unusable(mom: Mom) -> None:
    mom.pool.write_config(pool={"min": 1})
    mom.pool.reconcile_until(lambda: mom.pool.vms("free"), 90, "a Free VM")
    Mom.__init__(mom, mom.root, mom.pool, SSH_CONNECT_TIMEOUT=30, SCRUB_TIMEOUT=4)
    vm = mom.pool.vms("free")[0]
    mom.pool.bed.vm_fault(vm["server_id"], "hang")  # TCP connects, no SSH banner ever comes
    job = Job("302", "vmpt-alice", script="true\n")
    mom.pbs.receive(job)

    prologue = mom.pbs.prologue(job, alarm=5)

    assert prologue.exit_code is None and prologue.outcome == "requeue"
    assert (mom.job_dir / job.job_id / "root.env").exists(), "the record is written right after acquire"
    epilogue = mom.pbs.end(job, JOB_EXEC_RETRY_PROLOGUE)  # the alarm requeues the job
    assert epilogue.exit_code == 2
    # TORQUE delivers the requeued attempt's .e (until the rerun's replaces it)
    err = mom.pbs.delivered_err(job)
    assert "did not finish preparing" in err and "no answer within 4s" in err, err
    after = next(v for v in mom.pool.vms() if v["name"] == vm["name"])
    assert after["state"] == "unusable" and after["tainted"] == "prologue did not finish preparing the VM", after


def test_root_creates_no_workdir_for_the_user_and_bash_env_runs_nothing_on_the_node(mom: Mom) -> None:
    """A workdir the user could not create would be root's gift (e.g. on root's Python path);
    BASH_ENV passed with qsub -v must not run the user's code in the job starter on the node."""
    planted = Path(tempfile.mkdtemp(prefix="vmpt-bashenv-", dir="/tmp"))
    planted.chmod(0o777)
    marker = planted / "ran-on-the-node"
    (planted / "evil.sh").write_text(f"touch {marker}\n")
    (planted / "evil.sh").chmod(0o755)
    workdir = "/usr/local/lib/vmpt-planted/site-packages"
    submitted = mom.submit_dir(pwd.getpwnam("vmpt-alice"))  # qsub -o/-e: the workdir is not hers on the node
    job = Job(
        "121",
        "vmpt-alice",
        workdir=workdir,
        variables={"BASH_ENV": str(planted / "evil.sh")},
        script="pwd\n",
        stdout=f"{submitted}/planted.out",
        stderr=f"{submitted}/planted.err",
    )
    try:
        prologue, status, epilogue = mom.pbs.run(job)
        assert (prologue.exit_code, status, epilogue.exit_code) == (0, 0, 0), messages(mom, job)
        assert mom.pbs.delivered_out(job) == "/home/vmpt-alice\n"
        assert f"no directory {workdir} on the VM; the job runs in /home/vmpt-alice" in mom.pbs.delivered_err(job)
        assert not marker.exists(), "BASH_ENV ran the user's code in the job starter"
        for vm in mom.pool.vms():
            assert mom.on_vm(vm, "test", "-e", "/usr/local/lib/vmpt-planted")[0] != 0
    finally:
        shutil.rmtree(planted, ignore_errors=True)


def test_a_job_whose_vm_preparation_keeps_failing_is_aborted_not_requeued_forever(mom: Mom) -> None:
    mom.pool.write_config(pool={"min": 1})
    mom.pool.reconcile_until(lambda: mom.pool.vms("free"), 90, "a Free VM")
    Mom.__init__(mom, mom.root, mom.pool, MAX_PREPARE_ATTEMPTS=1, SSH_CONNECT_TIMEOUT=2)
    broken = mom.pool.vms("free")[0]
    mom.pool.bed.vm_fault(broken["server_id"], "hang")
    job = Job("303", "vmpt-alice", script="true\n")
    mom.pbs.receive(job)

    first = mom.pbs.prologue(job)
    assert first.outcome == "requeue", messages(mom, job)
    assert next(v for v in mom.pool.vms() if v["name"] == broken["name"])["tainted"]
    assert first.job_exit_status is not None
    assert mom.pbs.end(job, first.job_exit_status).exit_code == 0, messages(mom, job)
    first_err = mom.pbs.delivered_err(job)  # the requeued attempt's .e reaches Alice
    assert "preparing VM" in first_err and "the job is requeued" in first_err, first_err
    mom.pbs.receive(job)
    second = mom.pbs.prologue(job)  # Torque runs it again after the requeue: a new VM, but no more tries
    assert second.job_exit_status is not None
    mom.pbs.end(job, second.job_exit_status)

    assert second.outcome == "abort", messages(mom, job)
    # TORQUE delivers nothing of the aborted attempt (the first's .e stays): the log tells why
    assert mom.pbs.delivered_err(job) == first_err
    assert "preparing a VM failed 1 times; not trying again (job aborted)" in mom.told(job)
    assert "the job is requeued" in mom.told(job), "the log keeps the first attempt's reason too"
    assert not [vm for vm in mom.pool.vms() if vm["job"] == job.job_id]
    assert [vm for vm in mom.pool.vms("free") if vm["name"] != broken["name"]], "the untouched VM is Free again"


# --- host keys, older TORQUE, the record's permissions, the account on the VM ---


def read_as(user: str, path: Path) -> subprocess.CompletedProcess[str]:
    """Try to read a file as `user` (uid, primary gid, no supplementary groups)."""
    owner = pwd.getpwnam(user)
    return subprocess.run(
        ["cat", "--", str(path)],
        capture_output=True,
        text=True,
        user=owner.pw_uid,
        group=owner.pw_gid,
        extra_groups=[],
        timeout=30,
    )


def test_a_vm_whose_host_key_changed_after_the_prologue_runs_no_job_and_serves_no_other(mom: Mom) -> None:
    marker = "/tmp/vmpt-hostkey-job-ran"
    job = Job("401", "vmpt-alice", script=f"touch {marker}\n")
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    vm = mom.vm_of(job)
    record = mom.job_dir / job.job_id
    pinned = (record / "known_hosts").read_text()
    port = next(
        line.split("=", 1)[1] for line in (record / "root.env").read_text().splitlines() if line.startswith("SSH_PORT=")
    )
    # The VM gets new host keys (a rebuilt or impersonated VM); its sshd restarts with them.
    new = mom.pool.give_new_host_keys(vm["server_id"])
    assert len(new) == 3 and not any(key in pinned for key in new)
    scan = subprocess.run(
        ["ssh-keyscan", "-T", "5", "-p", port, vm["address"]], capture_output=True, text=True, timeout=30
    )
    assert any(key in scan.stdout for key in new), f"the VM does not present its new keys: {scan.stdout}"

    status = mom.pbs.start(job).wait(60)

    err = mom.pbs.err(job)
    assert status == 255, err
    assert "Host key verification failed" in err, err
    assert f"ssh to VM {vm['name']} ({vm['address']}) exited 255" in err, err
    assert mom.on_vm(vm, "test", "-e", marker)[0] != 0, "the job ran on a VM with a changed host key"
    assert mom.on_vm(vm, "test", "-e", "/home/vmpt-alice/.vmpool-jobs")[0] != 0, "the job's script reached it"
    assert (record / "known_hosts").read_text() == pinned, "the job starter learned a new host key"

    # The epilogue does not trust the VM either: the scrub refuses it, the VM is taken out of the pool.
    epilogue = mom.pbs.end(job, exit_status=status)

    err = mom.pbs.delivered_err(job)  # what Alice gets: the job starter's and the epilogue's reasons
    assert epilogue.exit_code == 2, err
    assert "Host key verification failed" in err and f"ssh to VM {vm['name']} ({vm['address']}) exited 255" in err
    assert f"scrub of VM {vm['name']} ({vm['address']}) failed: ssh failed: Host key verification failed" in err
    assert "it will serve no other job" in err
    after = next(v for v in mom.pool.vms() if v["name"] == vm["name"])
    assert after["state"] == "unusable" and after["tainted"] and "scrub failed" in (after["reason"] or ""), after
    assert not record.exists()
    mom.pool.run("reconcile")
    assert "free" not in [v["state"] for v in mom.pool.vms() if v["name"] == vm["name"]]
    known_hosts = Path(mom.pool.known_hosts).read_text() if Path(mom.pool.known_hosts).exists() else ""
    assert not any(key in known_hosts for key in new), "vmpool pinned the VM's new host key"


def test_older_torque_arguments_without_a_script_path_run_and_clean_up_a_job(mom: Mom) -> None:
    mom.pbs.version = "4.2.10"  # pbs_mom before 5.1: prologue 7 arguments, epilogue 10
    job = Job("402.vmpool-test.example", "vmpt-bob", script='echo "host=$(hostname) torque=$PBS_VERSION"\n')
    script = str(mom.pbs.script_path(job))
    assert len(mom.pbs.prologue_argv(job)) == 7 and script not in mom.pbs.prologue_argv(job)
    assert len(mom.pbs.epilogue_argv(job, 0)) == 10 and script not in mom.pbs.epilogue_argv(job, 0)
    mom.pbs.receive(job)

    prologue = mom.pbs.prologue(job)

    assert prologue.outcome == "run", messages(mom, job)
    vm = mom.vm_of(job)
    assert (vm["state"], vm["user"]) == ("busy", "vmpt-bob")
    status = mom.pbs.start(job).wait(60)
    vm_host = mom.on_vm(vm, "hostname")[1].strip()
    assert status == 0, messages(mom, job)
    assert mom.pbs.out(job) == f"host={vm_host} torque=TORQUE-4.2.10\n" and vm_host != os.uname().nodename
    assert sorted(user_traces(mom, vm, "vmpt-bob")) == ["account", "home"]

    epilogue = mom.pbs.end(job, exit_status=status)

    assert epilogue.exit_code == 0, messages(mom, job)
    assert mom.pbs.delivered_out(job) == f"host={vm_host} torque=TORQUE-4.2.10\n"
    assert mom.pbs.delivered_err(job) == ""
    assert user_traces(mom, vm, "vmpt-bob") == []
    assert [v["state"] for v in mom.pool.vms() if v["name"] == vm["name"]] == ["free"]
    assert not (mom.job_dir / job.job_id).exists()


def test_the_job_record_is_readable_by_the_job_owner_only(mom: Mom) -> None:
    alice, bob = pwd.getpwnam("vmpt-alice"), pwd.getpwnam("vmpt-bob")
    job = Job("403", "vmpt-alice", script="true\n")
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    record = mom.job_dir / job.job_id
    info = record.lstat()
    assert stat.S_ISDIR(info.st_mode) and (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o711)
    owners = {
        "job.env": (alice.pw_uid, alice.pw_gid, 0o400),
        "known_hosts": (alice.pw_uid, alice.pw_gid, 0o400),
        "id_ed25519": (alice.pw_uid, alice.pw_gid, 0o400),
        "root.env": (0, 0, 0o600),
        "root_known_hosts": (0, 0, 0o600),
    }
    for name, expected in owners.items():
        info = (record / name).lstat()
        assert stat.S_ISREG(info.st_mode), name
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == expected, name
    for path in record.iterdir():  # whatever else is there: nothing but the public key for others
        if path.name != "id_ed25519.pub":
            assert not path.lstat().st_mode & 0o077, f"{path.name} is open to group or others"

    # Bob reads none of it, nor lists it; Alice reads hers (the check works) and not root's.
    for name in owners:
        stolen = read_as(bob.pw_name, record / name)
        assert stolen.returncode != 0 and stolen.stdout == "" and "Permission denied" in stolen.stderr, name
    listing = subprocess.run(
        ["ls", str(record)], capture_output=True, text=True, user=bob.pw_uid, group=bob.pw_gid, extra_groups=[]
    )
    assert listing.returncode != 0 and listing.stdout == ""
    for name in ("job.env", "known_hosts"):
        mine = read_as(alice.pw_name, record / name)
        assert mine.returncode == 0 and mine.stdout == (record / name).read_text() != "", name
    for name in ("root.env", "root_known_hosts"):
        assert read_as(alice.pw_name, record / name).returncode != 0, name

    assert mom.pbs.start(job).wait(60) == 0, messages(mom, job)
    assert mom.pbs.end(job, exit_status=0).exit_code == 0, messages(mom, job)


def test_the_job_owner_has_the_node_s_uid_and_primary_gid_on_the_vm(mom: Mom) -> None:
    ensure_user_with_group(*CAROL)
    carol = pwd.getpwnam(CAROL[0])
    group = grp.getgrgid(carol.pw_gid)
    assert group.gr_name == CAROL[1] and carol.pw_uid != carol.pw_gid  # a uid/gid mix-up would show
    mom.pool.write_config(pool={"min": 1})
    mom.pool.reconcile_until(lambda: mom.pool.vms("free"), 90, "a Free VM")
    vm = mom.pool.vms("free")[0]
    # The stand-in VM sees the node's /etc: like a real image, it must not know the owner at all.
    rc, _, err = mom.on_vm(vm, "sh", "-c", f"userdel {carol.pw_name} && groupdel {group.gr_name}")
    assert rc == 0, err
    for database, key in (
        ("passwd", carol.pw_name),
        ("passwd", str(carol.pw_uid)),
        ("group", group.gr_name),
        ("group", str(group.gr_gid)),
    ):
        assert mom.on_vm(vm, "getent", database, key)[0] != 0, (database, key)
    job = Job(
        "404", carol.pw_name, script='echo "uid=$(id -u) gid=$(id -g) user=$(id -un) group=$(id -gn) groups=$(id -G)"\n'
    )
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    assert mom.vm_of(job)["name"] == vm["name"]

    status = mom.pbs.start(job).wait(60)

    assert status == 0, messages(mom, job)
    assert mom.pbs.out(job) == (
        f"uid={carol.pw_uid} gid={carol.pw_gid} user={carol.pw_name} group={group.gr_name} groups={carol.pw_gid}\n"
    )
    assert os.getgrouplist(carol.pw_name, carol.pw_gid) == [carol.pw_gid], "the node gives her no other group"
    rc, entry, _ = mom.on_vm(vm, "getent", "passwd", carol.pw_name)
    assert rc == 0 and entry.split(":")[2:4] == [str(carol.pw_uid), str(carol.pw_gid)], entry
    rc, entry, _ = mom.on_vm(vm, "getent", "group", group.gr_name)
    assert rc == 0 and entry.split(":")[2] == str(group.gr_gid), entry
    rc, owner, _ = mom.on_vm(vm, "stat", "-c", "%u %g", carol.pw_dir)
    assert rc == 0 and owner.split() == [str(carol.pw_uid), str(carol.pw_gid)], owner
    assert mom.pbs.end(job, exit_status=status).exit_code == 0, messages(mom, job)
    assert [v["state"] for v in mom.pool.vms() if v["name"] == vm["name"]] == ["free"]


# --- a job deleted during its prologue, a release that fails (issues 9.1, 8.3) ---


def test_a_job_deleted_while_its_prologue_waits_leaves_no_vm_key_or_record(mom: Mom) -> None:
    mom.pool.bed.set_behaviour(f"^{mom.pool.prefix}", spawn_delay=15)  # no Free VM: one boots
    job = Job("310", "vmpt-alice", script="true\n")
    mom.pbs.receive(job)
    prologue = mom.pbs.start_prologue(job)
    wait_until(
        lambda: [w for w in mom.pool.status()["waiting"] if w["job"] == job.job_id],
        60,
        "the prologue's request waiting for a VM",
    )

    # qdel: pbs_mom runs the epilogue and leaves the prologue running. The prologue's shell is
    # held (SIGSTOP; its vmpool acquire runs on) until the output is delivered: it must give up
    # after that, its words too late for the .e, however fast it sees the end on this machine.
    os.kill(prologue.process.pid, signal.SIGSTOP)
    try:
        epilogue = mom.pbs.delete_during_prologue(job)
    finally:
        os.kill(prologue.process.pid, signal.SIGCONT)

    assert epilogue.exit_code == 0, messages(mom, job)
    assert (mom.job_dir / f".ended.{job.job_id}").exists()
    ended = prologue.finish(alarm=120)  # the VM boots (or vmpool withdraws the wait): it gives up
    assert ended.exit_code == 1, messages(mom, job)
    # its .o/.e went to Alice with the epilogue: the prologue's reason reaches her only in the log
    assert "the job ended while its prologue waited for a VM" not in mom.pbs.delivered_err(job)
    assert "the job ended while its prologue waited for a VM" in mom.told(job)
    assert not (mom.job_dir / job.job_id).exists(), "the record (and the job's key) must go"
    assert not [vm for vm in mom.pool.vms() if vm["job"] == job.job_id or vm["state"] == "busy"]
    assert mom.pool.status()["waiting"] == []


@pytest.mark.parametrize("loss", ["moved aside", "restored from a backup"])
def test_a_lost_or_restored_state_costs_no_running_job_its_vm(mom: Mom, loss: str) -> None:
    """The state file lost (moved aside) or restored from a backup taken before the job began,
    while the job runs: no other job is given its VM, the pool's passes give it back to the job
    (the hooks' record says where it runs), and the job's epilogue releases it."""
    mom.pool.write_config(pool={"max": 2, "min": 1, "unusable_timeout": 2})
    state = Path(mom.pool.state_file)
    mom.pool.reconcile_until(lambda: mom.pool.vms("free"), 90, "a Free VM")
    backup = state.read_text()  # the night's backup: the VM Free
    job = Job("311", "vmpt-alice", script="sleep 12; echo finished")
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    vm = mom.vm_of(job)
    running = mom.pbs.start(job)
    if loss == "moved aside":
        state.rename(state.with_name("lost.json"))
    else:
        state.write_text(backup)
    other = mom.pool.run("acquire", "312", "--user", "vmpt-bob", "--timeout", "90").stdout.strip()
    assert other != vm["address"], "the running job's VM went to another job"
    mom.pool.reconcile_until(
        lambda: any(
            v["job"] == "311" and v["state"] == "busy" and v["server_id"] == vm["server_id"] for v in mom.pool.vms()
        ),
        60,
        "job 311's VM its own again",
    )
    status = running.wait(60)
    assert status == 0 and "finished" in mom.pbs.out(job), messages(mom, job)
    assert mom.pbs.end(job, status).exit_code == 0, messages(mom, job)
    after = {v["server_id"]: v for v in mom.pool.vms()}
    assert after[vm["server_id"]]["state"] == "free", "the job's release found its VM"
    assert vm["server_id"] in {server.id for server in mom.pool.servers()}


def test_a_stale_end_mark_does_not_stop_a_later_prologue_of_the_same_job(mom: Mom) -> None:
    job = Job("311", "vmpt-bob", script="echo ran\n")
    mom.pbs.receive(job)
    # An earlier attempt's epilogue (say after a requeue) left its mark.
    assert mom.pbs.end(job, JOB_EXEC_RETRY_PROLOGUE).exit_code == 0, messages(mom, job)
    assert mom.pbs.delivered_out(job) == ""  # that attempt's (empty) .o
    mark = mom.job_dir / f".ended.{job.job_id}"
    assert mark.exists()

    prologue, status, epilogue = mom.pbs.run(job)

    assert (prologue.exit_code, status, epilogue.exit_code) == (0, 0, 0), messages(mom, job)
    assert mom.pbs.delivered_out(job) == "ran\n"  # the rerun's .o replaced it
    assert [v["state"] for v in mom.pool.vms()] == ["free"]


def test_a_failed_release_keeps_the_record_until_a_release_succeeds(mom: Mom) -> None:
    mom.pool.write_config(pool={"lock_timeout": 1})
    job = Job("312", "vmpt-bob", script="true\n")
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    assert mom.pbs.start(job).wait(60) == 0, messages(mom, job)
    vm = mom.vm_of(job)
    record = mom.job_dir / job.job_id
    with open(mom.pool.state_file + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another vmpool holds the state lock, for too long
        epilogue = mom.pbs.end(job, exit_status=0)

    assert epilogue.exit_code == 2, messages(mom, job)
    assert "vmpool release failed (exit 7" in mom.pbs.delivered_err(job)
    assert (record / "root.env").exists(), "the record must stay until vmpool has the release"
    assert not (record / "id_ed25519").exists(), "the owner's key goes with the account on the VM"
    assert mom.vm_of(job)["state"] == "busy"
    again = mom.pbs.epilogue(job, exit_status=0)  # pbs_mom does not, an admin (or a re-run) does
    assert again.exit_code == 0, messages(mom, job)
    assert not record.exists()
    assert [v["state"] for v in mom.pool.vms() if v["name"] == vm["name"]] == ["free"]


# --- the job's shell and signals on the VM (issues 9.4, 9.5, 8.6) ---


def test_the_job_shell_on_the_vm_is_a_login_shell_as_pbs_mom_starts_it(mom: Mom) -> None:
    job = Job("320", "vmpt-alice", script='echo "parent=$(ps -o args= -p $PPID)"; echo "site=$VMPT_SITE"\n')
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    vm = mom.vm_of(job)
    # the image's /etc/profile.d, as environment modules or a site's paths would use it
    rc, _, err = mom.on_vm(vm, "sh", "-c", "echo 'export VMPT_SITE=loaded' >/etc/profile.d/vmpt-site.sh")
    assert rc == 0, err

    status = mom.pbs.start(job).wait(60)

    assert status == 0, messages(mom, job)
    shell = job.owner.pw_shell
    assert mom.pbs.end(job, exit_status=status).exit_code == 0, messages(mom, job)
    assert mom.pbs.delivered_out(job) == f"parent={PbsMom.login_shell_argv0(shell)}\nsite=loaded\n", messages(mom, job)


def test_a_job_s_term_trap_prints_and_gets_kill_grace_before_sigkill(mom: Mom) -> None:
    Mom.__init__(mom, mom.root, mom.pool, KILL_GRACE=8)
    job = Job(
        "321",
        "vmpt-bob",
        script="""trap 'echo trapped; sleep 1; echo still in the trap; sleep 100
    echo late' TERM
echo started
sleep 1000 &
wait
""",
    )
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    vm = mom.vm_of(job)
    uid = str(job.owner.pw_uid)
    running = mom.pbs.start(job)
    wait_until(lambda: mom.pbs.out(job) == "started\n", 30, "the job's first line")
    wait_until(lambda: mom.on_vm(vm, "pgrep", "-U", uid, "-x", "sleep")[0] == 0, 10, "the job's sleep on the VM")

    running.signal(signal.SIGTERM, kill_delay=60)  # kill_delay above KILL_GRACE, as the README asks

    assert running.wait(60) == 256 + signal.SIGTERM, messages(mom, job)
    assert mom.pbs.out(job) == "started\ntrapped\nstill in the trap\n", messages(mom, job)  # no "late"
    wait_until(lambda: mom.on_vm(vm, "pgrep", "-U", uid)[0] != 0, 10, "no process of the job owner on the VM")
    assert mom.pbs.end(job, exit_status=256 + signal.SIGTERM).exit_code == 0, messages(mom, job)


def test_a_forwarded_sigint_reaches_a_job_that_starts_with_default_dispositions(mom: Mom) -> None:
    # The job's SigIgn, then that of vm-run.sh, the ssh session's shell (the baseline: a test
    # machine's sshd may hand its sessions an ignored SIGQUIT; vm-run.sh must add nothing).
    job = Job(
        "322",
        "vmpt-alice",
        script="""grep '^SigIgn:' /proc/$$/status
grep '^SigIgn:' /proc/$(ps -o ppid= -p $PPID | tr -d ' ')/status
trap 'echo caught INT; exit 7' INT
echo ready
sleep 1000
echo not reached
""",
    )
    mom.pbs.receive(job)
    assert mom.pbs.prologue(job).outcome == "run", messages(mom, job)
    vm = mom.vm_of(job)
    uid = str(job.owner.pw_uid)
    running = mom.pbs.start(job)
    wait_until(lambda: "ready\n" in mom.pbs.out(job), 30, "the job's ready line")
    wait_until(lambda: mom.on_vm(vm, "pgrep", "-U", uid, "-x", "sleep")[0] == 0, 10, "the job's sleep on the VM")
    ignored, baseline = (int(line.split()[1], 16) for line in mom.pbs.out(job).splitlines()[:2])
    interrupts = 1 << (signal.SIGINT - 1) | 1 << (signal.SIGQUIT - 1)
    assert not ignored & interrupts & ~baseline, f"the job ignores more than its session: {ignored:x} {baseline:x}"
    assert not ignored & 1 << (signal.SIGINT - 1)

    running.signal(signal.SIGINT, kill_delay=60)  # qsig -s INT

    # the job trapped it and exited 7: pbs_mom records 7, as on a plain node
    assert running.wait(60) == 7, messages(mom, job)
    assert mom.pbs.out(job).endswith("ready\ncaught INT\n"), mom.pbs.out(job)
    assert mom.pbs.end(job, exit_status=7).exit_code == 0, messages(mom, job)


# --- the root hooks ignore what the environment would have bash run (issue 8.7) ---


def test_root_hooks_run_nothing_from_bash_env_shellopts_or_exported_functions(mom: Mom) -> None:
    planted = Path(tempfile.mkdtemp(prefix="vmpt-rootenv-", dir="/tmp"))
    marker = planted / "ran-as-root"
    (planted / "env.sh").write_text(f"touch {marker}\n")
    mom.pbs.pbs_environment.update(
        {
            "BASH_ENV": str(planted / "env.sh"),
            "SHELLOPTS": "xtrace",
            "BASH_FUNC_mktemp%%": f'() {{ touch {marker}; command mktemp "$@"; }}',
        }
    )
    job = Job("330", "vmpt-bob", script="true\n")
    try:
        prologue, status, epilogue = mom.pbs.run(job)
        assert (prologue.exit_code, status, epilogue.exit_code) == (0, 0, 0), messages(mom, job)
        assert not marker.exists(), "the environment ran code in a root hook"
        assert "+ " not in mom.pbs.delivered_err(job), "SHELLOPTS=xtrace reached a root hook"
    finally:
        shutil.rmtree(planted, ignore_errors=True)


def test_the_qstat_stand_in_answers_as_torque_6_1_qstat_f_1(mom: Mom) -> None:
    job = Job("340.vmpool-test.example", "vmpt-alice", script="true\n")

    def qstat() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(mom.pbs.qstat), "-f", "-1", job.job_id], capture_output=True, text=True)

    unknown = qstat()
    assert (unknown.returncode, unknown.stdout, unknown.stderr) == (
        153,
        "",
        f"qstat: Unknown Job Id Error {job.job_id}\n",
    )
    mom.pbs.receive(job)
    running = qstat()
    assert running.returncode == 0 and running.stdout.startswith(f"Job Id: {job.job_id}\n"), running
    assert "\n    job_state = R\n" in running.stdout and "\n    Job_Owner = vmpt-alice@" in running.stdout
    mom.pbs.set_state(job, "C", 0)
    assert "\n    job_state = C\n" in qstat().stdout  # kept for keep_completed: exit 0, state C
    mom.pbs.purge(job)
    assert qstat().returncode == 153


# --- check-hooks: the whole chain root executes through vmpool (issue 9.6) ---


def fake_vmpool_install(mom: Mom) -> dict[str, Path]:
    """A venv as `make venv` lays it out (interpreter symlink, editable install of a checkout),
    root's and tight; the hooks' config points at its vmpool command."""
    venv, source = mom.root / "venv", mom.root / "checkout"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    source.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin" / "python3").symlink_to(os.path.realpath(sys.executable))
    command = venv / "bin" / "vmpool"
    command.write_text(f"#!{venv}/bin/python3\nimport sys\nfrom vmpool import run\nrun()\n")
    command.chmod(0o755)
    (site / "__editable__.vmpool-0.1.0.pth").write_text(f"{source}\n")
    shutil.copy(ROOT / "vmpool.py", source / "vmpool.py")
    (source / "vmpool.py").chmod(0o644)
    conf = mom.pbs_home / "mom_priv" / "vmpool" / "vmpool-hooks.conf"
    conf.write_text(conf.read_text().replace(f"VMPOOL={VMPOOL}", f"VMPOOL={command}"))
    return {"venv": venv, "site": site, "source": source}


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda paths: (paths["source"] / "vmpool.py").chmod(0o664), "vmpool.py is mode 664: group/world-writable"),
        (lambda paths: paths["site"].chmod(0o775), "site-packages is mode 775: group/world-writable"),
        (lambda paths: os.chown(paths["source"], pwd.getpwnam("vmpt-alice").pw_uid, -1), "checkout is owned by uid"),
        (lambda paths: (paths["venv"] / "bin").chmod(0o777), "bin is mode 777: group/world-writable"),
    ],
)
def test_check_hooks_checks_everything_root_executes_through_vmpool(mom: Mom, breakage, message: str) -> None:
    paths = fake_vmpool_install(mom)
    check = ["make", "-s", "-C", str(ROOT), "check-hooks", f"PBS_HOME={mom.pbs_home}"]
    before = subprocess.run(check, capture_output=True, text=True)
    assert before.returncode == 0, before.stderr
    breakage(paths)  # e.g. a `git archive` copy: 664 files

    result = subprocess.run(check, capture_output=True, text=True)

    assert result.returncode != 0
    assert message in result.stderr, result.stderr
