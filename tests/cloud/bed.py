"""vmpool's local OpenStack test bed: orchestrator and client library.

Runs in vmpool's venv (``.venv``: stdlib + python-novaclient + keystoneauth1).
:meth:`Bed.start` starts, as subprocesses,

* ``keystone_setup.py`` -- a real Keystone (cloud venv), bootstrapped;
* ``novaserver.py``     -- a real Nova API/conductor/scheduler/compute with
  placement (cloud venv); its "hypervisor" boots namespace sshd VMs (vms.py);
* ``proxy.py``          -- the fault-injecting proxy in front of both; the
  Keystone catalog points at it, so everything vmpool does goes through it.

Every child gets a parent-death signal and its own process group, so a killed
test run leaves nothing behind.  See README.md.

CLI::

    python tests/cloud/bed.py up RUN_DIR [--foreground] [--token-expiration N]
                                         [--spawn-delay S]
    python tests/cloud/bed.py down RUN_DIR
    python tests/cloud/bed.py config RUN_DIR      # print the vmpool config again
"""

from __future__ import annotations

import argparse
import base64
import configparser
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CLOUD_PYTHON = os.environ.get("VMPOOL_CLOUD_PYTHON", str(REPO / ".cloud-venv" / "bin" / "python"))
NOVA_MICROVERSION = "2.96"
REGION = "RegionOne"
KEY_NAME = "vmpool-bed"

_PR_SET_PDEATHSIG = 1


class BedError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup(parent_pid: int, sig: int):
    """preexec_fn: die with the parent (thread) that started us."""

    def fn():
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except Exception:
            pass
        if os.getppid() != parent_pid:  # parent died before prctl
            os._exit(1)

    return fn


def _http(method: str, url: str, body=None, timeout: float = 60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else {}
    except urllib.error.HTTPError as e:
        detail = e.read()[:2000].decode(errors="replace")
        raise BedError(f"{method} {url} -> {e.code}: {detail}") from None


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except FileNotFoundError:
        return ""


class Bed:
    """A running test bed; see :meth:`start`.  Thread-safe client methods."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        self.info: dict = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self._admin_nova = None
        self._stopped = False

    # ------------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        run_dir,
        *,
        token_expiration: int = 3600,
        default_spawn_delay: float = 0.3,
        timeout: float = 300,
        cells: int = 1,
    ) -> Bed:
        """Start keystone, nova and the proxy in RUN_DIR; return once all are ready.

        cells: nova's compute cells, one compute host each; new servers go to cell1 only until
        set_cell opens another.

        Must be called from a thread that lives as long as the bed (the
        children's parent-death signal is tied to it), e.g. the main thread.
        """
        for attempt in range(3):
            bed = cls(run_dir)
            try:
                bed._start(token_expiration, default_spawn_delay, timeout, cells)
                return bed
            except BedError as e:
                bed.stop()
                # a free port picked here was taken by someone else before the child bound it
                if "Address already in use" not in str(e) or attempt == 2:
                    raise
            except BaseException:  # a test runner's timeout, ^C: say where the start stood
                print(bed._start_report(), file=sys.stderr)
                bed.stop()
                raise
        raise AssertionError("unreachable")

    def _spawn(self, name: str, argv: list[str], sig: int = signal.SIGTERM) -> subprocess.Popen:
        out = open(self.run_dir / f"{name}.out", "ab")  # noqa: SIM115 (handed to the child)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONWARNINGS"] = "ignore"
        for v in ("OS_CLOUD", "OS_AUTH_URL", "OS_PASSWORD", "OS_USERNAME", "OS_TOKEN"):
            env.pop(v, None)
        try:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.run_dir),
                env=env,
                start_new_session=True,
                preexec_fn=_child_setup(os.getpid(), sig),
            )
        finally:
            out.close()
        self.procs[name] = p
        (self.run_dir / f"{name}.pid").write_text(str(p.pid))
        return p

    def _check_alive(self):
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise BedError(
                    "{} exited with {} during start; last output:\n{}".format(
                        name, p.returncode, _tail(self.run_dir / f"{name}.out")
                    )
                )

    def _wait_file(self, path: Path, deadline: float) -> dict:
        while True:
            if path.exists():
                return json.loads(path.read_text())
            self._check_alive()
            if time.monotonic() > deadline:
                raise BedError(f"timed out waiting for {path}\n{self._start_report()}")
            time.sleep(0.1)

    def _start_report(self) -> str:
        """Each process of a start that did not finish: running or not, and its last output (the
        run dir, with the full logs, is removed with the bed)."""
        parts = []
        for name, p in self.procs.items():
            state = "running" if p.poll() is None else f"exited {p.returncode}"
            parts.append(f"--- {name} (pid {p.pid}, {state}), last output:\n{_tail(self.run_dir / f'{name}.out')}")
        return "bed start did not finish:\n" + "\n".join(parts)

    def _start(self, token_expiration, default_spawn_delay, timeout, cells=1):
        t0 = time.monotonic()
        deadline = t0 + timeout
        if not Path(CLOUD_PYTHON).exists():
            raise BedError(f"cloud venv python {CLOUD_PYTHON} missing: run `make cloud-venv`")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for f in ("keystone.json", "nova.json", "bed.json"):
            (self.run_dir / f).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "keystone", ignore_errors=True)
        shutil.rmtree(self.run_dir / "nova-tmp", ignore_errors=True)
        self._cleanup_vms()  # stale VMs of an earlier bed in this run dir
        shutil.rmtree(self.run_dir / "vms", ignore_errors=True)

        ports = {
            k: _free_port()
            for k in ("keystone", "nova", "nova_control", "proxy_keystone", "proxy_nova", "proxy_control")
        }
        while len(set(ports.values())) != len(ports):
            ports = {k: _free_port() for k in ports}
        self.ports = ports
        # (token_urlsafe may start with "-": argparse would take it for an option)
        admin_password = "pw" + secrets.token_urlsafe(16)
        user_password = "pw" + secrets.token_urlsafe(16)
        keystone_direct = f"http://127.0.0.1:{ports['keystone']}/v3"
        keystone_public = f"http://127.0.0.1:{ports['proxy_keystone']}/v3"
        nova_direct = f"http://127.0.0.1:{ports['nova']}/v2.1"
        compute_public = f"http://127.0.0.1:{ports['proxy_nova']}/v2.1"

        key = self.run_dir / "id_ed25519"
        for stale in (key, key.with_suffix(".pub")):
            stale.unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmpool-bed", "-f", str(key)],
            check=True,
            stdin=subprocess.DEVNULL,
        )

        self._spawn(
            "proxy",
            [
                sys.executable,
                str(HERE / "proxy.py"),
                "--control-port",
                str(ports["proxy_control"]),
                "--service",
                f"nova:{ports['proxy_nova']}:{ports['nova']}",
                "--service",
                f"keystone:{ports['proxy_keystone']}:{ports['keystone']}",
            ],
        )
        self._spawn(
            "keystone",
            [
                CLOUD_PYTHON,
                "-W",
                "ignore",
                str(HERE / "keystone_setup.py"),
                "--run-dir",
                str(self.run_dir),
                "--port",
                str(ports["keystone"]),
                "--public-url",
                keystone_public,
                "--compute-url",
                compute_public,
                f"--admin-password={admin_password}",
                f"--user-password={user_password}",
                "--token-expiration",
                str(int(token_expiration)),
            ],
        )
        self._spawn(
            "nova",
            [
                CLOUD_PYTHON,
                "-W",
                "ignore",
                str(HERE / "novaserver.py"),
                "--run-dir",
                str(self.run_dir),
                "--port",
                str(ports["nova"]),
                "--control-port",
                str(ports["nova_control"]),
                "--keystone-url",
                keystone_direct,
                "--keystone-public-url",
                keystone_public,
                f"--admin-password={admin_password}",
                "--default-spawn-delay",
                str(default_spawn_delay),
                "--cells",
                str(cells),
            ],
        )
        nova = self._wait_file(self.run_dir / "nova.json", deadline)
        self.timings["nova_ready"] = time.monotonic() - t0
        ks = self._wait_file(self.run_dir / "keystone.json", deadline)
        self.timings["keystone_ready"] = time.monotonic() - t0
        while True:
            try:
                _http("GET", f"http://127.0.0.1:{ports['proxy_control']}/health", timeout=5)
                break
            except (OSError, BedError):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

        self.info = {
            "auth_url": keystone_public,
            "username": "vmpool",
            "password": user_password,
            "project_name": "vmpool",
            "project_id": ks["project_id"],
            "user_domain_name": "Default",
            "project_domain_name": "Default",
            "application_credential_id": ks["application_credential_id"],
            "application_credential_secret": ks["application_credential_secret"],
            "region_name": REGION,
            "image_id": nova["image_id"],
            "flavor_id": nova["flavor_id"],
            "flavor_too_big_id": nova["flavor_too_big_id"],
            "network_id": nova["network_id"],
            "subnet": nova["subnet"],
            "key_name": KEY_NAME,
            "ssh_private_key": str(key),
            "ssh_public_key": key.with_suffix(".pub").read_text().strip(),
            "compute_url": compute_public,
            "nova_microversion": NOVA_MICROVERSION,
            "token_expiration": int(token_expiration),
            "admin_auth_url": keystone_direct,
            "admin_username": "admin",
            "admin_password": admin_password,
            "admin_project_name": "admin",
            "admin_user_domain_name": "Default",
            "admin_project_domain_name": "Default",
            "admin_compute_url": nova_direct,
            "keystone_url": keystone_direct,
            "nova_url": nova_direct,
            "nova_control_url": f"http://127.0.0.1:{ports['nova_control']}",
            "proxy_control_url": f"http://127.0.0.1:{ports['proxy_control']}",
            "run_dir": str(self.run_dir),
        }
        # the key pair belongs to the vmpool user (key pairs are per user)
        user_nova = self.nova()
        user_nova.keypairs.create(KEY_NAME, public_key=self.info["ssh_public_key"])
        # first API call through the whole stack done: counters start clean
        self.reset_counts()
        self.timings["ready"] = time.monotonic() - t0
        self.info["start_seconds"] = round(self.timings["ready"], 1)
        tmp = self.run_dir / "bed.json.tmp"
        tmp.write_text(json.dumps(self.info, indent=2))
        os.chmod(tmp, 0o600)
        tmp.rename(self.run_dir / "bed.json")

    # ------------------------------------------------------------------ stop

    def stop(self):
        """Stop nova (and its VMs), keystone and the proxy; remove stale VMs and fault rules."""
        if self._stopped:
            return
        self._stopped = True
        for name in ("nova", "keystone", "proxy"):
            p = self.procs.get(name)
            if p is None:
                continue
            _stop_group(p.pid, lambda p=p: p.poll() is not None)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)
        self._cleanup_vms()
        (self.run_dir / "bed.json").unlink(missing_ok=True)

    def _cleanup_vms(self):
        _cleanup_vms(self.run_dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ clients

    def session(self, *, admin: bool = False, application_credential: bool = False):
        """A keystoneauth1 session as the vmpool user (through the proxy) or as admin (direct)."""
        from keystoneauth1 import session as ks_session
        from keystoneauth1.identity import v3

        i = self.info
        auth: Any
        if admin:
            auth = v3.Password(
                auth_url=i["admin_auth_url"],
                username=i["admin_username"],
                password=i["admin_password"],
                project_name=i["admin_project_name"],
                user_domain_name="Default",
                project_domain_name="Default",
            )
        elif application_credential:
            auth = v3.ApplicationCredential(
                auth_url=i["auth_url"],
                application_credential_id=i["application_credential_id"],
                application_credential_secret=i["application_credential_secret"],
            )
        else:
            auth = v3.Password(
                auth_url=i["auth_url"],
                username=i["username"],
                password=i["password"],
                project_name=i["project_name"],
                user_domain_name=i["user_domain_name"],
                project_domain_name=i["project_domain_name"],
            )
        return ks_session.Session(auth=auth, timeout=60)

    def nova(self, *, application_credential: bool = False, version: str = NOVA_MICROVERSION):
        """novaclient as the vmpool user, through the proxy (catalog endpoint)."""
        from novaclient import client as nova_client

        return nova_client.Client(
            version,
            session=self.session(application_credential=application_credential),
            region_name=self.info["region_name"],
        )

    def admin_nova(self):
        """novaclient as admin, straight to nova (no proxy faults, not counted); all_tenants usable."""
        if self._admin_nova is None:
            from novaclient import client as nova_client

            self._admin_nova = nova_client.Client(
                NOVA_MICROVERSION,
                session=self.session(admin=True),
                endpoint_override=self.info["admin_compute_url"],
                region_name=self.info["region_name"],
            )
        return self._admin_nova

    def set_quota(self, project_id: str | None = None, **kw):
        """Nova quota for the vmpool project (e.g. instances=2); returns the new quota set."""
        qs = self.admin_nova().quotas.update(project_id or self.info["project_id"], **kw)
        return qs.to_dict()

    def set_ports_left(self, ports_left: int | None):
        """Neutron's port quota: room for this many more ports (None: unlimited). At 0, Nova refuses a
        create with 403 "Maximum number of ports exceeded"."""
        return self._nctl("PUT", "/ports-left", {"ports_left": ports_left})

    def delete_all_servers(self, timeout: float = 120):
        """Delete every server (all projects) and wait until they are gone."""
        nova = self.admin_nova()
        from novaclient import exceptions as nexc

        deadline = time.monotonic() + timeout
        asked = set()
        while True:
            servers = nova.servers.list(search_opts={"all_tenants": 1})
            if not servers:
                return
            for s in servers:
                if s.id not in asked or getattr(s, "OS-EXT-STS:task_state", None) != "deleting":
                    try:
                        s.delete()
                    except nexc.NotFound:
                        pass
                    except nexc.Conflict:
                        continue
                    asked.add(s.id)
            if time.monotonic() > deadline:
                raise BedError(f"servers not gone after {timeout}s: {[s.id for s in servers]}")
            time.sleep(0.3)

    # ------------------------------------------------------------------ nova control

    def _nctl(self, method, path, body=None, timeout=60):
        return _http(method, self.info["nova_control_url"] + path, body, timeout=timeout)

    def set_behaviour(
        self,
        name_regex: str,
        *,
        spawn_delay: float | None = None,
        error: bool = False,
        sshd_delay: float | None = None,
        destroy_delay: float | None = None,
        flavor: str | None = None,
    ):
        """Hypervisor behaviour for servers whose name matches (re.search) name_regex (and, given
        flavor, of that flavor ID); newest rule wins.

        spawn_delay: seconds in BUILD; error: spawn fails -> ERROR; sshd_delay: ACTIVE at once,
        sshd answers only that many seconds later; destroy_delay: a delete keeps the server (and its
        VM) with task_state "deleting" that many seconds before it is gone.
        """
        return self._nctl(
            "POST",
            "/behaviours",
            {
                "name_regex": name_regex,
                "spawn_delay": spawn_delay,
                "error": bool(error),
                "sshd_delay": sshd_delay,
                "destroy_delay": destroy_delay,
                "flavor": flavor,
            },
        )

    def set_default_behaviour(
        self, *, spawn_delay: float | None = None, error: bool | None = None, sshd_delay: float | None = None
    ):
        return self._nctl(
            "PUT", "/behaviours/default", {"spawn_delay": spawn_delay, "error": error, "sshd_delay": sshd_delay}
        )

    def clear_behaviours(self):
        return self._nctl("DELETE", "/behaviours")

    def behaviours(self) -> dict:
        return self._nctl("GET", "/behaviours")

    def vm_fault(self, server_id: str, mode: str):
        """ok | refuse | hang | drop for the server's stand-in VM."""
        return self._nctl("POST", f"/vms/{server_id}/fault", {"mode": mode})

    def vm_exec(
        self, server_id: str, argv: list[str], input: bytes | str | None = None, timeout: float = 30
    ) -> tuple[int, str, str]:
        """Run argv as root inside the server's VM (not over SSH); returns (rc, stdout, stderr) as str."""
        if isinstance(input, str):
            input = input.encode()
        r = self._nctl(
            "POST",
            f"/vms/{server_id}/exec",
            {
                "argv": list(argv),
                "timeout": timeout,
                "input_b64": base64.b64encode(input).decode() if input is not None else None,
            },
            timeout=timeout + 30,
        )
        return (
            r["rc"],
            base64.b64decode(r["stdout_b64"]).decode(errors="replace"),
            base64.b64decode(r["stderr_b64"]).decode(errors="replace"),
        )

    def cells(self) -> list[dict]:
        """Nova's compute cells: [{"name": "cell1", "uuid", "down", "accepts", "servers": [ids]}, ...]."""
        return self._nctl("GET", "/cells")["cells"]

    def set_cell(self, name: str, *, down: bool | None = None, accepts: bool | None = None) -> dict:
        """down: nova-api, conductor and scheduler cannot reach the cell's database (nova's
        DownCellFixture); its VMs go on running. accepts: its compute hosts take new servers."""
        return self._nctl("PUT", f"/cells/{name}", {"down": down, "accepts": accepts})

    def vm_running(self, server_id: str) -> bool:
        return self._nctl("GET", f"/vms/{server_id}/state")["running"]

    def vms(self) -> list[dict]:
        return self._nctl("GET", "/vms")["vms"]

    # ------------------------------------------------------------------ proxy control

    def _pctl(self, method, path, body=None):
        return _http(method, self.info["proxy_control_url"] + path, body)

    def set_api_max_limit(self, max_limit: int) -> dict:
        """Nova's [api] max_limit: servers per listing page (a client that reads one page misses the rest)."""
        return self._nctl("PUT", "/api-max-limit", {"max_limit": max_limit})

    def add_fault(
        self,
        service: str,
        method: str,
        path_regex: str,
        action: str,
        *,
        status: int = 500,
        delay: float = 0,
        times: int | None = None,
        hide_regex: str = "",
        message: str = "",
        headers: dict[str, str] | None = None,
    ) -> dict:
        """Proxy rule: service nova|keystone|*, method or *, action status|reset|delay|swallow|hide.

        status: Nova's fault body with `message` (default "fault injected by the bed proxy") and the
        answer's extra `headers` (e.g. {"Retry-After": "30"}).
        hide: forward, then drop the servers whose name matches hide_regex from a listing's answer.
        """
        return self._pctl(
            "POST",
            "/faults",
            {
                "service": service,
                "method": method,
                "path_regex": path_regex,
                "action": action,
                "status": status,
                "delay": delay,
                "times": times,
                "hide_regex": hide_regex,
                "message": message,
                "headers": headers or {},
            },
        )

    def clear_faults(self):
        return self._pctl("DELETE", "/faults")

    def faults(self) -> list[dict]:
        return self._pctl("GET", "/faults")["faults"]

    def counts(self) -> dict[str, int]:
        """Requests seen by the proxy: {"nova GET /v2.1/servers/{id}": n, ...}."""
        return self._pctl("GET", "/counts")

    def reset_counts(self):
        self._pctl("DELETE", "/counts")

    # ------------------------------------------------------------------ config

    def config_snippet(self) -> str:
        return config_snippet(self.info)

    def vmpool_sections(self) -> dict[str, dict[str, str]]:
        """config_snippet() as {section: {key: value}}: for a config that adds its [pool] and overrides."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(self.config_snippet())
        return {name: dict(parser[name]) for name in parser.sections()}


def config_snippet(i: dict) -> str:
    """The [openstack] and [ssh] sections of a vmpool.conf for this bed (see vmpool.conf.example)."""
    return f"""\
# vmpool config for the local test bed in {i["run_dir"]}
[openstack]
auth_url = {i["auth_url"]}
username = {i["username"]}
password = {i["password"]}
user_domain_name = {i["user_domain_name"]}
project_name = {i["project_name"]}
project_domain_name = {i["project_domain_name"]}
# or, instead of username + password (leave those empty then):
# application_credential_id = {i["application_credential_id"]}
# application_credential_secret = {i["application_credential_secret"]}
region_name = {i["region_name"]}
interface = public
image = {i["image_id"]}
flavor = {i["flavor_id"]}
network = {i["network_id"]}
key_name = {i["key_name"]}

[ssh]
user = root
private_key = {i["ssh_private_key"]}
port = 22
known_hosts = {i["run_dir"]}/known_hosts

# admin (straight to keystone/nova, bypasses the fault proxy): auth_url {i["admin_auth_url"]},
# user {i["admin_username"]}, project {i["admin_project_name"]}; its password: admin_password in
# {i["run_dir"]}/bed.json
"""


# ---------------------------------------------------------------------- helpers


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def _stop_group(pid: int, done=None, grace: float = 10.0):
    """SIGTERM the process group led by pid, then SIGKILL it after `grace` seconds."""
    done = done or (lambda: not _pid_alive(pid))
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if done():
            break
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever is left in the group
    except ProcessLookupError:
        pass


def _vms_module():
    """tests/cloud/vms.py, whether this file runs as tests.cloud.bed or as a script."""
    sys.path.insert(0, str(HERE))
    try:
        import vms
    finally:
        sys.path.pop(0)
    return vms


def _cleanup_vms(run_dir: Path):
    """Kill VMs left by a nova that died hard and remove their iptables rules."""
    vms_dir = Path(run_dir) / "vms"
    if not vms_dir.is_dir():
        return
    vms_mod = _vms_module()
    for d in vms_dir.iterdir():
        if d.is_dir():
            try:
                vms_mod._stop_from_state(d)
            except Exception:
                pass
    try:
        sup = vms_mod.VmSupervisor(vms_dir)  # stop_all() also removes stale rules of its tag
        sup.close()
    except Exception:
        pass


def leftovers(run_dir: Path, *, vms_only: bool = False) -> list[str]:
    """What a stopped bed left on the machine: processes, mounts, firewall rules (empty: nothing).

    vms_only: only what belongs to its stand-in VMs (their launchers, mounts and rules).
    """
    run_dir = Path(run_dir).resolve()
    root = str(run_dir / "vms" if vms_only else run_dir)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            proc_root = os.readlink(f"/proc/{name}/root")
            mounts = Path(f"/proc/{name}/mountinfo").read_text()
        except OSError:  # gone meanwhile, or a zombie
            continue
        if root in cmdline or proc_root.startswith(root):
            found.append(f"process {name}: {cmdline.strip()[:120]}")
        found += [f"mount seen by process {name}: {line[:160]}" for line in mounts.splitlines() if root in line]
    tag = _vms_module().rule_tag(run_dir / "vms")
    rules = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True, text=True).stdout
    found += [f"iptables rule: {line}" for line in rules.splitlines() if f"vmpool-vm:{tag}:" in line]
    return found


# ---------------------------------------------------------------------- CLI


def _cmd_up(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pidfile = run_dir / "bed.pid"
    if pidfile.exists() and _pid_alive(int(pidfile.read_text() or 0)):
        # `make cloud-up` again: the config sections once more, for an admin who lost them
        print(config_snippet(json.loads((run_dir / "bed.json").read_text())))
        print(
            f"# bed already running (pid {pidfile.read_text()}); stop: python {Path(__file__).resolve()} down {run_dir}"
        )
        return 0

    def run_bed(on_ready=None):
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *a: stop.set())
        signal.signal(signal.SIGINT, lambda *a: stop.set())
        signal.signal(signal.SIGHUP, lambda *a: stop.set())
        bed = Bed.start(run_dir, token_expiration=args.token_expiration, default_spawn_delay=args.spawn_delay)
        try:
            if on_ready:
                on_ready(bed)
            while not stop.wait(1):
                if any(p.poll() is not None for p in bed.procs.values()):
                    print("bed: a child died; stopping", file=sys.stderr)
                    break
        finally:
            bed.stop()
            pidfile.unlink(missing_ok=True)

    def announce(bed):
        print(bed.config_snippet())
        print(
            "# bed ready in {:.1f}s; info: {}/bed.json; stop: python {} down {}".format(
                bed.timings["ready"], run_dir, Path(__file__).resolve(), run_dir
            ),
            flush=True,
        )

    if args.foreground:
        pidfile.write_text(str(os.getpid()))
        run_bed(announce)
        return 0

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # daemon
        os.close(r)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        log = os.open(run_dir / "bed.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        pidfile.write_text(str(os.getpid()))
        code = 0
        try:

            def ready(bed):
                os.write(w, b"ok")
                os.close(w)

            run_bed(ready)
        except BaseException as e:
            print(f"bed: start failed: {e!r}", file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    os.close(w)
    msg = b""
    while True:
        chunk = os.read(r, 64)
        if not chunk:
            break
        msg += chunk
    os.close(r)
    if msg != b"ok":
        print("bed failed to start; see {}/bed.log:\n{}".format(run_dir, _tail(run_dir / "bed.log")), file=sys.stderr)
        return 1
    info = json.loads((run_dir / "bed.json").read_text())
    print(config_snippet(info))
    print(
        f"# bed ready in {info.get('start_seconds', 0):.1f}s (pid {pid}); info: {run_dir}/bed.json; "
        f"stop: python {Path(__file__).resolve()} down {run_dir}"
    )
    return 0


def _cmd_down(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    pidfile = run_dir / "bed.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text() or 0)
        if pid and _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)
    # children that outlived the bed process (should not happen: pdeathsig)
    for name in ("nova", "keystone", "proxy"):
        f = run_dir / f"{name}.pid"
        if f.exists():
            try:
                _stop_group(int(f.read_text()), grace=5)
            except (ValueError, PermissionError):
                pass
            f.unlink(missing_ok=True)
    _cleanup_vms(run_dir)
    (run_dir / "bed.json").unlink(missing_ok=True)
    print(f"bed in {run_dir} is down")
    return 0


def _cmd_config(args) -> int:
    info = json.loads((Path(args.run_dir) / "bed.json").read_text())
    print(config_snippet(info))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bed.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a bed (daemonized unless --foreground)")
    up.add_argument("run_dir")
    up.add_argument("--foreground", action="store_true")
    up.add_argument("--token-expiration", type=int, default=3600)
    up.add_argument("--spawn-delay", type=float, default=0.3)
    down = sub.add_parser("down", help="stop the bed of RUN_DIR")
    down.add_argument("run_dir")
    cfg = sub.add_parser("config", help="print the vmpool config of the running bed")
    cfg.add_argument("run_dir")
    args = p.parse_args(argv)
    return {"up": _cmd_up, "down": _cmd_down, "config": _cmd_config}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
