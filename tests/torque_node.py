"""The Torque worker node of the tests: its job owners (real users of this machine), a pbs_mom
(tests/pbs_mom.py) with vmpool's hooks installed the way docs/torque.md tells a site to, and what
a job left on its VM. Shared by the tests of the hooks, of the pool's promises and by a benchmark.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, TRACEBACK, VMPOOL, PoolHandle
from tests.pbs_mom import Job, PbsMom, ensure_users

HOOKS = ROOT / "hooks"
USERS = ("vmpt-alice", "vmpt-bob")
CAROL = ("vmpt-carol", "vmpt-staff")  # user, primary group: gid != uid
BACKOFF = 2  # REQUEUE_BACKOFF in the tests (60 s by default)


@pytest.fixture(scope="session")
def job_users() -> tuple[str, ...]:
    """The non-root job owners on the worker node (this machine)."""
    ensure_users(USERS)
    return USERS


class Mom:
    """A pbs_mom with vmpool's hooks installed, on one test pool."""

    def __init__(self, root: Path, pool: PoolHandle, vmpool: str = VMPOOL, **settings: object):
        self.root = root
        self.pool = pool
        self.pbs_home = root / "torque"
        self.job_dir = root / "jobs"
        pool.write_config(pool={"job_records": str(self.job_dir)})  # where the hooks keep them: vmpool reads them
        self.pbs = PbsMom(
            self.pbs_home,
            starter=self.pbs_home / "mom_priv" / "vmpool" / "jobstarter",
            alarm=120,
            submit_dir=self.submit_dir,
        )
        settings = {
            "REQUEUE_BACKOFF": BACKOFF,
            "ACQUIRE_TIMEOUT": 60,
            "SSH_CONNECT_TIMEOUT": 3,
            "SCRUB_TIMEOUT": 20,
            "PREPARE_TIMEOUT": 20,
            "KILL_GRACE": 2,
            **settings,
        }
        # The way the README tells a site to install them.
        self.install = subprocess.run(
            [
                "make",
                "-s",
                "-C",
                str(ROOT),
                "install-hooks",
                f"PBS_HOME={self.pbs_home}",
                f"VMPOOL={vmpool}",
                f"VMPOOL_CONFIG={pool.config_path}",
                f"JOB_DIR={self.job_dir}",
                "HOOKS_SETTINGS=" + " ".join(f"{key}={value}" for key, value in settings.items()),
            ],
            capture_output=True,
            text=True,
            check=True,
        )

    def submit_dir(self, owner: pwd.struct_passwd) -> str:
        """Where the job's owner ran qsub: a directory of this test's own in the owner's home
        (others' test runs use the same users), created by the owner; its .o/.e and
        vmpool-<jobid>.log land there."""
        path = Path(owner.pw_dir) / self.root.name
        if not path.is_dir():
            subprocess.run(
                ["mkdir", "-p", str(path)], check=True, user=owner.pw_uid, group=owner.pw_gid, extra_groups=[]
            )
        return str(path)

    def told(self, job: Job) -> str:
        """What the prologue told the job's owner in PBS_O_WORKDIR/vmpool-<jobid>.log ('' if nothing)."""
        log = Path(self.pbs.workdir(job)) / f"vmpool-{job.job_id}.log"
        if not log.exists():
            return ""
        assert log.stat().st_uid == job.owner.pw_uid, "written as the job's owner, not root"
        return log.read_text()

    def vm_of(self, job: Job) -> dict:
        return next(vm for vm in self.pool.vms() if vm["job"] == job.job_id)

    def on_vm(self, vm: dict, *argv: str) -> tuple[int, str, str]:
        result: tuple[int, str, str] = self.pool.bed.vm_exec(vm["server_id"], list(argv))
        return result


@pytest.fixture
def mom(pool: PoolHandle, job_users: tuple[str, ...]) -> Iterator[Mom]:
    # Not below pytest's tmp_path: that is root-only, and the job owners must reach the starter.
    root = Path(tempfile.mkdtemp(prefix="vmpool-hooks-", dir="/tmp"))
    root.chmod(0o755)
    try:
        handle = Mom(root, pool)
        yield handle
        # a job owner reads the hooks' messages in the .e file and vmpool-<jobid>.log, an admin
        # in the spool: never a Python traceback
        submitted = [Path(entry.pw_dir) / root.name for entry in pwd.getpwall() if entry.pw_name in (*USERS, CAROL[0])]
        for err in sorted(
            [
                *handle.pbs.spool.glob("*.ER"),
                *handle.pbs.undelivered.glob("*"),
                *(
                    path
                    for directory in submitted
                    if directory.is_dir()
                    for path in directory.rglob("*")
                    if path.is_file()
                ),
            ]
        ):
            text = err.read_text(errors="replace")
            assert TRACEBACK not in text, f"{err}:\n{text}"
    finally:
        for entry in pwd.getpwall():
            if entry.pw_name in (*USERS, CAROL[0]):
                shutil.rmtree(Path(entry.pw_dir) / root.name, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def messages(mom: Mom, job: Job) -> str:
    """Every message about a job, wherever it is now (for an assertion's failure message)."""
    found = {"spool .ER": mom.pbs.err(job), "log": mom.told(job)}
    if mom.pbs.delivered_err_path(job).exists():
        found["delivered .e"] = mom.pbs.delivered_err(job)
    return "\n".join(f"{where}:\n{text}" for where, text in found.items() if text)


def user_traces(mom: Mom, vm: dict, user: str) -> list[str]:
    """Whatever of `user` is left on a VM: account, home, processes, files in the temp dirs."""
    uid = str(pwd.getpwnam(user).pw_uid)
    checks = {
        "account": ["getent", "passwd", user],
        "home": ["test", "-e", f"/home/{user}"],
        "processes": ["pgrep", "-U", uid],
        "files": ["sh", "-c", f"find /tmp /var/tmp /dev/shm -uid {uid} | grep ."],
    }
    return [what for what, argv in checks.items() if mom.on_vm(vm, *argv)[0] == 0]
