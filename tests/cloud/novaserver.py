"""A real Nova (API, conductor, scheduler, placement, compute) for vmpool's tests.

Runs INSIDE the cloud venv (``.cloud-venv``, see constraints.txt).  It uses
nova's own functional-test harness (``_IntegratedTestBase``) to run nova-api,
nova-conductor, nova-scheduler, nova-compute and the real placement app in one
process (in-process sqlite, oslo.messaging fake transport), and serves the real
nova-api paste pipeline -- with real keystonemiddleware against a real Keystone
(``keystone_setup.py``) -- over HTTP on 127.0.0.1.

What is stubbed: the hypervisor (``BedDriver``, a FakeDriver whose "guests"
are the namespace sshd VMs of ``vms.py``), Glance, Neutron and Cinder (nova's
in-process fixtures; ports get addresses in 127.0.1.0/24).

A small JSON control API (``--control-port``) drives spawn behaviour and VM
faults; ``bed.py`` wraps it.

    python novaserver.py --run-dir D --port P --control-port C \
        --keystone-url http://127.0.0.1:K/v3 --keystone-public-url URL \
        --admin-password X [--default-spawn-delay 0.3] [--cells 1]
"""

import argparse
import base64
import collections
import contextlib
import faulthandler
import fcntl
import importlib
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
import warnings
import wsgiref.simple_server
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

os.environ.setdefault("OS_NOVA_DISABLE_EVENTLET_PATCHING", "1")
os.environ["OS_TEST_TIMEOUT"] = "0"
for _v in ("OS_STDOUT_CAPTURE", "OS_STDERR_CAPTURE", "OS_LOG_CAPTURE", "OS_DEBUG"):
    os.environ.pop(_v, None)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

LOG = logging.getLogger("novaserver")

SUBNET = ipaddress.ip_network("127.0.1.0/24")
GATEWAY = "127.0.1.1"
FIRST_HOST, LAST_HOST = 2, 254
LEASE_DIR = "/run/vmpool-bed-addresses"  # machine-wide address leases (see lease_address)

IMAGE_ID = "155d900f-4e14-4e4c-a73d-069cbf4541e6"  # GlanceFixture.image1
# IDs as a real cloud gives them (a name like bed.small in `flavor =` would look like a name to a reader)
FLAVOR_ID = "0b5ed000-5a11-4f1a-9c0e-000000000001"  # bed.small
FLAVOR_TOO_BIG_ID = "0b5ed000-5a11-4f1a-9c0e-000000000002"  # bed.too-big


# ---------------------------------------------------------------- behaviour


class Behaviours:
    """Per-server-name spawn behaviour, matched (re.search) on the name at spawn, and on the
    server's flavor ID when the rule names one (a class of VMs whose boots fail).

    The most recently added matching rule wins; otherwise the default applies.
    """

    KEYS = ("spawn_delay", "error", "sshd_delay", "destroy_delay")

    def __init__(self, default_spawn_delay):
        self._lock = threading.Lock()
        self.default = {"spawn_delay": default_spawn_delay, "error": False, "sshd_delay": 0.0, "destroy_delay": 0.0}
        self.rules = []

    def add(self, rule):
        rx = rule["name_regex"]
        re.compile(rx)
        r = {"name_regex": rx}
        if rule.get("flavor"):
            r["flavor"] = str(rule["flavor"])
        for k in self.KEYS:
            if rule.get(k) is not None:
                r[k] = rule[k]
        with self._lock:
            self.rules.append(r)
        return r

    def set_default(self, values):
        with self._lock:
            for k in self.KEYS:
                if values.get(k) is not None:
                    self.default[k] = values[k]

    def clear(self):
        with self._lock:
            self.rules = []

    def for_name(self, name, flavor=None):
        with self._lock:
            out = dict(self.default)
            for r in reversed(self.rules):
                if re.search(r["name_regex"], name or "") and r.get("flavor", flavor) == flavor:
                    out.update({k: v for k, v in r.items() if k in self.KEYS})
                    break
            return out

    def dump(self):
        with self._lock:
            return {"default": dict(self.default), "rules": list(self.rules)}


class ReaderPreferringRWLock:
    """Replacement for the harness' CellDatabases lock.

    fasteners' ReaderWriterLock prefers writers: a thread that holds nova's
    DatabaseWriteLock and asks for a read lock waits behind a *queued* writer,
    while the thread holding the read lock waits for the DatabaseWriteLock ->
    deadlock under concurrent server creates.  Here readers get in whenever no
    writer is *active*, reads are re-entrant and a thread that is the only
    reader may take the write lock.
    """

    def __init__(self, *a, **kw):
        self._cond = threading.Condition()
        self._readers: collections.Counter[int] = collections.Counter()
        self._writer = None
        self._wdepth = 0

    @contextlib.contextmanager
    def read_lock(self):
        me = threading.get_ident()
        with self._cond:
            while self._writer is not None and self._writer != me:
                self._cond.wait()
            self._readers[me] += 1
        try:
            yield self
        finally:
            with self._cond:
                self._readers[me] -= 1
                if self._readers[me] <= 0:
                    del self._readers[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def write_lock(self):
        me = threading.get_ident()
        with self._cond:
            while (self._writer is not None and self._writer != me) or any(t != me for t in self._readers):
                self._cond.wait()
            self._writer = me
            self._wdepth += 1
        try:
            yield self
        finally:
            with self._cond:
                self._wdepth -= 1
                if self._wdepth == 0:
                    self._writer = None
                self._cond.notify_all()


# ---------------------------------------------------------------- nova


def build_nova(args, behaviours, vms):
    """Import nova, define the driver and the harness subclass; return the test case."""
    # nova's monkey_patch must run before anything imports eventlet
    importlib.import_module("nova.tests.functional")

    import fixtures
    import futurist._thread
    from keystoneauth1 import loading as ks_loading
    from nova import context as nova_context
    from nova import exception, objects
    from nova.tests import fixtures as nova_fixtures
    from nova.tests.functional import integrated_helpers
    from nova.virt import fake as fake_virt
    from oslo_config import cfg

    _orig_idle = futurist._thread.ThreadWorker.MAX_IDLE_FOR
    # (`from nova.tests.fixtures import nova` yields the top-level nova package: the fixtures
    # package's `from .nova import *` rebinds the name)
    nova_fixtures_nova = importlib.import_module("nova.tests.fixtures.nova")
    neutron_fixture = importlib.import_module("nova.tests.fixtures.neutron")
    conf = cfg.CONF

    # -- fixtures that get in the way of a long-running server ----------------
    class _NoopFixture(fixtures.Fixture):
        def __init__(self, *a, **kw):
            super().__init__()

    # poison /sys, os.uname, psutil: the VM supervisor legitimately uses those
    nova_fixtures.GenericPoisonFixture = _NoopFixture
    nova_fixtures.SysFsPoisonFixture = _NoopFixture
    # Every resource-tracker update (each claim, under the compute-wide lock) GETs the allocations
    # of every instance on the host from placement, only to hand them to a driver reshape that
    # FakeDriver never does: O(n) in-process placement calls per build, O(n^2) for a burst.
    from nova.scheduler.client import report as report_client

    report_client.SchedulerReportClient.get_allocations_for_provider_tree = lambda self, context, nodename: {}
    # pitfall: writer-preferring cell lock deadlocks under concurrent creates
    nova_fixtures_nova.ReaderWriterLock = ReaderPreferringRWLock  # type: ignore[attr-defined]

    # -- the hypervisor -------------------------------------------------------
    pending: dict[str, threading.Timer] = {}  # uuid -> threading.Timer (sshd_delay)
    destroyed = set()  # uuids destroyed (never start their VM afterwards)
    plock = threading.Lock()

    def _start_vm(uuid, address, key_data):
        with plock:
            pending.pop(uuid, None)
            if uuid in destroyed:
                return
        try:
            vms.start(uuid, address=address, authorized_keys=key_data or "")
        except Exception:
            LOG.exception("starting VM %s failed", uuid)
            raise

    def _build_delay(context, uuid, seconds):
        """Stay in BUILD, but give up when the server is deleted meanwhile.

        Nova's terminate waits on the same per-instance lock as the build, so an uninterruptible
        sleep would hold a delete for the whole delay; a real hypervisor's spawn fails instead.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            try:
                current = objects.Instance.get_by_uuid(context, uuid)
            except exception.InstanceNotFound:
                current = None
            if current is None or current.task_state == "deleting" or current.deleted:
                raise exception.BuildAbortException(instance_uuid=uuid, reason="bed: deleted while building")

    class BedDriver(fake_virt.FakeDriver):
        """FakeDriver whose guests are namespace sshd VMs (vms.VmSupervisor)."""

        vcpus = 1000
        memory_mb = 800000
        local_gb = 600000

        def spawn(
            self,
            context,
            instance,
            image_meta,
            injected_files,
            admin_password,
            allocations,
            network_info=None,
            block_device_info=None,
            power_on=True,
            accel_info=None,
        ):
            b = behaviours.for_name(instance.display_name, instance.flavor.flavorid)
            uuid = instance.uuid
            LOG.info("spawn %s (%s): %s", uuid, instance.display_name, b)
            with plock:
                destroyed.discard(uuid)
            vms.prepare(uuid)
            if b["spawn_delay"]:
                _build_delay(context, uuid, float(b["spawn_delay"]))
            if b["error"]:
                raise exception.BuildAbortException(instance_uuid=uuid, reason="bed: spawn error requested")
            address = None
            for vif in network_info or []:
                for ip in vif.fixed_ips():
                    if ipaddress.ip_address(ip["address"]) in SUBNET:
                        address = ip["address"]
                        break
                if address:
                    break
            if address is None:
                raise exception.BuildAbortException(instance_uuid=uuid, reason="bed: no 127.0.1.0/24 address")
            key_data = instance.key_data or ""
            if b["sshd_delay"]:
                t = threading.Timer(float(b["sshd_delay"]), _start_vm, (uuid, address, key_data))
                t.daemon = True
                with plock:
                    pending[uuid] = t
                t.start()
            else:
                _start_vm(uuid, address, key_data)
            super().spawn(
                context,
                instance,
                image_meta,
                injected_files,
                admin_password,
                allocations,
                network_info,
                block_device_info,
                power_on,
                accel_info,
            )

        def destroy(
            self, context, instance, network_info, block_device_info=None, destroy_disks=True, destroy_secrets=True
        ):
            uuid = instance.uuid
            delay = float(behaviours.for_name(instance.display_name)["destroy_delay"] or 0)
            if delay:  # a slow hypervisor: the API shows task_state "deleting" meanwhile
                LOG.info("destroy %s: waiting %ss first", uuid, delay)
                time.sleep(delay)
            with plock:
                destroyed.add(uuid)
                t = pending.pop(uuid, None)
            if t is not None:
                t.cancel()
            try:
                vms.destroy(uuid)
            except Exception:
                LOG.exception("destroying VM %s failed", uuid)
            super().destroy(context, instance, network_info, block_device_info, destroy_disks, destroy_secrets)

        def get_console_output(self, context, instance):
            return vms.console_text(instance.uuid)

    fake_virt.BedDriver = BedDriver

    # -- the harness ----------------------------------------------------------
    class Bed(integrated_helpers._IntegratedTestBase):
        NUMBER_OF_CELLS = args.cells
        ADMIN_API = True
        CAST_AS_CALL = False  # servers really pass through BUILD
        STUB_KEYSTONE = False  # real keystonemiddleware against real keystone
        REQUIRES_LOCKING = True

        def runTest(self):  # noqa: N802 (testtools wants a test method)
            pass

        def _setup_services(self):
            self._configure()
            super()._setup_services()
            for number in range(2, args.cells + 1):  # one compute host per further cell, closed at first
                self._start_compute(f"compute{number}", cell_name=f"cell{number}")
                set_cell_accepts(self.cell_mappings[f"cell{number}"], False)

        def _configure(self):
            self.flags(compute_driver="fake.BedDriver")
            self.flags(api_paste_config=os.path.join(sys.prefix, "etc", "nova", "api-paste.ini"), group="wsgi")
            self.flags(response_validation="warn", group="api")
            self.flags(instances=100, cores=1000, ram=100 * 8192, group="quota")
            self.flags(max_concurrent_builds=20)
            self.flags(cell_worker_thread_pool_size=20, default_thread_pool_size=20)
            # keystonemiddleware (validates tokens directly against keystone)
            grp = "keystone_authtoken"
            ks_loading.register_auth_conf_options(conf, grp)
            plugin: Any = ks_loading.get_plugin_loader("password")
            conf.register_opts(ks_loading.get_auth_plugin_conf_options(plugin), group=grp)

            for k, v in {
                "www_authenticate_uri": args.keystone_public_url,
                "auth_url": args.keystone_url,
                "auth_type": "password",
                "username": "admin",
                "password": args.admin_password,
                "project_name": "admin",
                "user_domain_name": "Default",
                "project_domain_name": "Default",
                "region_name": "RegionOne",
                "service_token_roles_required": False,
                "http_connect_timeout": 60,
                "http_request_max_retries": 1,
            }.items():
                conf.set_override(k, v, group=grp)
            # quota-set API verifies project ids against keystone: go direct
            self.flags(endpoint_override=args.keystone_url, group="keystone")

    tc = Bed()
    t0 = time.time()
    tc.setUp()
    LOG.info("harness up in %.1fs", time.time() - t0)

    # -- undo test-only settings that hurt a long-running server ---------------
    futurist._thread.ThreadWorker.MAX_IDLE_FOR = _orig_idle  # pitfall (c)
    warnings.resetwarnings()  # pitfall (b)
    warnings.simplefilter("ignore")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)  # the in-memory FakeLogger and NullHandler
    fh = logging.FileHandler(os.path.join(args.run_dir, "nova.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    fh.setLevel(logging.INFO)
    root.addHandler(fh)
    root.setLevel(logging.INFO)

    patch_neutron(tc.neutron, neutron_fixture)
    create_flavors(nova_context, objects)
    return tc


def set_cell_accepts(cell, accepts):
    """Open or close a cell's compute hosts to new servers: their services enabled or disabled, as
    `openstack compute service set --disable` leaves them (the scheduler's ComputeFilter skips them)."""
    from nova import context as nova_context
    from nova import objects

    with nova_context.target_cell(nova_context.get_admin_context(), cell) as cctxt:
        for service in objects.ServiceList.get_by_binary(cctxt, "nova-compute", include_disabled=True):
            service.disabled = not accepts
            service.disabled_reason = None if accepts else "closed by the bed"
            service.save()


class Cells:
    """The harness' compute cells (cell1, cell2, ...): which are down, which take new servers.

    A down cell's database answers nothing: every statement on it raises DBConnectionError, as
    when the database server or the network to it is down. nova-api, the conductor and the
    scheduler meet that as they would (nova's own DownCellFixture fakes the same at the API layer
    instead); the cell's compute host and its VMs go on running. Nova then lists the cell's
    servers from the API database's instance mappings alone, status UNKNOWN (microversion 2.69+,
    no filter, no paging), or leaves them out without a word.
    """

    def __init__(self, tc):
        self.tc = tc
        self._lock = threading.Lock()
        self.down = set()
        self.accepts = {name: name == "cell1" for name in self.names()}
        self._listening = set()

    def names(self):
        return sorted(name for name in self.tc.cell_mappings if name != "cell0")

    def set(self, name, down=None, accepts=None):
        cell = self.tc.cell_mappings[name]  # KeyError: 404
        with self._lock:
            if accepts is not None:
                set_cell_accepts(cell, bool(accepts))
                self.accepts[name] = bool(accepts)
            if down is not None:
                self._listen(name, cell)
                (self.down.add if down else self.down.discard)(name)
        return self.describe(name)

    def _listen(self, name, cell):
        """Once per cell: a hook on its engine that fails every statement while the cell is down."""
        if name in self._listening:
            return
        import sqlalchemy
        from nova import context as nova_context
        from oslo_db import exception as db_exc

        with nova_context.target_cell(nova_context.get_admin_context(), cell) as cctxt:
            engine = cctxt.db_connection.writer.get_engine()

        def unreachable(*args, **kwargs):
            if name in self.down:
                raise db_exc.DBConnectionError(f"bed: the database of {name} is down")

        sqlalchemy.event.listen(engine, "before_cursor_execute", unreachable)
        self._listening.add(name)

    def describe(self, name):
        from nova import context as nova_context
        from nova import objects

        cell = self.tc.cell_mappings[name]
        mappings = objects.InstanceMappingList.get_not_deleted_by_cell_and_project(
            nova_context.get_admin_context(), cell.uuid, None
        )
        return {
            "name": name,
            "uuid": cell.uuid,
            "down": name in self.down,
            "accepts": self.accepts[name],
            "servers": sorted(m.instance_uuid for m in mappings),
        }


def patch_neutron(nf, neutron_fixture):
    """Pitfalls (a) and (e): project filters and one IP for every port."""
    subnet_id = nf.subnet_1["id"]
    subnet = dict(nf.subnet_1)
    subnet.update(
        {
            "cidr": str(SUBNET),
            "gateway_ip": GATEWAY,
            "allocation_pools": [{"start": str(SUBNET[FIRST_HOST]), "end": str(SUBNET[LAST_HOST])}],
        }
    )
    nf._subnets = {subnet_id: subnet}
    net = dict(nf.network_1)
    net["subnets"] = [subnet_id]
    nf._networks = {net["id"]: net}
    nf._ports.clear()  # the predefined ports hold 192.168.x addresses

    orig_list = nf._list_resource

    def _list_resource(resources, retrieve_all, **params):
        params.pop("tenant_id", None)
        params.pop("project_id", None)
        return orig_list(resources, retrieve_all, **params)

    nf._list_resource = _list_resource

    lock = threading.Lock()
    state = {"next": FIRST_HOST}
    leases = {}  # port id -> fd of the flock()ed lease file of its address
    orig_create = nf.create_port
    orig_delete = nf.delete_port

    def create_port(body=None):
        with lock:
            result = orig_create(body)
            port = nf._ports[result["port"]["id"]]
            used = set()
            for p in nf._ports.values():
                if p is port:
                    continue
                for ip in p.get("fixed_ips", []):
                    used.add(ip.get("ip_address"))
            n = LAST_HOST - FIRST_HOST + 1
            for i in range(n):
                host = FIRST_HOST + (state["next"] - FIRST_HOST + i) % n
                addr = str(SUBNET[host])
                if addr in used:
                    continue
                fd = lease_address(addr)
                if fd is not None:
                    break
            else:
                nf._ports.pop(port["id"], None)
                raise neutron_fixture.neutron_client_exc.IpAddressGenerationFailureClient()
            leases[port["id"]] = fd
            state["next"] = FIRST_HOST + (host - FIRST_HOST + 1) % n
            port["fixed_ips"] = [{"ip_address": addr, "subnet_id": subnet_id}]
            req = (body or {}).get("port", {})
            for k in ("tenant_id", "project_id"):
                if req.get(k):
                    port[k] = req[k]
            return {"port": dict(port, fixed_ips=[dict(port["fixed_ips"][0])])}

    def delete_port(port_id, **params):
        with lock:
            try:
                return orig_delete(port_id, **params)
            finally:
                fd = leases.pop(port_id, None)
                if fd is not None:
                    os.close(fd)

    nf.create_port = create_port
    nf.delete_port = delete_port

    # Neutron's port quota, as nova-api's validate_networks reads it (over it: 403 "Maximum number
    # of ports exceeded"); ports_left None: unlimited. Counted over every port, as the fixture lists them.
    nf.ports_left = None

    def show_quota(project_id):
        return {"quota": {"port": -1 if nf.ports_left is None else len(nf._ports) + nf.ports_left}}

    nf.show_quota = show_quota


def lease_address(addr):
    """Lease addr machine-wide (several beds may run at once: a test run and a demo, parallel
    sessions): an flock()ed file per address, held while the port exists, released by the kernel
    if nova dies.  Addresses where something else already listens on :22 are skipped too."""
    os.makedirs(LEASE_DIR, exist_ok=True)
    fd = os.open(os.path.join(LEASE_DIR, addr), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        with socket.create_connection((addr, 22), timeout=0.3):
            busy = True
    except ConnectionRefusedError:
        busy = False
    except OSError:
        busy = True  # a hanging/dropping listener: not ours to take
    if busy:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def create_flavors(nova_context, objects):
    ctx = nova_context.get_admin_context()
    for name, flavorid, vcpus, ram, disk in (
        ("bed.small", FLAVOR_ID, 1, 256, 1),
        # disk beyond the fake host's 600000 GB: "No valid host" (not quota)
        ("bed.too-big", FLAVOR_TOO_BIG_ID, 1, 256, 1000000),
    ):
        objects.Flavor(
            context=ctx,
            name=name,
            flavorid=flavorid,
            vcpus=vcpus,
            memory_mb=ram,
            root_gb=disk,
            ephemeral_gb=0,
            swap=0,
            rxtx_factor=1.0,
            is_public=True,
        ).create()


# ---------------------------------------------------------------- HTTP


class _QuietWSGIHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, fmt, *args):
        pass


class ThreadedWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_control_handler(behaviours, vms, info, neutron, cells):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def _send(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}") if n else {}

        def _dispatch(self, method):
            try:
                path = self.path.split("?")[0].rstrip("/")
                body = self._body() if method in ("POST", "PUT") else {}
                code, obj = route(method, path, body)
            except KeyError as e:
                code, obj = 404, {"error": f"not found: {e}"}
            except (ValueError, TypeError) as e:
                code, obj = 400, {"error": str(e)}
            except Exception as e:
                LOG.exception("control %s %s", method, self.path)
                code, obj = 500, {"error": f"{type(e).__name__}: {e}"}
            self._send(code, obj)

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_DELETE(self):
            self._dispatch("DELETE")

    def route(method, path, body):
        parts = [p for p in path.split("/") if p]
        if parts == ["health"]:
            return 200, dict(info, ok=True)
        if parts == ["behaviours"]:
            if method == "GET":
                return 200, behaviours.dump()
            if method == "POST":
                return 200, behaviours.add(body)
            if method == "DELETE":
                behaviours.clear()
                return 200, behaviours.dump()
        if parts == ["api-max-limit"] and method in ("PUT", "POST"):
            # Nova's [api] max_limit: how many servers one listing page holds (1000 by default)
            from oslo_config import cfg

            cfg.CONF.set_override("max_limit", int(body["max_limit"]), group="api")
            return 200, {"max_limit": cfg.CONF.api.max_limit}
        if parts == ["cells"] and method == "GET":
            return 200, {"cells": [cells.describe(name) for name in cells.names()]}
        if len(parts) == 2 and parts[0] == "cells" and method in ("PUT", "POST"):
            return 200, cells.set(parts[1], down=body.get("down"), accepts=body.get("accepts"))
        if parts == ["ports-left"] and method in ("PUT", "POST"):
            left = body.get("ports_left")
            neutron.ports_left = None if left is None else int(left)
            return 200, {"ports_left": neutron.ports_left}
        if parts == ["behaviours", "default"] and method in ("PUT", "POST"):
            behaviours.set_default(body)
            return 200, behaviours.dump()
        if parts == ["vms"] and method == "GET":
            return 200, {"vms": [{"id": v, "running": vms.is_running(v)} for v in vms.list()]}
        if len(parts) == 3 and parts[0] == "vms":
            vm_id = parts[1]
            if parts[2] == "fault" and method in ("POST", "PUT"):
                mode = body["mode"]
                if not vms.is_running(vm_id):
                    return 409, {"error": f"VM {vm_id} is not running"}
                vms.set_fault(vm_id, mode)
                return 200, {"id": vm_id, "mode": mode}
            if parts[2] == "exec" and method == "POST":
                if not vms.is_running(vm_id):
                    return 409, {"error": f"VM {vm_id} is not running"}
                inp = body.get("input_b64")
                r = vms.exec(
                    vm_id,
                    list(body["argv"]),
                    input=base64.b64decode(inp) if inp is not None else None,
                    timeout=float(body.get("timeout", 30)),
                )
                return 200, {
                    "rc": r.returncode,
                    "stdout_b64": base64.b64encode(r.stdout or b"").decode(),
                    "stderr_b64": base64.b64encode(r.stderr or b"").decode(),
                }
            if parts[2] == "state" and method == "GET":
                return 200, {"id": vm_id, "running": vms.is_running(vm_id)}
        raise KeyError(path)

    return Handler


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--keystone-url", required=True, help="direct keystone URL (token validation)")
    p.add_argument("--keystone-public-url", required=True, help="keystone URL clients use (www_authenticate_uri)")
    p.add_argument("--admin-password", required=True)
    p.add_argument("--default-spawn-delay", type=float, default=0.3)
    p.add_argument("--vms-dir", default=None)
    p.add_argument("--cells", type=int, default=1, help="compute cells (cell1 takes new servers; see Cells)")
    args = p.parse_args()
    args.run_dir = os.path.abspath(args.run_dir)
    sys.argv = sys.argv[:1]
    t0 = time.time()

    tmp = os.path.join(args.run_dir, "nova-tmp")
    os.makedirs(tmp, exist_ok=True)
    os.environ["TMPDIR"] = tmp
    ready_file = os.path.join(args.run_dir, "nova.json")
    if os.path.exists(ready_file):
        os.unlink(ready_file)

    logging.basicConfig(
        filename=os.path.join(args.run_dir, "nova.log"),
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
    )

    import vms as vms_mod

    vms = vms_mod.VmSupervisor(args.vms_dir or os.path.join(args.run_dir, "vms"))

    stopping = threading.Event()

    def _shutdown(*_a):
        if stopping.is_set():
            return
        stopping.set()
        try:
            vms.stop_all()
        finally:
            os._exit(0)

    signal.signal(signal.SIGTERM, _shutdown)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: stacks to nova.out
    signal.signal(signal.SIGINT, _shutdown)
    signal.signal(signal.SIGHUP, _shutdown)

    behaviours = Behaviours(args.default_spawn_delay)
    try:
        tc = build_nova(args, behaviours, vms)
    except BaseException:
        traceback.print_exc()
        vms.stop_all()
        os._exit(1)

    app = tc.api_fixture.app()
    srv = wsgiref.simple_server.make_server(
        "127.0.0.1", args.port, app, server_class=ThreadedWSGIServer, handler_class=_QuietWSGIHandler
    )
    threading.Thread(target=srv.serve_forever, daemon=True, name="nova-api").start()

    info = {
        "port": args.port,
        "control_port": args.control_port,
        "pid": os.getpid(),
        "image_id": IMAGE_ID,
        "flavor_id": FLAVOR_ID,
        "flavor_too_big_id": FLAVOR_TOO_BIG_ID,
        "network_id": tc.neutron.network_1["id"],
        "subnet": str(SUBNET),
    }
    handler = make_control_handler(behaviours, vms, info, tc.neutron, Cells(tc))
    ctl = ThreadingHTTPServer(("127.0.0.1", args.control_port), handler)
    ctl.daemon_threads = True
    threading.Thread(target=ctl.serve_forever, daemon=True, name="nova-control").start()

    # the notification fixture keeps every notification in memory: trim it
    def _trim():
        while not stopping.wait(30):
            try:
                tc.notifier.reset()
            except Exception:
                pass

    threading.Thread(target=_trim, daemon=True, name="trim").start()

    with open(ready_file + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.rename(ready_file + ".tmp", ready_file)
    print(
        f"novaserver: ready on 127.0.0.1:{args.port} (control {args.control_port}) in {time.time() - t0:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    while not stopping.wait(3600):
        pass


if __name__ == "__main__":
    main()
