"""Play pbs_mom (TORQUE 6.1) for vmpool's hooks: run them exactly as a real mom would.

What a real pbs_mom does, and this driver does too (see issue 4 for the sources):

- before a prologue or epilogue, the permission check: a regular file, owned by root,
  executable by its owner, not writable by group or others; otherwise the job is requeued;
- the prologue as root, argv ``jobid user group jobname resources queue account script``,
  cwd ``mom_priv``, stdin ``/dev/null``, stdout/stderr appended to the job's .OU/.ER spool files,
  environment = pbs_environment (PATH=/bin:/usr/bin) plus PBS_NODEFILE, PBS_O_WORKDIR, PBS_NP,
  PBS_NUM_PPN...; in its own session, SIGKILLed whole when ``$prologalarm`` expires;
  exit 0 runs the job, 1 aborts it, anything else (and the alarm) requeues it;
- the job starter as the job's owner (uid, gid, no supplementary groups), with the job's full
  environment, cwd the owner's home, stdout/stderr the .OU/.ER files, argv ``[starter, shell]``
  and on stdin a pipe carrying one line ``<PBS_HOME>/mom_priv/jobs/<jobid>.SC [args]``; the
  script file is mode 0700, owned by the job's owner (TORQUE's start_exec.c,
  mom_jobstarter_execute_job: ``arg[0]`` = starter, ``arg[1]`` = the shell's full path; the
  ``-bash`` that source_login_shells_or_not puts first for a plain node's login shell is
  overwritten, so the starter must make the login shell itself: see ``login_shell_argv0``);
- qdel/qsig: the signal to every process in the job's session, then SIGKILL after
  ``kill_delay`` (src/resmom/linux/mom_mach.c, kill_task, walks /proc for the session id);
- the job's exit status as pbs_mom records it: the exit code, or 256 + N for a job starter
  killed by signal N (src/resmom/linux/mom_start.c, scan_for_terminated:
  ``WTERMSIG(statloc) + 0x100``): 271 for SIGTERM;
- the epilogue as root with 11 args (``... session resources used queue account exit script``);
- qdel while the prologue runs (``delete_during_prologue``): pbs_mom's kill_job finds no job
  process ("kill_job done (killed 0 processes)"), runs the epilogue and deletes the job, and
  leaves the prologue running (seen under TORQUE 6.1, issue 9);
- the prologue's exit status as the job's (src/resmom/start_exec.c, handle_prologs): exit 1
  ends the job with JOB_EXEC_FAIL2 (-2), anything else (the alarm, a refused permission check)
  with JOB_EXEC_RETRY_PROLOGUE (-14): the server requeues it;
- the output the job's owner gets (``end``): after the epilogue, the mom's
  send_back_std_and_staged_files (src/resmom/requests.c) copies the spool .OU/.ER, as the owner
  (``/bin/cp -rp``: sys_copy), to the job's output and error paths and removes each spool file
  once copied (copy_and_process); a copy that fails leaves the file in PBS_HOME/undelivered.
  It copies nothing for exit statuses JOB_EXEC_FAIL1..JOB_EXEC_RETRY (-1..-3): a job its
  prologue aborted gets no .o or .e at all, its spool files stay on the node. A requeued
  attempt (-14) gets its files, and the rerun's overwrite them. The default paths are the
  server's (src/server/svr_jobfunc.c, prefix_std_file and default_std):
  ``$PBS_O_WORKDIR/<job name's last component>.o<sequence number>`` (``.e``; ``-<index>`` after
  it for an array job); ``qsub -o``/``-e`` name others (``Job.stdout``/``Job.stderr``). While the
  job runs its output is only in the spool ($spool_as_final_name is not set);

Before TORQUE 5.1 (``PbsMom(version="4.2.10")``), pbs_mom passes no job script path: the prologue
gets 7 arguments and the epilogue 10. Read in src/resmom/prolog.c, setup_pelog_arguments, on the
4.2-dev, 4.5-dev, 5.0-dev (``arg[5..7]`` = resources, queue, account, then NULL), 5.1-dev,
6.0-dev and 6.1-dev branches (``arg[8]`` = the script path, ``namebuf``). The resource list
(``resc_to_string(pjob, JOB_ATR_resource, ...)``) is the job's Resource_List as
``name=value`` pairs joined by commas, in the list's own order: in 6.x a vector that
add_resource_entry appends to (qsub's order, then what the server adds: ``neednodes`` when the
job is run), so the prologue must not depend on the order; a pair that does not fit the buffer is
left out. ``Job.resources`` gives the order a real TORQUE 6.1 showed for ``-l nodes=1:ppn=1``
(``nodes=1:ppn=1,walltime=00:05:00,neednodes=1:ppn=1``).

The driver needs root (it switches to the job owner for the job starter).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

PBS_ENVIRONMENT = {"PATH": "/bin:/usr/bin", "LANG": "C"}
RUN, ABORT = 0, 1
# The mom's special exit statuses of a job (src/include/pbs_job.h).
JOB_EXEC_FAIL1, JOB_EXEC_FAIL2, JOB_EXEC_RETRY = -1, -2, -3  # the job did not run: no output is copied
JOB_EXEC_RETRY_PROLOGUE = -14  # the prologue failed other than by exit 1: the server requeues the job
KILL_DELAY = 2.0  # the server's default kill_delay (seconds between qdel's SIGTERM and SIGKILL)
KEEP_COMPLETED = 300  # the server's keep_completed in the job table (qstat shows C jobs that long)
QSTAT = Path(__file__).resolve().parent / "bin" / "qstat"


def torque_exit_status(returncode: int) -> int:
    """A job starter's end as pbs_mom records it: its exit code, or 256 + N when signal N killed it
    (src/resmom/linux/mom_start.c, scan_for_terminated)."""
    return returncode if returncode >= 0 else 256 - returncode


def session_processes(session: int) -> list[int]:
    """Every process whose session id is `session`, read from /proc as pbs_mom's kill_task does."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat_line.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
        if int(fields[3]) == session:
            pids.append(int(entry))
    return pids


def signal_session(session: int, signum: int) -> int:
    """Send a signal to every process of a session; how many got it."""
    count = 0
    for pid in session_processes(session):
        try:
            os.kill(pid, signum)
            count += 1
        except ProcessLookupError:
            pass
    return count


@contextlib.contextmanager
def _one_useradd_at_a_time() -> Iterator[None]:
    """Across test workers: a useradd that finds /etc/passwd locked by another one fails."""
    with open("/tmp/vmpool-tests-useradd.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_users(names: tuple[str, ...]) -> None:
    """Job owners are real non-root users of the worker node (this machine): create missing ones."""
    with _one_useradd_at_a_time():
        for name in names:
            try:
                pwd.getpwnam(name)
            except KeyError:
                subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group", name], check=True)


def ensure_system_user(name: str) -> pwd.struct_passwd:
    """A system account (uid below 1000: useradd --system) with a home of its own, as a daemon's."""
    with _one_useradd_at_a_time():
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--create-home", "--shell", "/bin/bash", "--user-group", name], check=True
            )
    return pwd.getpwnam(name)


def ensure_user_with_group(name: str, group: str) -> None:
    """A job owner whose primary group is `group` (not named after the user), its gid other than
    the user's uid (useradd --user-group gives uid == gid here, which hides a uid/gid mix-up)."""
    import grp

    with _one_useradd_at_a_time():
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", group], check=False)  # another test run may be adding it too
        gid = grp.getgrnam(group).gr_gid
        try:
            pwd.getpwnam(name)
        except KeyError:
            taken = {entry.pw_uid for entry in pwd.getpwall()}
            uid = next(uid for uid in range(1000, 60000) if uid != gid and uid not in taken)
            subprocess.run(
                [
                    "useradd",
                    "--create-home",
                    "--shell",
                    "/bin/bash",
                    "--no-user-group",
                    "--gid",
                    group,
                    "--uid",
                    str(uid),
                    name,
                ],
                check=False,
            )
    owner = pwd.getpwnam(name)
    if owner.pw_gid != gid or owner.pw_uid == gid:
        raise RuntimeError(
            f"user {name} exists with uid {owner.pw_uid} gid {owner.pw_gid}; "
            f"wanted primary group {group} ({gid}) and a uid other than {gid}"
        )


def seconds(walltime: str) -> int:
    """Torque's [[HH:]MM:]SS as seconds."""
    total = 0
    for part in walltime.split(":"):
        total = total * 60 + int(part)
    return total


@dataclass
class Job:
    """A job as qsub would submit it."""

    job_id: str
    user: str
    script: str
    args: str = ""  # qsub -F "..."
    group: str = ""  # qsub -W group_list; default the owner's primary group
    name: str = "STDIN"
    queue: str = "batch"
    account: str = ""
    walltime: str = "00:10:00"
    variables: dict[str, str] = field(default_factory=dict)  # qsub -v
    workdir: str = ""  # the qsub caller's cwd (PBS_O_WORKDIR); default the mom's submit_dir, else the home
    ppn: int = 1
    mem: str = ""  # qsub -l mem=6gb
    gpus: int = 0  # qsub -l nodes=1:ppn=4:gpus=1
    stdout: str = ""  # qsub -o (a path on this host); default $PBS_O_WORKDIR/<name>.o<sequence number>
    stderr: str = ""  # qsub -e; default $PBS_O_WORKDIR/<name>.e<sequence number>

    @property
    def owner(self) -> pwd.struct_passwd:
        return pwd.getpwnam(self.user)

    @property
    def resources(self) -> str:
        """The resource list as TORQUE 6.1's pbs_mom gives it to the prologue and epilogue (the job's
        Resource_List, the server's neednodes copy of nodes among it)."""
        nodes = f"1:ppn={self.ppn}" + (f":gpus={self.gpus}" if self.gpus else "")
        memory = f"mem={self.mem}," if self.mem else ""
        return f"{memory}nodes={nodes},walltime={self.walltime},neednodes={nodes}"


@dataclass
class HookRun:
    """How a prologue or epilogue ended, as pbs_mom sees it."""

    exit_code: int | None  # None: killed by the alarm, or refused by the permission check
    problem: str = ""  # why pbs_mom did not run it / killed it
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        if self.exit_code == RUN:
            return "run"
        if self.exit_code == ABORT:
            return "abort"
        return "requeue"

    @property
    def job_exit_status(self) -> int | None:
        """A prologue's run as the job's exit status (start_exec.c, handle_prologs): None if the
        job runs, JOB_EXEC_FAIL2 for exit 1, JOB_EXEC_RETRY_PROLOGUE for anything else."""
        return {"run": None, "abort": JOB_EXEC_FAIL2}.get(self.outcome, JOB_EXEC_RETRY_PROLOGUE)


class RunningJob:
    """A job starter process pbs_mom has started."""

    def __init__(self, job: Job, process: subprocess.Popen[bytes]):
        self.job = job
        self.process = process
        self.session = process.pid  # the starter leads its own session

    def signal(self, signum: int = signal.SIGTERM, kill_delay: float = KILL_DELAY) -> None:
        """qdel (or qsig): the signal to every process of the job's session, SIGKILL to what is
        left of the session after kill_delay (kill_task; the server's kill_delay)."""
        if self.process.poll() is not None:
            return
        signal_session(self.session, signum)
        try:
            self.process.wait(timeout=kill_delay)
        except subprocess.TimeoutExpired:
            signal_session(self.session, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        """The job's exit status as pbs_mom records it (271 for a starter killed by SIGTERM)."""
        return torque_exit_status(self.process.wait(timeout=timeout))


class RunningHook:
    """A prologue pbs_mom has started and not yet waited for."""

    def __init__(self, mom: PbsMom, name: str, process: subprocess.Popen[bytes], started: float):
        self.mom, self.name, self.process, self.started = mom, name, process, started

    def finish(self, alarm: float | None = None) -> HookRun:
        return self.mom._finish_hook(self.name, self.process, alarm, self.started)


class PbsMom:
    """One pbs_mom with its PBS_HOME; hooks installed in PBS_HOME/mom_priv."""

    def __init__(
        self,
        pbs_home: Path,
        starter: Path | None = None,
        alarm: float = 300,
        server: str = "vmpool-test.example",
        version: str = "6.1.3",
        pbs_environment: dict[str, str] | None = None,
        submit_dir: Callable[[pwd.struct_passwd], str] | None = None,
    ):
        self.pbs_home = Path(pbs_home)
        self.mom_priv = self.pbs_home / "mom_priv"
        self.jobs = self.mom_priv / "jobs"
        self.spool = self.pbs_home / "spool"
        self.aux = self.pbs_home / "aux"
        self.undelivered = self.pbs_home / "undelivered"
        # where a job owner runs qsub when a Job names no workdir (default: the owner's home)
        self.submit_dir = submit_dir
        self.starter = starter
        self.alarm = alarm
        self.server = server
        self.version = version  # TORQUE's; below 5.1 the hooks get no job script path
        # mom_priv/pbs_environment: what the admin put there reaches every prologue and epilogue
        self.pbs_environment = dict(PBS_ENVIRONMENT if pbs_environment is None else pbs_environment)
        self.host = socket.gethostname()
        for directory, mode in (
            (self.pbs_home, 0o755),
            (self.mom_priv, 0o751),
            (self.jobs, 0o751),
            (self.spool, 0o1777),
            (self.aux, 0o755),
            (self.undelivered, 0o1777),
            (self.pbs_home / "server_priv", 0o750),
            (self.pbs_home / "bin", 0o755),
        ):
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, 0, 0)
            os.chmod(directory, mode)
        # What pbs_server knows of the jobs, for tests/bin/qstat: PBS_HOME/bin/qstat answers
        # `qstat -f -1 JOBID` as TORQUE 6.1 does (point vmpool's [batch] command at it).
        self.job_table = self.pbs_home / "server_priv" / "jobs.json"
        self._table_lock = threading.Lock()  # pbs_server changes its jobs one at a time (a demo's burst runs threads)
        if not self.job_table.exists():
            self.job_table.write_text(json.dumps({"keep_completed": KEEP_COMPLETED, "jobs": {}}))
        self.qstat = self.pbs_home / "bin" / "qstat"
        self.qstat.write_text(f"#!/bin/sh\nPBS_JOB_TABLE='{self.job_table}' exec '{QSTAT}' \"$@\"\n")
        self.qstat.chmod(0o755)

    # --- the server's view of the jobs (tests/bin/qstat) ---

    def set_state(self, job: Job, state: str, exit_status: int | None = None) -> None:
        """The job's job_state as qstat shows it: Q, R, E, or C (completed; kept keep_completed s)."""
        entry: dict[str, object] = {
            "state": state,
            "name": job.name,
            "owner": f"{job.user}@{self.host}",
            "queue": job.queue,
            "server": self.server,
        }
        if state == "C":
            entry.update(completed_at=time.time(), exit_status=exit_status if exit_status is not None else 0)
        self._change_table(lambda jobs: jobs.__setitem__(job.job_id, entry))

    def purge(self, job: Job) -> None:
        """keep_completed has passed (or the job never existed): qstat no longer knows the job."""
        self._change_table(lambda jobs: jobs.pop(job.job_id, None))

    def _change_table(self, change: Callable[[dict], object]) -> None:
        """One change at a time, replaced whole: qstat never reads half a table."""
        with self._table_lock:
            table = json.loads(self.job_table.read_text())
            change(table["jobs"])
            temporary = self.job_table.with_suffix(".tmp")
            temporary.write_text(json.dumps(table))
            temporary.replace(self.job_table)

    # --- files of a job ---

    def out_path(self, job: Job) -> Path:
        """The spool file the job's stdout goes to while it runs (and the hooks' stdout)."""
        return self.spool / f"{job.job_id}.OU"

    def err_path(self, job: Job) -> Path:
        """The spool file the job's stderr goes to while it runs (and the hooks' stderr)."""
        return self.spool / f"{job.job_id}.ER"

    def _default_std(self, job: Job, key: str) -> str:
        """The server's default output path (svr_jobfunc.c, prefix_std_file and default_std):
        $PBS_O_WORKDIR/<last component of the job name>.<o|e><sequence number>[-<array index>]."""
        name = job.name.rsplit("/", 1)[-1]
        sequence = re.sub(r"\D.*", "", job.job_id) or "0"  # strtol of the job id
        index = re.search(r"\[(\d+)", job.job_id)
        return f"{self.workdir(job)}/{name}.{key}{int(sequence)}" + (f"-{int(index.group(1))}" if index else "")

    def delivered_out_path(self, job: Job) -> Path:
        """Where the job's owner gets its .o: qsub -o, else the server's default path."""
        return Path(job.stdout or self._default_std(job, "o"))

    def delivered_err_path(self, job: Job) -> Path:
        """Where the job's owner gets its .e: qsub -e, else the server's default path."""
        return Path(job.stderr or self._default_std(job, "e"))

    def delivered_out(self, job: Job) -> str:
        """The .o the job's owner got (FileNotFoundError if none was delivered)."""
        return self.delivered_out_path(job).read_text(errors="replace")

    def delivered_err(self, job: Job) -> str:
        """The .e the job's owner got (FileNotFoundError if none was delivered)."""
        return self.delivered_err_path(job).read_text(errors="replace")

    def delivered_nothing(self, job: Job) -> bool:
        """Neither .o nor .e reached the job's owner."""
        return not self.delivered_out_path(job).exists() and not self.delivered_err_path(job).exists()

    def script_path(self, job: Job) -> Path:
        return self.jobs / f"{job.job_id}.SC"

    def nodefile(self, job: Job) -> Path:
        return self.aux / job.job_id

    def out(self, job: Job) -> str:
        """The spool .OU as it is now: what the job (and the hooks) wrote so far; the job's
        owner never reads it (it is copied at the end, see end())."""
        return self.out_path(job).read_text(errors="replace") if self.out_path(job).exists() else ""

    def err(self, job: Job) -> str:
        """The spool .ER as it is now (see out()); after an aborted prologue it stays on the node."""
        return self.err_path(job).read_text(errors="replace") if self.err_path(job).exists() else ""

    def receive(self, job: Job) -> None:
        """What pbs_mom writes when a job arrives: the script, the nodefile, the spool files."""
        self.set_state(job, "R")  # the server has sent it to this mom to run
        owner = job.owner
        script = self.script_path(job)
        script.write_text(job.script)
        os.chown(script, owner.pw_uid, owner.pw_gid)
        os.chmod(script, 0o700)
        self.nodefile(job).write_text(f"{self.host}\n" * job.ppn)
        os.chmod(self.nodefile(job), 0o644)
        for path in (self.out_path(job), self.err_path(job)):
            path.touch()
            os.chown(path, owner.pw_uid, owner.pw_gid)
            os.chmod(path, 0o600)

    def _group(self, job: Job) -> str:
        if job.group:
            return job.group
        import grp

        return grp.getgrgid(job.owner.pw_gid).gr_name

    def workdir(self, job: Job) -> str:
        """PBS_O_WORKDIR: the qsub caller's cwd."""
        if job.workdir:
            return job.workdir
        return self.submit_dir(job.owner) if self.submit_dir else job.owner.pw_dir

    # --- the hooks ---

    @staticmethod
    def permission_problem(path: Path) -> str:
        """pbs_mom's check of a prologue/epilogue; '' if it would run it."""
        try:
            info = path.lstat()
        except FileNotFoundError:
            return f"{path} does not exist"
        if not stat.S_ISREG(info.st_mode):
            return f"{path} is not a regular file"
        if info.st_uid != 0:
            return f"{path} is not owned by root"
        if not info.st_mode & stat.S_IXUSR:
            return f"{path} is not executable by its owner"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{path} is writable by group or others"
        return ""

    def _hook_env(self, job: Job) -> dict[str, str]:
        return {
            **self.pbs_environment,
            "PBS_NODEFILE": str(self.nodefile(job)),
            "PBS_O_WORKDIR": self.workdir(job),
            "PBS_NP": str(job.ppn),
            "PBS_NUM_PPN": str(job.ppn),
            "PBS_NUM_NODES": "1",
            "PBS_JOBID": job.job_id,
            "PBS_JOBNAME": job.name,
            "PBS_QUEUE": job.queue,
        }

    def _start_hook(self, name: str, argv: list[str], job: Job) -> subprocess.Popen[bytes] | str:
        """The hook started as pbs_mom starts it, or why pbs_mom would not start it."""
        path = self.mom_priv / name
        problem = self.permission_problem(path)
        if problem:
            return problem
        with open(self.out_path(job), "ab") as out, open(self.err_path(job), "ab") as err:
            return subprocess.Popen(
                [str(path), *argv],
                cwd=self.mom_priv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self._hook_env(job),
                start_new_session=True,
            )

    def _finish_hook(self, name: str, process: subprocess.Popen[bytes], alarm: float | None, started: float) -> HookRun:
        """Wait for a hook; at the alarm, SIGKILL its session (pbs_mom: $prologalarm - 10 s)."""
        alarm = self.alarm if alarm is None else alarm
        try:
            code = process.wait(timeout=max(0.0, alarm - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            signal_session(process.pid, signal.SIGKILL)
            process.wait()
            return HookRun(None, f"{name} killed by the alarm after {alarm}s", time.monotonic() - started)
        return HookRun(code, "", time.monotonic() - started)

    def _run_hook(self, name: str, argv: list[str], job: Job, alarm: float | None) -> HookRun:
        started = time.monotonic()
        process = self._start_hook(name, argv, job)
        if isinstance(process, str):
            return HookRun(None, process)
        return self._finish_hook(name, process, alarm, started)

    @property
    def passes_script_path(self) -> bool:
        """TORQUE 5.1 and later give the prologue and epilogue the job script's path last."""
        major, minor = (int(part) for part in self.version.split(".")[:2])
        return (major, minor) >= (5, 1)

    def prologue_argv(self, job: Job) -> list[str]:
        """What this version of pbs_mom passes a prologue: 8 arguments, 7 before TORQUE 5.1."""
        argv = [job.job_id, job.user, self._group(job), job.name, job.resources, job.queue, job.account]
        return argv + [str(self.script_path(job))] if self.passes_script_path else argv

    def epilogue_argv(self, job: Job, exit_status: int, session: int = 0) -> list[str]:
        """What this version of pbs_mom passes an epilogue: 11 arguments, 10 before TORQUE 5.1."""
        used = "cput=00:00:00,vmem=0kb,walltime=00:00:01,mem=0kb,energy_used=0"
        argv = [
            job.job_id,
            job.user,
            self._group(job),
            job.name,
            str(session),
            job.resources,
            used,
            job.queue,
            job.account,
            str(exit_status),
        ]
        return argv + [str(self.script_path(job))] if self.passes_script_path else argv

    def prologue(self, job: Job, alarm: float | None = None, argv: list[str] | None = None) -> HookRun:
        """Run the prologue; argv overrides pbs_mom's arguments (to play a hostile submission)."""
        return self._run_hook("prologue", self.prologue_argv(job) if argv is None else argv, job, alarm)

    def epilogue(
        self, job: Job, exit_status: int, session: int = 0, alarm: float | None = None, argv: list[str] | None = None
    ) -> HookRun:
        """The epilogue alone (as an admin runs it again); pbs_mom's end of a job is end()."""
        argv = self.epilogue_argv(job, exit_status, session) if argv is None else argv
        return self._run_hook("epilogue", argv, job, alarm)

    def start_prologue(self, job: Job) -> RunningHook:
        """The prologue, left running (to qdel the job meanwhile)."""
        process = self._start_hook("prologue", self.prologue_argv(job), job)
        if isinstance(process, str):
            raise RuntimeError(process)
        return RunningHook(self, "prologue", process, time.monotonic())

    def delete_during_prologue(self, job: Job, exit_status: int = 0) -> HookRun:
        """qdel while the prologue runs: pbs_mom kills no process (the prologue is no job task),
        runs the epilogue, sends the output back and deletes the job; the prologue keeps running
        (issue 9), writing to spool files that are gone once delivered."""
        return self.end(job, exit_status)

    # --- the end of a job: epilogue, output back to the owner ---

    def end(
        self, job: Job, exit_status: int, session: int = 0, alarm: float | None = None, argv: list[str] | None = None
    ) -> HookRun:
        """What pbs_mom does when a job ends, ran or not (catch_child.c, preobit_preparation):
        the epilogue, then its ji_mompost, send_back_std_and_staged_files: the job's output goes
        to its owner. exit_status: the job's, or the prologue's (HookRun.job_exit_status)."""
        self.set_state(job, "E")
        epilogue = self.epilogue(job, exit_status, session, alarm, argv)
        self.send_back_std_files(job, exit_status)
        if exit_status == JOB_EXEC_RETRY_PROLOGUE:
            self.set_state(job, "Q")  # req_jobobit.c, update_substate_from_exit_status: requeued
        else:
            self.set_state(job, "C", exit_status)
        return epilogue

    def send_back_std_files(self, job: Job, exit_status: int) -> list[Path]:
        """send_back_std_and_staged_files (src/resmom/requests.c): nothing for exit statuses
        JOB_EXEC_FAIL1..JOB_EXEC_RETRY (the job did not run); else each spool file copied as the
        job's owner with ``/bin/cp -rp`` (req_cpyfile, sys_copy) over whatever is at its path
        (a requeued attempt's), then removed; one that cannot be copied goes to
        PBS_HOME/undelivered (copy_and_process, copy_file_cleanup). The paths delivered."""
        if JOB_EXEC_RETRY <= exit_status <= JOB_EXEC_FAIL1:
            return []
        owner = job.owner
        delivered = []
        for spool, path in (
            (self.out_path(job), self.delivered_out_path(job)),
            (self.err_path(job), self.delivered_err_path(job)),
        ):
            if not spool.exists():
                continue
            copy = subprocess.run(
                ["/bin/cp", "-rp", str(spool), str(path)],
                capture_output=True,
                user=owner.pw_uid,
                group=owner.pw_gid,
                extra_groups=[],
            )
            if copy.returncode == 0:
                spool.unlink()
                delivered.append(path)
            else:
                spool.replace(self.undelivered / spool.name)
        return delivered

    # --- the job ---

    @staticmethod
    def login_shell_argv0(shell: str) -> str:
        """argv[0] of a plain node's job shell: its name after a '-', a login shell (start_exec.c,
        source_login_shells_or_not, with $source_login_batch true, the default)."""
        return "-" + shell.rsplit("/", 1)[-1]

    def job_environment(self, job: Job) -> dict[str, str]:
        owner = job.owner
        return {
            **job.variables,
            "HOME": owner.pw_dir,
            "USER": job.user,
            "LOGNAME": job.user,
            "SHELL": owner.pw_shell,
            "PATH": "/bin:/usr/bin",
            "PBS_JOBID": job.job_id,
            "PBS_JOBNAME": job.name,
            "PBS_QUEUE": job.queue,
            "PBS_ENVIRONMENT": "PBS_BATCH",
            "PBS_O_WORKDIR": self.workdir(job),
            "PBS_O_HOME": owner.pw_dir,
            "PBS_O_LOGNAME": job.user,
            "PBS_O_SHELL": owner.pw_shell,
            "PBS_O_HOST": self.host,
            "PBS_O_SERVER": self.server,
            "PBS_O_QUEUE": job.queue,
            "PBS_O_PATH": "/usr/local/bin:/usr/bin:/bin",
            "PBS_O_LANG": "C.UTF-8",
            "PBS_SERVER": self.server,
            "PBS_NODEFILE": str(self.nodefile(job)),
            "PBS_NODENUM": "0",
            "PBS_TASKNUM": "1",
            "PBS_VNODENUM": "0",
            "PBS_MOMPORT": "15003",
            "PBS_NP": str(job.ppn),
            "PBS_NUM_NODES": "1",
            "PBS_NUM_PPN": str(job.ppn),
            "PBS_WALLTIME": str(seconds(job.walltime)),
            "PBS_VERSION": f"TORQUE-{self.version}",
        }

    def start(self, job: Job, exec_with_exec: bool = False) -> RunningJob:
        """Start the job starter as the job's owner, as pbs_mom does."""
        if self.starter is None:
            raise RuntimeError("no $job_starter configured")
        owner = job.owner
        line = f"{self.script_path(job)}{' ' + job.args if job.args else ''}\n"
        if exec_with_exec:
            line = "exec " + line
        with open(self.out_path(job), "ab") as out, open(self.err_path(job), "ab") as err:
            process = subprocess.Popen(
                [str(self.starter), owner.pw_shell],
                cwd=owner.pw_dir,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                env=self.job_environment(job),
                user=owner.pw_uid,
                group=owner.pw_gid,
                extra_groups=[],
                start_new_session=True,
            )
        assert process.stdin is not None
        process.stdin.write(line.encode())
        process.stdin.close()
        return RunningJob(job, process)

    def run(self, job: Job, timeout: float = 120) -> tuple[HookRun, int | None, HookRun]:
        """The whole life of a job on this mom: prologue, job (if it may run), epilogue, output
        back to the owner. The status: the job's, or the prologue's (-2, -14) if it did not run."""
        self.receive(job)
        prologue = self.prologue(job)
        status = prologue.job_exit_status
        session = 0
        if status is None:
            running = self.start(job)
            session = running.session
            status = running.wait(timeout)
        epilogue = self.end(job, status, session)
        return prologue, status, epilogue
