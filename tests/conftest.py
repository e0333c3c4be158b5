"""Fixtures over the real parts: the local cloud (Keystone + Nova API over HTTP), sshd VMs, the CLI.

`bed` starts the local cloud once per session. `pool` gives each test its own pool on it: its own
name (servers of other tests are not its servers: the pool tag differs), state file and config;
its finalizer deletes every server the pool left and waits until the cloud says they are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT: Path = Path(__file__).resolve().parent.parent
VMPOOL: str = str(Path(sys.executable).parent / "vmpool")


TRACEBACK: str = "Traceback (most recent call last)"


def pinned_hosts(known_hosts: str | Path) -> set[str]:
    """The hosts a known_hosts file pins a key for (whole fields: 127.0.1.2 is not 127.0.1.20)."""
    path = Path(known_hosts)
    return {line.split(" ", 1)[0] for line in path.read_text().splitlines() if line} if path.exists() else set()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll a condition until it holds (returning its value) or fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


LONG_GROUPS = ("torque-node", "slurm")  # minutes of jobs each, on one worker


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long ones first: the tests of one machine-wide node (an xdist_group, which one worker
    runs one after another) and the `slow` ones start while the short ones fill the other workers,
    rather than running alone at the end."""

    def long_first(item: pytest.Item) -> int:
        group = item.get_closest_marker("xdist_group")
        return 0 if item.get_closest_marker("slow") or (group and group.args[0] in LONG_GROUPS) else 1

    items.sort(key=long_first)


@pytest.fixture(scope="session")
def bed() -> Iterator[Any]:
    from tests.cloud.bed import Bed, leftovers

    run_dir = tempfile.mkdtemp(prefix="vmpool-bed-")
    try:
        started = Bed.start(run_dir)
        try:
            yield started
        finally:
            started.stop()
        left = leftovers(Path(run_dir))
        assert not left, "the test bed left behind:\n" + "\n".join(left)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


class PoolHandle:
    """One test's pool on the bed: its config file, CLI runner and views of state and cloud."""

    def __init__(self, bed: Any, directory: Path, name: str):
        self.bed = bed
        self.dir = directory
        self.name = name
        self.config_path = str(directory / "vmpool.conf")
        self.state_file = str(directory / "state" / "state.json")
        self.known_hosts = str(directory / "state" / "known_hosts")
        self.key = str(directory / "id_pool")
        self.spawned: list[subprocess.Popen[str]] = []
        shutil.copy(bed.info["ssh_private_key"], self.key)
        os.chmod(self.key, 0o600)
        bed_config = bed.vmpool_sections()
        self.settings: dict[str, dict[str, Any]] = {
            "pool": dict(
                name=name,
                min=0,
                max=3,
                min_free=0,
                state_file=self.state_file,
                log_file=str(directory / "vmpool.log"),
                lock_timeout=20,
                build_timeout=60,
                ready_timeout=30,
                unusable_timeout=30,
                idle_timeout=600,
                delete_timeout=30,
                create_grace=30,
                acquire_timeout=90,
                acquire_poll=0.2,
                pass_interval=0.5,
                protect_after_failures=3,
                backoff_initial=5,
                backoff_max=20,
                job_records=str(directory / "jobs"),
            ),
            "openstack": {**bed_config["openstack"], "api_timeout": 15},
            "ssh": {
                **bed_config["ssh"],
                "private_key": self.key,
                "connect_timeout": 3,
                "banner_timeout": 3,
                "auth_timeout": 3,
                "command_timeout": 10,
                "known_hosts": self.known_hosts,
            },
            # no batch system on this machine: a test that wants one points [batch] command at a stand-in
            "batch": {"system": "none"},
        }
        self.write_config()

    def write_config(self, **sections: dict[str, Any]) -> None:
        for section, values in sections.items():
            self.settings[section].update(values)
        lines = []
        for section, values in self.settings.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {value}" for key, value in values.items()]
            lines.append("")
        Path(self.config_path).write_text("\n".join(lines))
        os.chmod(self.config_path, 0o600)

    @property
    def prefix(self) -> str:
        return f"{self.name}-"

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 180,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [VMPOOL, "--config", self.config_path, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        # whatever went wrong, an admin (or cron's mail) gets vmpool's message, never a traceback
        assert TRACEBACK not in result.stderr, f"vmpool {' '.join(args)} printed a traceback:\n{result.stderr}"
        if check and result.returncode != 0:
            raise AssertionError(f"vmpool {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def run_in_process(
        self, *args: str, modules: tuple[str, ...]
    ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
        """A vmpool command through vmpool.main in a fresh interpreter; which of `modules` it imported
        (the fast path must not import the cloud's or SSH's clients). Its output, without that line."""
        code = (
            "import json, sys, vmpool; rc = vmpool.main(['--config', sys.argv[1], *json.loads(sys.argv[2])]); "
            "print('IMPORTED', json.dumps([m for m in json.loads(sys.argv[3]) if m in sys.modules])); sys.exit(rc)"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, self.config_path, json.dumps(args), json.dumps(modules)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = result.stdout.splitlines()
        imported = json.loads(lines.pop()[len("IMPORTED ") :]) if lines and lines[-1].startswith("IMPORTED ") else None
        assert imported is not None, f"vmpool {' '.join(args)} ended before reporting its imports:\n{result.stderr}"
        result.stdout = "".join(line + "\n" for line in lines)
        return result, imported

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        """A vmpool command in the background; the fixture kills it if the test left it running."""
        proc = subprocess.Popen(
            [VMPOOL, "--config", self.config_path, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        self.spawned.append(proc)
        return proc

    def stop_spawned(self) -> None:
        """Kill what a failed test left running (waiting acquires would go on booting servers)."""
        for proc in self.spawned:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("status", "--json").stdout)
        return data

    def vms(self, state: str | None = None) -> list[dict[str, Any]]:
        return [vm for vm in self.status()["vms"] if state is None or vm["state"] == state]

    def pinned_hosts(self) -> set[str]:
        return pinned_hosts(self.known_hosts)

    def give_new_host_keys(self, server_id: str) -> list[str]:
        """Play a rebuilt (or impersonated) VM: new host keys, sshd restarted with them; their base64."""
        regenerate = (
            "for t in ecdsa ed25519 rsa; do rm -f /etc/ssh/ssh_host_${t}_key*; "
            "ssh-keygen -q -t $t -N '' -f /etc/ssh/ssh_host_${t}_key; done; "
            "cat /etc/ssh/ssh_host_*_key.pub"
        )
        rc, out, err = self.bed.vm_exec(server_id, ["sh", "-c", regenerate])
        assert rc == 0, err
        self.bed.vm_fault(server_id, "refuse")  # stops sshd ...
        self.bed.vm_fault(server_id, "ok")  # ... and starts it again, with the new keys
        return [line.split()[1] for line in out.splitlines()]

    def servers(self) -> list[Any]:
        """This pool's servers as the cloud lists them (admin view, any tag), each once: novaclient's
        paging (limit=-1) lists a server twice when it leaves its build request between two pages."""
        listed = self.bed.admin_nova().servers.list(search_opts={"all_tenants": True}, limit=-1)
        return list({s.id: s for s in listed if s.metadata.get("vmpool_pool") == self.name}.values())

    def fill(self, count: int) -> list[dict[str, Any]]:
        """The pool at min = max = count, every VM Free: its Free VMs as status shows them."""
        self.write_config(pool={"min": count, "max": count})
        free: list[dict[str, Any]] = self.reconcile_until(
            lambda: len(self.vms("free")) == count and self.vms("free"), 120, f"{count} Free VMs"
        )
        return free

    def reconcile_until(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Run reconcile passes (as cron would, only faster) until the condition holds."""

        def step() -> Any:
            self.run("reconcile")
            return condition()

        return wait_until(step, timeout, what, interval=0.3)

    def delete_everything(self) -> None:
        nova = self.bed.admin_nova()

        def gone() -> bool:
            servers = self.servers()  # listed again each time: a late create is deleted too
            for server in servers:
                if getattr(server, "OS-EXT-STS:task_state", None) != "deleting":
                    with contextlib.suppress(Exception):  # already gone, or busy: next round
                        nova.servers.delete(server.id)
            return not servers

        wait_until(gone, 120, f"servers of pool {self.name} to be gone", interval=0.5)
        # a pool that ended starved leaves its demand signal: every later pool on this bed would give
        # way to it (no spares) — a gone pool's signal is gone with it
        from vmpool import DEMAND_GROUP_PREFIX

        for group in nova.server_groups.list(all_projects=True):
            if group.name == DEMAND_GROUP_PREFIX + self.name:
                with contextlib.suppress(Exception):
                    nova.server_groups.delete(group.id)


@pytest.fixture
def pool(bed: Any, tmp_path: Path) -> Iterator[PoolHandle]:
    handle = PoolHandle(bed, tmp_path, f"t{uuid.uuid4().hex[:6]}")
    try:
        yield handle
    finally:
        handle.stop_spawned()
        bed.clear_behaviours()
        bed.clear_faults()
        handle.delete_everything()


# The Torque node's fixtures (job_users, mom) for every test module that runs jobs through the
# hooks; imported last, as torque_node builds on this module's PoolHandle.
from tests.torque_node import job_users, mom  # noqa: E402, F401
from tests.vm_classes import flavors  # noqa: E402, F401  (the bed's class flavors, for test_classes and test_slurm)
