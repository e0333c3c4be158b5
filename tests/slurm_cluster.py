"""A real Slurm cluster on loopback, for vmpool's Slurm hooks: Debian 12's munged, slurmctld and
two slurmd (22.05), started and stopped by the test session: the pool's node `vmgw` (partition
`vmpool`) and an ordinary node `cn1` (partition `batch`, the default), as on a site where the pool
is one node among many.

Both slurmd run on this machine as `slurmd -N NAME`, each with its own `Port=` on its NodeName
line and its own spool, pid and log file (`%n` in slurm.conf): no namespace, no second address,
nothing that a 2-core machine pays for beyond one more idle daemon.

Everything lives below one directory (which job owners may traverse: they read slurm.conf and
reach munged's socket): a fresh munge key, munged's socket, slurmctld's state, slurmd's spool,
the logs, slurm.conf and job_submit.lua. The daemons run in the foreground (-D) as this process's
children, on ports picked free on 127.0.0.1; every address in slurm.conf is 127.0.0.1.

`SlurmCluster(proctrack="cgroup")` runs `ProctrackType=proctrack/cgroup` instead of
`proctrack/linuxproc`, as many sites do: cgroup.conf beside slurm.conf names the cgroup v1
hierarchy mounted under /sys/fs/cgroup (the freezer controller is what proctrack/cgroup needs) and
constrains nothing. `cgroup_v1_missing()` says why a machine cannot run it.

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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.conftest import wait_until

NODE = "vmgw"
PARTITION = "vmpool"
ORDINARY_NODE = "cn1"
ORDINARY_PARTITION = "batch"
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "salloc", "srun")


def missing() -> list[str]:
    """What of Slurm and munge is not installed on this machine (empty: all there)."""
    absent = [path for path in DAEMONS.values() if not os.access(path, os.X_OK)]
    return absent + [name for name in CLIENTS if shutil.which(name) is None]


CGROUP_ROOT = Path("/sys/fs/cgroup")
# proctrack/cgroup only: no cores, memory or devices constrained (TaskPlugin stays task/none).
CGROUP_CONF = """CgroupPlugin=cgroup/v1
CgroupMountpoint={root}
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainSwapSpace=no
ConstrainDevices=no
"""


def cgroup_v1_missing() -> str:
    """Why this machine cannot run proctrack/cgroup on cgroup v1 ("" when it seems able to):
    slurmd needs the freezer controller mounted, and root able to make cgroups there."""
    freezer = CGROUP_ROOT / "freezer"
    if not (freezer / "cgroup.procs").exists():
        return f"no cgroup v1 freezer controller mounted at {freezer}"
    if not os.access(freezer, os.W_OK):
        return f"{freezer} is not writable by this user (uid {os.getuid()})"
    return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


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
    """slurmctld + munged + two slurmd, under `root`: `vmgw` (partition `vmpool`, CPUs = the pool's
    max) and `cn1` (partition `batch`, the default, one CPU)."""

    def __init__(
        self,
        root: Path,
        cpus: int = 3,
        settings: dict[str, str] | None = None,
        job_submit_lua: str | None = None,
        proctrack: str = "linuxproc",
        node_size: str = "",
    ):
        self.root = Path(root)
        self.cpus = cpus
        # more of vmgw's NodeName line: "RealMemory=M Gres=gpu:N" (GresTypes and gres.conf follow)
        self.node_size = node_size
        self.proctrack = proctrack
        self.settings = dict(settings or {})
        self.job_submit_lua = job_submit_lua
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket.2"
        self.ctld_port = free_port()
        self.slurmd_ports = {NODE: free_port(), ORDINARY_NODE: free_port()}
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
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.socket}",
            "StateSaveLocation": f"{d}/ctld",
            "SlurmdSpoolDir": f"{d}/slurmd/%n",
            "SlurmctldPidFile": f"{d}/run/slurmctld.pid",
            "SlurmdPidFile": f"{d}/run/slurmd-%n.pid",
            "SlurmctldLogFile": f"{d}/log/slurmctld.log",
            "SlurmdLogFile": f"{d}/log/slurmd-%n.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": f"proctrack/{self.proctrack}",
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
        if "Gres=gpu:" in self.node_size:
            text += "GresTypes=gpu\n"
        for name, cpus, size in ((NODE, self.cpus, self.node_size), (ORDINARY_NODE, 1, "")):
            text += (
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.slurmd_ports[name]}"
                f" CPUs={cpus}{' ' + size if size else ''} State=UNKNOWN\n"
            )
        text += (
            f"PartitionName={ORDINARY_PARTITION} Nodes={ORDINARY_NODE} Default=YES MaxTime=INFINITE State=UP\n"
            f"PartitionName={PARTITION} Nodes={NODE} Default=NO MaxTime=INFINITE State=UP\n"
        )
        return text

    def write_files(self) -> None:
        for sub, mode in (
            ("", 0o755),
            ("etc", 0o755),
            ("munge", 0o755),
            ("ctld", 0o700),
            ("slurmd", 0o755),
            (f"slurmd/{NODE}", 0o755),
            (f"slurmd/{ORDINARY_NODE}", 0o755),
            ("run", 0o755),
            ("log", 0o700),
        ):
            path = self.root / sub
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(self.slurm_conf())
        self.conf.chmod(0o644)
        if self.proctrack == "cgroup":  # slurmd reads it beside slurm.conf
            cgroup_conf = self.conf.parent / "cgroup.conf"
            cgroup_conf.write_text(CGROUP_CONF.format(root=CGROUP_ROOT))
            cgroup_conf.chmod(0o644)
        if gpus := int(self.node_size.partition("Gres=gpu:")[2].split(" ")[0] or 0):
            # the node has no GPUs, its VMs have: gres.conf names empty files for Slurm to count
            # (as docs/slurm.md tells a site); a Prolog then sees SLURM_JOB_GPUS
            for index in range(gpus):
                (self.root / f"gpu{index}").touch()
            gres = self.conf.parent / "gres.conf"
            gres.write_text(f"NodeName={NODE} Name=gpu File={self.root}/gpu[0-{gpus - 1}]\n")
            gres.chmod(0o644)
        if self.job_submit_lua is not None:  # the lua plugin reads it beside slurm.conf
            lua = self.conf.parent / "job_submit.lua"
            lua.write_text(self.job_submit_lua)
            lua.chmod(0o644)

    # --- daemons ---

    def start(self, timeout: float = 60) -> SlurmCluster:
        self.write_files()
        d = self.root
        self._spawn(
            "munged",
            [
                "/usr/sbin/munged",
                "-F",
                "--force",
                f"--socket={self.socket}",
                f"--key-file={d}/munge.key",
                f"--pid-file={d}/run/munged.pid",
                f"--log-file={d}/log/munged.log",
                f"--seed-file={d}/munge/seed",
                "--num-threads=2",
            ],
        )
        wait_until(self.socket.exists, timeout, "munged's socket")
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        wait_until(
            lambda: self.scontrol("ping", check=False).stdout.find("is UP") >= 0,
            timeout,
            "slurmctld to answer `scontrol ping`",
        )
        for name in (NODE, ORDINARY_NODE):
            self._spawn(f"slurmd-{name}", ["/usr/sbin/slurmd", "-D", "-N", name, "-f", str(self.conf)])
        for name in (NODE, ORDINARY_NODE):
            self.wait_node_idle(timeout, name)
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115  (the daemon keeps it)
        self.procs[name] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env, start_new_session=True
        )
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

    def cgroup_errors(self) -> str:
        """slurmd's cgroup errors once a slurmd has exited ("" otherwise): why this machine cannot
        run proctrack/cgroup."""
        for name in (f"slurmd-{NODE}", f"slurmd-{ORDINARY_NODE}"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is None:
                continue
            lines = [line for line in self.log(name).splitlines() if "error" in line and "cgroup" in line.lower()]
            if lines:
                return f"{name} exited: " + "; ".join(dict.fromkeys(lines[-3:]))
        return ""

    def wait_node_idle(self, timeout: float = 60, name: str = NODE) -> None:
        def idle() -> bool:
            self._check_alive()
            return self.node(name).get("State", "").split("+")[0] == "IDLE"

        wait_until(idle, timeout, f"node {name} to be IDLE")

    def reconfigure(self, **settings: str) -> None:
        self.settings.update(settings)
        self.conf.write_text(self.slurm_conf())
        self.scontrol("reconfigure")

    def stop(self, timeout: float = 60) -> list[str]:
        """Cancel every job, wait until the node holds none, stop the daemons.
        Returns what is left behind (processes of this cluster), [] when clean."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", check=False)
            try:
                wait_until(
                    lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip(),
                    timeout,
                    "every job to end",
                )
                wait_until(
                    lambda: not [p for p in self.job_processes() if not p[1].startswith("slurmctld:")],
                    timeout,
                    "the jobs' processes to end",
                )
            except AssertionError:
                pass  # reported as leftovers below
        for name in (f"slurmd-{NODE}", f"slurmd-{ORDINARY_NODE}", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.proctrack == "cgroup":
            self.remove_empty_cgroups()
        left = [f"pid {pid}: {cmd}" for pid, cmd in self.job_processes()]
        for pid, _ in self.job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def remove_empty_cgroups(self) -> None:
        """slurmd leaves its cgroups behind (CONTROLLER/slurm_NODE/uid_N/job_N, empty): remove
        them, deepest first; one still holding a process stays."""
        for name in (NODE, ORDINARY_NODE):
            for top in CGROUP_ROOT.glob(f"*/slurm_{name}"):
                for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
                    try:
                        path.rmdir()
                    except OSError:
                        pass

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

    def run(
        self,
        *argv: str,
        check: bool = True,
        user: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if user is not None:
            import pwd

            owner = pwd.getpwnam(user)
            kwargs = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**self.env, **(env or {})},
            timeout=timeout,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("scontrol", *args, check=check)

    def node(self, name: str = NODE) -> dict[str, str]:
        result = self.scontrol("show", "node", name, check=False)
        return parse_record(result.stdout) if result.returncode == 0 else {}

    def freezer_cgroup(self, pid: int) -> str:
        """The cgroup v1 freezer group of process `pid` (where proctrack/cgroup tracks it)."""
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "freezer" in controllers.split(","):
                return path
        return ""

    def job(self, job_id: str) -> dict[str, str]:
        result = self.scontrol("show", "job", job_id, check=False)
        return parse_record(result.stdout) if result.returncode == 0 else {}

    def sbatch(
        self,
        user: str,
        script: str,
        args: Iterable[str] = (),
        options: Iterable[str] = (),
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
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
        result = self.run(
            "sbatch",
            "--parsable",
            *options,
            str(script_path),
            *args,
            user=user,
            cwd=cwd or owner.pw_dir,
            env={**base, **(env or {})},
        )
        return result.stdout.strip().split(";")[0]

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def wait_job(self, job_id: str, states: Iterable[str], timeout: float) -> dict[str, str]:
        wanted = set(states)

        def reached() -> dict[str, str] | None:
            self._check_alive()
            info = self.job(job_id)
            return info if info.get("JobState") in wanted else None

        return wait_until(reached, timeout, f"job {job_id} to reach {sorted(wanted)} (now: {self.job(job_id)})", 0.3)
