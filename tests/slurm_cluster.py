"""A real Slurm cluster of one node on loopback, for vmpool's Slurm hooks: Debian 12's munged,
slurmctld and slurmd (22.05), started and stopped by the test session.

Everything lives below one directory (which job owners may traverse: they read slurm.conf and
reach munged's socket): a fresh munge key, munged's socket, slurmctld's state, slurmd's spool,
the logs, slurm.conf and job_submit.lua. The daemons run in the foreground (-D) as this process's
children, on ports picked free on 127.0.0.1; every address in slurm.conf is 127.0.0.1.

`SlurmCluster.start()` waits (on conditions, with timeouts) until the node answers as idle;
`stop()` cancels what is left, waits for the jobs to end, stops the daemons and fails, naming
them, if any process started for this cluster is still alive (slurmstepd, job starters...).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

NODE = "vmgw"
PARTITION = "vmpool"
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "salloc", "srun")


def missing() -> list[str]:
    """What of Slurm and munge is not installed on this machine (empty: all there)."""
    absent = [path for path in DAEMONS.values() if not os.access(path, os.X_OK)]
    return absent + [name for name in CLIENTS if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# Keys whose value is free text (spaces, `=`...): scontrol prints each on a line of its own.
LINE_KEYS = ("AdminComment", "Comment", "Command", "WorkDir", "StdErr", "StdIn", "StdOut", "Reason")


def parse_record(text: str) -> dict[str, str]:
    """`scontrol show job|node ID` (the multi-line form) as a dict."""
    record: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        name, sep, value = line.partition("=")
        if sep and name in LINE_KEYS:
            record[name] = value.strip()
            continue
        key = ""
        for word in line.split(" "):
            name, sep, value = word.partition("=")
            if sep and name:
                key = name
                record[key] = value
            elif key and word:
                record[key] += " " + word
    return record


class SlurmCluster:
    """slurmctld + one slurmd (node `vmgw`, partition `vmpool`) + munged, under `root`."""

    def __init__(self, root: Path, cpus: int = 3, settings: dict[str, str] | None = None,
                 job_submit_lua: str | None = None):
        self.root = Path(root)
        self.cpus = cpus
        self.settings = dict(settings or {})
        self.job_submit_lua = job_submit_lua
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket.2"
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf)}

    # --- files ---

    def slurm_conf(self) -> str:
        host = socket.gethostname().split(".")[0]
        d = self.root
        lines = {
            "ClusterName": "vmpooltest",
            "SlurmctldHost": f"{host}(127.0.0.1)",
            "SlurmctldPort": str(self.ctld_port),
            "SlurmdPort": str(self.slurmd_port),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.socket}",
            "StateSaveLocation": f"{d}/ctld",
            "SlurmdSpoolDir": f"{d}/slurmd",
            "SlurmctldPidFile": f"{d}/run/slurmctld.pid",
            "SlurmdPidFile": f"{d}/run/slurmd.pid",
            "SlurmctldLogFile": f"{d}/log/slurmctld.log",
            "SlurmdLogFile": f"{d}/log/slurmd.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SwitchType": "switch/none",
            "MpiDefault": "none",
            "SchedulerType": "sched/builtin",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "MailProg": "/bin/true",
            "ReturnToService": "2",
            "MinJobAge": "3600",
            "InactiveLimit": "0",
            "SlurmdTimeout": "300",
            # The node advertises the pool's size, not this machine's cores.
            "SlurmdParameters": "config_overrides",
            # A test waits for a requeued job: schedule every 5 s rather than every 60 s.
            "SchedulerParameters": "sched_interval=5",
            **self.settings,
        }
        text = "".join(f"{key}={value}\n" for key, value in lines.items())
        text += (f"NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN\n"
                 f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n")
        return text

    def write_files(self) -> None:
        for sub, mode in (("", 0o755), ("etc", 0o755), ("munge", 0o755), ("ctld", 0o700), ("slurmd", 0o755),
                          ("run", 0o755), ("log", 0o700)):
            path = self.root / sub
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(self.slurm_conf())
        self.conf.chmod(0o644)
        if self.job_submit_lua is not None:  # the lua plugin reads it beside slurm.conf
            lua = self.conf.parent / "job_submit.lua"
            lua.write_text(self.job_submit_lua)
            lua.chmod(0o644)

    # --- daemons ---

    def start(self, timeout: float = 60) -> SlurmCluster:
        self.write_files()
        d = self.root
        self._spawn("munged", ["/usr/sbin/munged", "-F", "--force", f"--socket={self.socket}",
                               f"--key-file={d}/munge.key", f"--pid-file={d}/run/munged.pid",
                               f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge/seed", "--num-threads=2"])
        _wait(self.socket.exists, timeout, "munged's socket")
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        _wait(lambda: self.scontrol("ping", check=False).stdout.find("is UP") >= 0, timeout,
              "slurmctld to answer `scontrol ping`")
        self._spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
        self.wait_node_idle(timeout)
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115  (the daemon keeps it)
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env,
                                            start_new_session=True)
        out.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{self.log(name)[-3000:]}")

    def log(self, name: str) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.out"):
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def wait_node_idle(self, timeout: float = 60) -> None:
        def idle() -> bool:
            self._check_alive()
            return self.node().get("State", "").split("+")[0] == "IDLE"
        _wait(idle, timeout, f"node {NODE} to be IDLE")

    def reconfigure(self, **settings: str) -> None:
        self.settings.update(settings)
        self.conf.write_text(self.slurm_conf())
        self.scontrol("reconfigure")

    def stop(self, timeout: float = 60) -> list[str]:
        """Cancel every job, wait until the node holds none, stop the daemons.
        Returns what is left behind (processes of this cluster), [] when clean."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition", PARTITION, check=False)
            try:
                _wait(lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip(), timeout,
                      "every job to end")
                _wait(lambda: not [p for p in self.job_processes() if not p[1].startswith("slurmctld:")], timeout,
                      "the jobs' processes to end")
            except AssertionError:
                pass  # reported as leftovers below
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        left = [f"pid {pid}: {cmd}" for pid, cmd in self.job_processes()]
        for pid, _ in self.job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def job_processes(self) -> list[tuple[int, str]]:
        """Processes started for this cluster (they carry its SLURM_CONF): slurmstepd, job starters."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in {p.pid for p in self.procs.values()}:
                continue
            try:
                environ = (entry / "environ").read_bytes()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if marker in environ.split(b"\0") and cmdline:
                found.append((int(entry.name), cmdline))
        return found

    # --- commands ---

    def run(self, *argv: str, check: bool = True, user: str | None = None, cwd: str | None = None,
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if user is not None:
            import pwd
            owner = pwd.getpwnam(user)
            kwargs = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        result = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=cwd,
                                env={**self.env, **(env or {})}, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("scontrol", *args, check=check)

    def node(self) -> dict[str, str]:
        result = self.scontrol("show", "node", NODE, check=False)
        return parse_record(result.stdout) if result.returncode == 0 else {}

    def job(self, job_id: str) -> dict[str, str]:
        result = self.scontrol("show", "job", job_id, check=False)
        return parse_record(result.stdout) if result.returncode == 0 else {}

    def sbatch(self, user: str, script: str, args: Iterable[str] = (), options: Iterable[str] = (),
               cwd: str | None = None, env: dict[str, str] | None = None) -> str:
        """Submit as `user` from `cwd` (default: the user's home) with `env` added to a plain
        login-like environment; the script travels on stdin when it has no path. Returns the job id."""
        import pwd
        owner = pwd.getpwnam(user)
        base = {"HOME": owner.pw_dir, "USER": user, "LOGNAME": user, "SHELL": owner.pw_shell}
        script_path = Path(self.root) / "scripts" / f"{user}-{time.monotonic_ns()}.sh"
        script_path.parent.mkdir(exist_ok=True, mode=0o755)
        script_path.parent.chmod(0o755)
        script_path.write_text(script)
        script_path.chmod(0o644)
        result = self.run("sbatch", "--parsable", *options, str(script_path), *args, user=user,
                          cwd=cwd or owner.pw_dir, env={**base, **(env or {})})
        return result.stdout.strip().split(";")[0]

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def wait_job(self, job_id: str, states: Iterable[str], timeout: float) -> dict[str, str]:
        wanted = set(states)

        def reached() -> dict[str, str] | None:
            self._check_alive()
            info = self.job(job_id)
            return info if info.get("JobState") in wanted else None
        return _wait(reached, timeout, f"job {job_id} to reach {sorted(wanted)} (now: {self.job(job_id)})", 0.3)
