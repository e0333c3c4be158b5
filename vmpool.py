"""vmpool: a pool of OpenStack VMs that run Torque (PBS) or Slurm jobs.

One worker node (Torque: ``np`` = the pool's cores, `vmpool capacity`; Slurm: its ``CPUs``) stands for the pool;
its prologue (Slurm: prolog) calls ``vmpool acquire JOBID`` to get a VM, the job starter runs
the job there over SSH, and the epilogue scrubs the VM and calls ``vmpool release JOBID``. ``vmpool reconcile`` (cron,
every minute) keeps the pool between ``min`` and ``max``, re-checks Unusable VMs and
deletes the dead. ``vmpool status`` shows what every VM is doing.

VM classes (``[class NAME]``, each its flavor; without them the one class "default"): a job
gets a VM of the smallest class its cores, memory and GPUs fit in (``acquire --cores --mem
--gpus``); sizes, spares and trimming are per class, creates stay within the pool's max,
max_cores and max_memory and the project's quota (Nova's absolute limits), single-use classes
delete their VM after its one job.

For site operations: ``drain``, ``delete``, ``pause``, ``resume`` and ``clear-backoff`` are an
admin's state changes (logged with who and why; reconcile does the cloud work); ``check`` is a
Nagios/Icinga plugin; ``metrics`` (and ``[metrics] textfile``) the Prometheus exposition;
``[logging] syslog`` sends the log lines to syslog too.

Every VM is Free, Busy (held by one job) or Unusable (creating, building, deleting, error,
shut off, unreachable over SSH, tainted by a failed scrub or a changed host key).

State: one JSON file (``[pool] state_file``), schema-versioned, mode 0600, read-modify-written
under a file lock (``<state_file>.lock``) and replaced atomically. The lock is never held across
a cloud or SSH call: intents are recorded first ("creating", "deleting"), the slow call runs
unlocked, and its outcome is recorded under the lock again. Every server carries metadata
naming the pool and the VM, so a crash between a call and its record is repaired by the next
``reconcile``. A second file, ``<state_file>.reconcile.lock``, keeps reconcile passes apart.

The file, top to bottom (each section under a ``# --- name ---`` banner):

    start-up admission   take_start_slot, admitted: a burst of commands imports a few at a time
    constants and errors VmpoolError and its subclasses (each carries its exit code), failpoint
    configuration        load_config -> Config (frozen dataclasses, validated)
    the model            Vm, VmState, Why, Request, Want, PoolState; Server, Observation, JobRecord;
                         the actions (CreateServer, DeleteServer, ProbeSsh, Note) and outcomes
    the pure policy      plan_acquire (choose_class, class_size), plan_hand_over, plan_release,
                         plan_reconcile (_scale per class within _budget), plan_created,
                         plan_deleted, plan_probed, plan_clock, the admin plans (plan_drain ...),
                         read-outs (explain_no_vm, pool_health, pool_capacity): state + observations + now ->
                         new state + actions, no I/O
    the state store      StateStore (load, update under the lock, read), reconcile_lock
    the Cloud adapter    Cloud (Protocol), NovaCloud: Nova's statuses and errors translated here
    the Remote adapter   Remote (Protocol), FabricRemote: SSH probes
    the Batch adapter    Batch (Protocol), CommandBatch: does a job still live?
    the executor         Pool: applies the policy's actions through the adapters
                         (acquire / release, reconcile and its steps)
    monitoring           run_check (Nagios), metrics_text (Prometheus)
    the replay           read_job_log, Replay (the policy's plan_* on a simulated clock, cloud and
                         jobs), baselines, simulate_report: `vmpool simulate`
    the replay           read_job_log, Replay (vmpool simulate): a job log through the policy above,
                         with a simulated clock, cloud and batch system; baselines, the report
    the CLI              cli and one click command per verb
    main                 main() -> exit code; run(), the console script

Exit codes (the same for every command):

    0  ok (also: release of an unknown job, reconcile while another runs)
    1  unexpected internal error (a bug: please report it with the log)
    2  bad input or usage (job id, user name, options)
    3  configuration error (missing, unreadable, invalid, unsafe permissions)
    4  state error (corrupt, truncated, foreign or newer state file; unsafe permissions)
    5  cloud error (the OpenStack API failed or refused)
    6  no VM within the timeout (acquire)
    7  the state lock could not be had within lock_timeout
    8  the job ended while acquire waited (its epilogue ran `vmpool release`): nothing is held
"""

from __future__ import annotations

import os
import sys

# --- start-up admission ---
# A burst of prologues starts hundreds of `vmpool` processes at once, and most of each one's CPU
# goes to importing modules (click, logging, this file). Hundreds importing at once on a few
# cores thrash the caches and the scheduler; one at a time per core they do not (figures:
# docs/performance.md, "The burst of 200"). The command takes a slot here, before its imports,
# and lets it go when main() begins (run()): the slot is never held across a wait for
# the state lock, a VM or the cloud, so it cannot hold up the releases that waiters need.

START_SLOTS_DIR = "/run/vmpool"  # root's (the hooks' and cron's commands); VMPOOL_START_SLOTS: another, or "off"
START_SLOT_WAIT = 10.0  # seconds (VMPOOL_START_SLOT_WAIT): a holder stuck in its imports holds up the others this long


class _SlotWaitOver(Exception):
    pass


def take_start_slot(directory: str, slots: int, wait: float) -> int | None:
    """The fd of a flocked start slot in `directory`, or None: the command goes on without one
    (the directory unsafe or unusable, or no slot within `wait` seconds). Never an error."""
    import fcntl
    import signal
    import stat

    fds: list[int] = []
    try:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            return None  # whoever else could hold the slots could stall every prologue
        first = os.getpid() % slots  # where the waiters queue: spread over the slots
        for index in (*range(first, slots), *range(first)):
            fds.append(
                os.open(
                    os.path.join(directory, f"start-slot.{index}"),
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            )
            try:
                fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fds.pop()
            except BlockingIOError:
                pass

        def over(signum: int, frame: object) -> None:
            raise _SlotWaitOver

        previous = signal.signal(signal.SIGALRM, over)  # ValueError off the main thread: no slot
        try:
            signal.setitimer(signal.ITIMER_REAL, max(wait, 0.001))
            try:
                fcntl.flock(fds[0], fcntl.LOCK_EX)  # the waiters of one slot queue in the kernel
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)  # even after an alarm that beat the disarming
        return fds.pop(0)  # only now: after such an alarm it stays in fds, to be closed
    except (OSError, ValueError, _SlotWaitOver):
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _start_slot() -> int | None:
    """The `vmpool` command's slot (its console script, or `python -m vmpool`); none for an import."""
    directory = os.environ.get("VMPOOL_START_SLOTS", START_SLOTS_DIR if os.geteuid() == 0 else "off")
    if directory == "off" or not (__name__ == "__main__" or os.path.basename(sys.argv[0]) == "vmpool"):
        return None
    try:
        wait = float(os.environ.get("VMPOOL_START_SLOT_WAIT", START_SLOT_WAIT))
    except ValueError:
        wait = START_SLOT_WAIT
    return take_start_slot(directory, len(os.sched_getaffinity(0)), wait)


START_SLOT = _start_slot()


def admitted() -> None:
    """The command has started: its start slot goes to the next command starting. Its children
    take none: a probe worker (forkserver) imports vmpool again, with this command's argv."""
    if START_SLOT is not None:
        os.close(START_SLOT)
    os.environ["VMPOOL_START_SLOTS"] = "off"


import configparser
import contextlib
import copy
import dataclasses
import enum
import functools
import gc
import ipaddress
import json
import logging
import re
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Protocol

import click
import filelock

if TYPE_CHECKING:  # vendor types only for the type checker: importing them is the slow part of a start
    import paramiko

__version__ = "0.1.0"

log = logging.getLogger("vmpool")

# --- constants and errors ---

STATE_SCHEMA = "vmpool-state"
STATE_VERSION = 1
DEFAULT_CONFIG_PATH = "/etc/vmpool/vmpool.conf"
METADATA_POOL_KEY = "vmpool_pool"  # servers without this tag are never touched
METADATA_VM_KEY = "vmpool_vm"
METADATA_CLASS_KEY = "vmpool_class"  # the VM's class, so a server adopted after a state loss keeps it
DEFAULT_CLASS = "default"  # the one class of a config without [class NAME] sections
SINGLE_USE_TAINT = "single-use: served job"  # + the job: a single-use VM is deleted after its one job


class VmState(enum.StrEnum):
    """Every VM is Free, Busy (held by one job) or Unusable. The values are the state file's."""

    FREE = "free"
    BUSY = "busy"
    UNUSABLE = "unusable"


class Why(enum.StrEnum):
    """The kind of a VM's reason for being Unusable. The state file keeps one string per VM, the
    kind and then its free text ("unreachable: no SSH banner within 10s", "status SHELVED");
    Vm.why and Vm.detail read it apart, reason_text puts it together. Tainted VMs (failed scrub,
    changed host key, lost job) never become Free again: their reason is the taint's own words."""

    NONE = ""
    CREATING = "creating"
    BUILDING = "building"
    DELETING = "deleting"
    ERROR = "error"
    UNREACHABLE = "unreachable"
    SHUTOFF = "shutoff"
    STATUS = "status"  # another Nova status, named in the detail
    VANISHED = "vanished"
    ADOPTED = "adopted"
    TAINTED = "tainted"


FREE, BUSY, UNUSABLE = VmState.FREE, VmState.BUSY, VmState.UNUSABLE
CREATING, BUILDING, DELETING, ERROR_REASON = Why.CREATING, Why.BUILDING, Why.DELETING, Why.ERROR
UNREACHABLE, SHUTOFF, VANISHED, ADOPTED = Why.UNREACHABLE, Why.SHUTOFF, Why.VANISHED, Why.ADOPTED
UNKNOWN_PAST = "adopted with unknown past"  # a taint: a tagged server no state and no job record explains
_WHY_BY_WORD = {why.value: why for why in Why if why.value}


def reason_text(why: Why, detail: str = "") -> str:
    """A VM's reason as the state file keeps it: its kind, then the free text."""
    if why is Why.STATUS:
        return f"status {detail}"
    return f"{why.value}: {detail}" if detail else why.value


# Torque job ids: 123, 123.server.domain, array jobs 123[4].server (and 123[] for the parent).
JOB_ID_RE = re.compile(r"^[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9][A-Za-z0-9-]*)*$")
# POSIX portable user/group names (as useradd accepts them, no leading dash).
POSIX_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


class VmpoolError(Exception):
    """An error vmpool explains to its user; the class carries the exit code."""

    exit_code = 1


class BadInput(VmpoolError):
    exit_code = 2


class ConfigError(VmpoolError):
    exit_code = 3


class StateError(VmpoolError):
    exit_code = 4


class StateCorrupt(StateError):
    """The state file is damaged (not JSON, or malformed): reconcile sets it aside and rebuilds."""


class StateAccessError(StateError):
    """The state, its locks or its directory cannot be read, created or written (no content problem)."""


class CloudError(VmpoolError):
    exit_code = 5


class CloudRefused(CloudError):
    """The cloud said no for good (authentication, a bad request, forbidden): retrying cannot help."""


class QuotaExceeded(CloudError):
    """The cloud refused for a quota, a limit or a rate (403 over quota, 413, 429): nothing was made,
    and asking again soon cannot help. Back off, at least `retry_after` seconds (its Retry-After)."""

    def __init__(self, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after


class ServerGone(CloudError):
    """The server does not exist (HTTP 404)."""


class NoVmAvailable(VmpoolError):
    exit_code = 6


class LockTimeout(VmpoolError):
    exit_code = 7


class JobEnded(VmpoolError):
    """The job's epilogue released it while (or before) its prologue asked for a VM."""

    exit_code = 8


_failpoint_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Die here, as kill -9 would, when the crash tests ask (VMPOOL_FAILPOINT=name or name:N for the Nth hit)."""
    wanted = os.environ.get("VMPOOL_FAILPOINT")
    if not wanted:
        return
    target, _, nth = wanted.partition(":")
    if target != name:
        return
    _failpoint_hits[name] = _failpoint_hits.get(name, 0) + 1
    if _failpoint_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def validate_job_id(job_id: str) -> str:
    """Refuse anything that is not a Torque job id, before it reaches a shell or the cloud."""
    if not JOB_ID_RE.match(job_id) or len(job_id) > 255:
        raise BadInput(f"invalid job id {job_id!r}: expected 123, 123.server.domain or 123[4].server")
    return job_id


def validate_user_name(name: str) -> str:
    if not POSIX_NAME_RE.match(name):
        raise BadInput(f"invalid user name {name!r}: expected a POSIX name ([A-Za-z_][A-Za-z0-9_.-]*, at most 32)")
    return name


# --- configuration ---
# Read once, shared by everything, never changed: frozen. Never compared either: eq=False spares
# two generated methods per class (__eq__, __hash__): every command's start-up pays for them.
# Every dataclass here and in the model has a docstring: for one without, @dataclass writes one
# from inspect.signature, at every start.


@dataclass(frozen=True, eq=False, repr=False)
class PoolConfig:
    """[pool]: the pool's size and limits, its state file, timeouts and back-off."""

    name: str = "vmpool"
    min: int = 0
    max: int = 4
    min_free: int = 1
    state_file: str = "/var/lib/vmpool/state.json"
    log_file: str = ""
    lock_timeout: float = 30.0
    build_timeout: float = 600.0
    ready_timeout: float = 300.0
    unusable_timeout: float = 600.0
    idle_timeout: float = 1800.0
    delete_timeout: float = 300.0
    create_grace: float = 120.0
    acquire_timeout: float = 240.0
    acquire_poll: float = 0.5
    pass_interval: float = 2.0
    protect_after_failures: int = 3
    backoff_initial: float = 60.0
    backoff_max: float = 900.0
    job_alive_command: str = ""
    job_gone_exit_codes: tuple[int, ...] = (153,)  # Torque's qstat: 153 = unknown job id
    job_alive_timeout: float = 10.0
    job_gone_grace: float = 600.0
    # the hooks' per-job records (their JOB_DIR): after a lost or restored state file they say
    # which job runs on which VM ("" = none kept on this node)
    job_records: str = "/var/spool/vmpool/jobs"
    # several pools in one project: while another pool's jobs wait on the project's quota, this
    # pool's Free VMs above min that have been idle this long give way (0: never)
    give_way_after: float = 60.0
    max_cores: int = 0  # the pool's VMs hold at most this many vCPUs (0: no limit)
    max_memory: int = 0  # ... and this much RAM, in MiB (the file may say 512G) (0: no limit)
    bigger_vm_may_serve: bool = False  # a Free VM of a bigger class may serve a job its own class fits
    # the VM classes ([class NAME] sections), smallest first once their flavors are known; without
    # any, the one class "default" of [openstack] flavor and this section's min, max and min_free
    classes: tuple[ClassConfig, ...] = field(default=(), metadata={"ini": False})
    default_flavor: str = field(default="", metadata={"ini": False})  # [openstack] flavor: the implicit class's

    @functools.cached_property
    def vm_classes(self) -> tuple[ClassConfig, ...]:
        """The named classes, or the implicit one, made from this section's current min, max and min_free."""
        implicit = ClassConfig(DEFAULT_CLASS, self.default_flavor, min=self.min, max=self.max, min_free=self.min_free)
        return self.classes or (implicit,)

    def class_named(self, name: str) -> ClassConfig | None:
        return next((vm_class for vm_class in self.vm_classes if vm_class.name == name), None)


@dataclass(frozen=True, eq=False, repr=False)
class ClassConfig:
    """One kind of VM ([class NAME]): a job gets a VM of the smallest class its cores, memory and
    GPUs fit in. Image, network and key_name default to [openstack]'s."""

    name: str = DEFAULT_CLASS
    flavor: str = ""  # "" (the implicit class): [openstack] flavor
    image: str = ""
    network: str = ""
    key_name: str = ""
    min: int = 0
    max: int = 0  # 0: up to the pool's max
    min_free: int = 0
    single_use: bool = False  # its VM serves one job and is deleted after it (no scrub to trust)
    gpus: int = -1  # the flavor's GPUs; -1: as Nova's extra specs say (resources:VGPU, pci_passthrough:alias)
    # `vmpool check`: how long its oldest waiting job may wait (Nagios ranges; "": [check] wait_*)
    check_wait_warning: str = ""
    check_wait_critical: str = ""


@dataclass(frozen=True, eq=False, repr=False)
class OpenStackConfig:
    """[openstack]: the cloud, its credentials and what the pool's creates name."""

    # One source of credentials (see credentials_source): a clouds.yaml entry, these keys, or OS_*.
    cloud: str = ""
    auth_url: str = ""
    username: str = ""
    password: str = ""
    user_domain_name: str = ""  # "Default" when empty
    project_name: str = ""
    project_domain_name: str = ""  # "Default" when empty
    application_credential_id: str = ""
    application_credential_secret: str = ""
    region_name: str = ""
    interface: str = ""  # "public" when empty (and clouds.yaml does not say)
    cacert: str = ""
    api_timeout: float = 30.0
    image: str = ""
    flavor: str = ""
    network: str = ""
    key_name: str = ""
    security_groups: tuple[str, ...] = ()
    availability_zone: str = ""
    server_prefix: str = ""
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, eq=False, repr=False)
class SshConfig:
    """[ssh]: how vmpool and the hooks log in to the VMs as root."""

    user: str = "root"
    private_key: str = "/etc/vmpool/id_ed25519"
    port: int = 22
    connect_timeout: float = 10.0
    banner_timeout: float = 10.0
    auth_timeout: float = 10.0
    command_timeout: float = 30.0
    known_hosts: str = "/var/lib/vmpool/known_hosts"
    probe_parallelism: int = 128


BATCH_SYSTEMS = {"torque": "qstat", "slurm": "scontrol", "none": ""}  # system -> its default command


@dataclass(frozen=True, eq=False, repr=False)
class BatchConfig:
    """How reconcile asks the batch system whether a job still lives (a lost epilogue frees its VM)."""

    system: str = "torque"
    command: str = ""  # default: BATCH_SYSTEMS[system], looked up on PATH and in /usr/local/bin

    @property
    def program(self) -> str:
        return self.command or BATCH_SYSTEMS.get(self.system, "")


CHECK_LEVELS = ("ok", "warning", "critical")
# A Nagios threshold range: 10, 10:, ~:10, 10:20, @10:20 (alert inside).
NAGIOS_RANGE_RE = re.compile(r"^@?(~|[-+]?[0-9]+(\.[0-9]+)?)?(:([-+]?[0-9]+(\.[0-9]+)?)?)?$")


@dataclass(frozen=True, eq=False, repr=False)
class CheckConfig:
    """Thresholds of `vmpool check` (Nagios ranges: a plain number N alerts above N)."""

    reconcile_warning: str = "120"  # seconds since the last reconcile pass
    reconcile_critical: str = "300"
    wait_warning: str = "600"  # seconds the oldest waiting job has waited
    wait_critical: str = "1800"
    unusable_warning: str = ""  # number of Unusable VMs (empty: never alerts)
    unusable_critical: str = ""
    protected: str = "critical"  # protected mode on: ok, warning or critical
    paused: str = "warning"  # paused by an admin: ok, warning or critical
    timeout: float = 10.0  # the plugin gives up (UNKNOWN) after this long


@dataclass(frozen=True, eq=False, repr=False)
class MetricsConfig:
    """[metrics]: where reconcile writes the Prometheus text."""

    textfile: str = ""  # node_exporter textfile collector file, written by each reconcile pass


SYSLOG_FACILITIES = (
    "auth",
    "authpriv",
    "cron",
    "daemon",
    "kern",
    "lpr",
    "mail",
    "news",
    "syslog",
    "user",
    "uucp",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
)


@dataclass(frozen=True, eq=False, repr=False)
class LoggingConfig:
    """[logging]: syslog besides the log file."""

    syslog: bool = False
    facility: str = "daemon"
    syslog_address: str = "/dev/log"


@dataclass(frozen=True, eq=False, repr=False)
class Config:
    """The whole validated config file, one frozen record per section."""

    path: str
    pool: PoolConfig
    openstack: OpenStackConfig
    ssh: SshConfig
    batch: BatchConfig = BatchConfig()
    check: CheckConfig = CheckConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def server_prefix(self) -> str:
        return self.openstack.server_prefix or f"{self.pool.name}-"


SECRET_KEYS = ("password", "application_credential_secret")


def _parse_value(path: str, section: str, key: str, raw: str, default: Any) -> Any:
    """Convert one INI value to the type of its default, or say what is allowed."""
    where = f"{path}: [{section}] {key} = {raw!r}"
    if key == "max_memory":
        try:
            return mebibytes(raw)
        except ValueError:
            raise ConfigError(f"{where}: expected a size in MiB or like 512M, 64G, 2T (0: no limit)") from None
    try:
        if isinstance(default, bool):
            return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[raw.lower()]
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except (ValueError, KeyError):
        kind = (
            "true or false"
            if isinstance(default, bool)
            else "a whole number"
            if isinstance(default, int)
            else "a number of seconds"
        )
        raise ConfigError(f"{where}: expected {kind}") from None
    if key == "job_gone_exit_codes":
        try:
            return tuple(int(part) for part in raw.replace(",", " ").split())
        except ValueError:
            raise ConfigError(f"{where}: expected exit codes (whole numbers) separated by commas") from None
    if key == "job_alive_command" and raw:
        import shlex

        try:
            shlex.split(raw)
        except ValueError as error:
            raise ConfigError(f"{where}: not a valid command line: {error}") from None
    if key == "security_groups":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if key == "metadata":
        pairs = []
        for item in (part.strip() for part in raw.split(",") if part.strip()):
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"{where}: expected key=value pairs separated by commas")
            pairs.append((name.strip(), value.strip()))
        return tuple(pairs)
    return raw


def _build_section(path: str, parser: configparser.ConfigParser, section: str, cls: type) -> Any:
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls) if f.metadata.get("ini", True)}
    values: dict[str, Any] = {}
    if parser.has_section(section):
        for key, raw in parser.items(section):
            if key not in known:
                raise ConfigError(f"{path}: [{section}] unknown key {key!r}; allowed: {', '.join(sorted(known))}")
            values[key] = _parse_value(path, section, key, raw.strip(), getattr(defaults, key))
    return dataclasses.replace(defaults, **values)


SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)


def mebibytes(text: str) -> int:
    """A memory size in MiB: a plain number is MiB; 512M, 64G, 64gb, 2T, 1024k as Torque and Slurm write them."""
    match = SIZE_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match[1]) * MEMORY_UNITS[(match[2] or "m").lower()] + 0.999)


CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$")


def _build_classes(path: str, parser: configparser.ConfigParser, pool: PoolConfig, flavor: str) -> PoolConfig:
    """The [class NAME] sections, or the implicit class "default" of [openstack] flavor and [pool] min,
    max and min_free; each checked against the pool's limits."""
    sections = [section for section in parser.sections() if section.startswith("class ")]
    if not sections:
        return dataclasses.replace(pool, default_flavor=flavor)
    for key in ("min", "min_free"):
        if parser.has_option("pool", key):
            raise ConfigError(
                f"{path}: [pool] {key}: set {key} in each [class NAME] section instead (classes are named)"
            )
    classes = []
    for section in sections:
        name = section[len("class ") :].strip()
        if not CLASS_NAME_RE.match(name):
            raise ConfigError(f"{path}: [{section}]: a class name is letters, digits, '-' and '_' (at most 41)")
        if parser.has_option(section, "name"):
            raise ConfigError(f"{path}: [{section}] unknown key 'name'; the section's title names the class")
        vm_class = dataclasses.replace(_build_section(path, parser, section, ClassConfig), name=name)
        _check_class(path, section, vm_class, pool)
        classes.append(vm_class)
    return dataclasses.replace(pool, min=sum(c.min for c in classes), min_free=0, classes=tuple(classes))


def _check_class(path: str, section: str, vm_class: ClassConfig, pool: PoolConfig) -> None:
    top = vm_class.max or pool.max
    checks = [
        ("flavor", bool(vm_class.flavor), "is required (a flavor ID: `openstack flavor list`)"),
        ("max", 0 <= vm_class.max <= pool.max, f"must be between 1 and the pool's max ({pool.max}); 0: the pool's"),
        ("min", 0 <= vm_class.min <= top, f"must be between 0 and max ({top})"),
        ("min_free", 0 <= vm_class.min_free <= top, f"must be between 0 and max ({top})"),
        ("gpus", vm_class.gpus >= -1, "must be >= 0 (-1: as the flavor's extra specs say)"),
        *(
            (key, bool(NAGIOS_RANGE_RE.match(getattr(vm_class, key))), "expected a Nagios range (e.g. 3600) or nothing")
            for key in ("check_wait_warning", "check_wait_critical")
        ),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{path}: [{section}] {key} = {getattr(vm_class, key)!r}: {allowed}")


def _check_pool_limits(path: str, pool: PoolConfig) -> None:
    checks = [
        ("min", pool.min >= 0, "must be >= 0"),
        ("max", pool.max >= 1, "must be >= 1"),
        ("min", pool.min <= pool.max, f"must be <= max ({pool.max})"),
        ("min_free", 0 <= pool.min_free <= pool.max, f"must be between 0 and max ({pool.max})"),
        ("protect_after_failures", pool.protect_after_failures >= 1, "must be >= 1"),
        (
            "backoff_max",
            pool.backoff_max >= pool.backoff_initial,
            f"must be >= backoff_initial ({pool.backoff_initial:g})",
        ),
        ("job_gone_grace", pool.job_gone_grace >= 0, "must be >= 0 seconds"),
        ("give_way_after", pool.give_way_after >= 0, "must be >= 0 seconds (0: never)"),
        ("max_cores", pool.max_cores >= 0, "must be >= 0 (0: no limit)"),
        ("max_memory", pool.max_memory >= 0, "must be >= 0 (0: no limit)"),
        # 0 is what qstat answers for a live job: as a "gone" code it would delete every job's VM.
        (
            "job_gone_exit_codes",
            all(1 <= code <= 255 for code in pool.job_gone_exit_codes),
            "exit codes 1-255 (0 means the job is alive)",
        ),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{path}: [pool] {key} = {getattr(pool, key)!r}: {allowed}")
    for field_ in dataclasses.fields(pool):
        durations = ("create_grace", "acquire_poll", "pass_interval", "backoff_initial")
        is_duration = field_.name.endswith("_timeout") or field_.name in durations
        if is_duration and getattr(pool, field_.name) <= 0:
            raise ConfigError(f"{path}: [pool] {field_.name} = {getattr(pool, field_.name)!r}: must be > 0 seconds")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$", pool.name):
        raise ConfigError(f"{path}: [pool] name = {pool.name!r}: letters, digits, '-' and '_' only (at most 41)")
    for key in ("state_file", "job_records"):
        value = getattr(pool, key)
        if (value or key == "state_file") and not os.path.isabs(value):
            raise ConfigError(f"{path}: [pool] {key} = {value!r}: must be an absolute path")


IDENTITY_KEYS = (
    "auth_url",
    "username",
    "password",
    "user_domain_name",
    "project_name",
    "project_domain_name",
    "application_credential_id",
    "application_credential_secret",
)
OS_ENVIRONMENT = ("OS_CLOUD", "OS_AUTH_URL")  # either one: openstack.config has credentials to read


def credentials_source(cloud: OpenStackConfig) -> str:
    """Where the cloud credentials come from, the first that applies: [openstack] cloud (clouds.yaml
    and secure.yaml), [openstack] auth_url and its keys, else the OS_* environment (an openrc)."""
    if cloud.cloud:
        return f"[openstack] cloud = {cloud.cloud} (clouds.yaml)"
    if cloud.auth_url:
        return f"[openstack] auth_url = {cloud.auth_url}"
    named = [f"{key}={os.environ[key]}" for key in OS_ENVIRONMENT if os.environ.get(key)]
    return f"the OS_* environment ({', '.join(named)})"


def _check_openstack(path: str, cloud: OpenStackConfig, named_classes: bool = False) -> None:
    for key in ("image", "network") if named_classes else ("image", "flavor", "network"):
        if not getattr(cloud, key):
            raise ConfigError(f"{path}: [openstack] {key} is required")
    if cloud.api_timeout <= 0:
        raise ConfigError(f"{path}: [openstack] api_timeout = {cloud.api_timeout!r}: must be > 0 seconds")
    _check_server_prefix(path, cloud)
    if cloud.cloud:
        both = [key for key in IDENTITY_KEYS if getattr(cloud, key)]
        if both:
            raise ConfigError(
                f"{path}: [openstack] cloud = {cloud.cloud!r} takes the credentials from clouds.yaml; "
                f"leave {', '.join(both)} empty (one source of credentials)"
            )
        return
    if not cloud.auth_url:
        if any(getattr(cloud, key) for key in IDENTITY_KEYS):
            raise ConfigError(
                f"{path}: [openstack] auth_url is required with username/password or an application credential"
            )
        if not any(os.environ.get(key) for key in OS_ENVIRONMENT):
            raise ConfigError(
                f"{path}: [openstack] no cloud credentials: set cloud = NAME (an entry of "
                "clouds.yaml), or auth_url with a password or application credential, or run with "
                "an openrc's OS_* variables in the environment"
            )
        return
    password_auth = bool(cloud.username or cloud.password)
    app_cred_auth = bool(cloud.application_credential_id or cloud.application_credential_secret)
    if password_auth == app_cred_auth:
        raise ConfigError(
            f"{path}: [openstack] set either username + password + project_name, "
            "or application_credential_id + application_credential_secret (exactly one)"
        )
    needed = (
        ("username", "password", "project_name")
        if password_auth
        else ("application_credential_id", "application_credential_secret")
    )
    for key in needed:
        if not getattr(cloud, key):
            raise ConfigError(f"{path}: [openstack] {key} is required with this kind of authentication")


def _check_server_prefix(path: str, cloud: OpenStackConfig) -> None:
    if cloud.server_prefix and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", cloud.server_prefix):
        raise ConfigError(
            f"{path}: [openstack] server_prefix = {cloud.server_prefix!r}: letters, digits, '-', '_', '.'"
        )


def _check_ssh(path: str, ssh: SshConfig) -> None:
    if not POSIX_NAME_RE.match(ssh.user):
        raise ConfigError(f"{path}: [ssh] user = {ssh.user!r}: must be a POSIX user name")
    if not 1 <= ssh.port <= 65535:
        raise ConfigError(f"{path}: [ssh] port = {ssh.port!r}: must be 1-65535")
    for key in ("private_key", "known_hosts"):
        if not os.path.isabs(getattr(ssh, key)):
            raise ConfigError(f"{path}: [ssh] {key} = {getattr(ssh, key)!r}: must be an absolute path")
    for key in ("connect_timeout", "banner_timeout", "auth_timeout", "command_timeout"):
        if getattr(ssh, key) <= 0:
            raise ConfigError(f"{path}: [ssh] {key} = {getattr(ssh, key)!r}: must be > 0 seconds")
    if ssh.probe_parallelism < 1:
        raise ConfigError(f"{path}: [ssh] probe_parallelism = {ssh.probe_parallelism!r}: must be >= 1")


def _check_batch(path: str, batch: BatchConfig) -> None:
    if batch.system not in BATCH_SYSTEMS:
        raise ConfigError(f"{path}: [batch] system = {batch.system!r}: one of {', '.join(BATCH_SYSTEMS)}")
    if batch.command and not os.path.isabs(batch.command):
        raise ConfigError(f"{path}: [batch] command = {batch.command!r}: must be an absolute path")


def _check_operations(path: str, check: CheckConfig, metrics: MetricsConfig, logs: LoggingConfig) -> None:
    for key in (
        "reconcile_warning",
        "reconcile_critical",
        "wait_warning",
        "wait_critical",
        "unusable_warning",
        "unusable_critical",
    ):
        if not NAGIOS_RANGE_RE.match(getattr(check, key)):
            raise ConfigError(
                f"{path}: [check] {key} = {getattr(check, key)!r}: expected a Nagios range "
                "(e.g. 300, 10:, @10:20) or nothing"
            )
    for key in ("protected", "paused"):
        if getattr(check, key) not in CHECK_LEVELS:
            raise ConfigError(f"{path}: [check] {key} = {getattr(check, key)!r}: one of {', '.join(CHECK_LEVELS)}")
    if check.timeout <= 0:
        raise ConfigError(f"{path}: [check] timeout = {check.timeout!r}: must be > 0 seconds")
    if metrics.textfile and (not os.path.isabs(metrics.textfile) or not metrics.textfile.endswith(".prom")):
        raise ConfigError(
            f"{path}: [metrics] textfile = {metrics.textfile!r}: must be an absolute path "
            "ending in .prom (node_exporter's textfile collector reads only *.prom)"
        )
    if logs.facility not in SYSLOG_FACILITIES:
        raise ConfigError(f"{path}: [logging] facility = {logs.facility!r}: one of {', '.join(SYSLOG_FACILITIES)}")


def _check_key_permissions(path: str, ssh: SshConfig) -> None:
    """OpenSSH refuses a private key others can read; say so now rather than at the first probe."""
    try:
        mode = os.stat(ssh.private_key).st_mode
    except (FileNotFoundError, PermissionError):
        # status and release work without it, `check` too (run by a monitoring user, not root);
        # acquire and reconcile say so (require_private_key), probes too
        return
    except OSError as error:
        raise ConfigError(f"{path}: [ssh] private_key = {ssh.private_key!r}: {error}") from None
    if mode & 0o077:
        raise ConfigError(
            f"{path}: [ssh] private_key = {ssh.private_key!r} is accessible by group/others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {ssh.private_key}"
        )


def require_private_key(config: Config) -> None:
    """acquire and reconcile log in to VMs (the hooks too, with the same key): say so now if it is missing."""
    if not os.path.isfile(config.ssh.private_key):
        raise ConfigError(
            f"{config.path}: [ssh] private_key = {config.ssh.private_key!r}: no such file "
            "(the key root logs in to the VMs with, registered in Nova as [openstack] key_name)"
        )


def _check_secret_permissions(path: str, parser: configparser.ConfigParser, mode: int) -> None:
    has_secret = parser.has_section("openstack") and any(
        parser.get("openstack", key, fallback="") for key in SECRET_KEYS
    )
    if has_secret and mode & 0o077:
        raise ConfigError(
            f"{path}: holds a password or secret but is readable by group/others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )


def must_be_root(why: str) -> str:
    """What a permission error means when vmpool does not run as root: the fix ("" as root)."""
    if os.geteuid() == 0:
        return ""
    return f": vmpool must run as root ({why}); run it as root or with sudo"


def _path_and_directories(path: str) -> Iterator[str]:
    """`path`, the directories above it, then the same for where its symlinks lead (each once)."""
    seen: set[str] = set()
    for start in (os.path.abspath(path), os.path.realpath(path)):
        current = start
        while current not in seen:
            seen.add(current)
            yield current
            current = os.path.dirname(current)


def not_roots_alone(path: str) -> tuple[str, os.stat_result] | None:
    """Who else could change `path`: the first of it and the directories above it that is owned by
    neither root nor the running user, or writable by group or others (a sticky directory, as /tmp,
    is fine: no one else can replace what is in it), with its stat; None when none is."""
    owners = {0, os.geteuid()}
    for candidate in _path_and_directories(path):
        try:
            info = os.lstat(candidate)
        except OSError:  # not there (yet), or not ours to see: its directory is what counts
            continue
        sticky = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if stat.S_ISLNK(info.st_mode) or (info.st_uid in owners and not (info.st_mode & 0o022 and not sticky)):
            continue
        return candidate, info
    return None


def _refuse_unless_roots_alone(path: str, what: str, target: str) -> None:
    found = not_roots_alone(target)
    if found is not None:
        culprit, info = found
        raise ConfigError(
            f"{path}: {what}, but others can change {culprit} (owner uid {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):04o}) and so make root run anything; "
            f"run: chown root:root {culprit}; chmod go-w {culprit}"
        )


def _program_of(command: str) -> str:
    """The program a command line runs: its first word, looked up on PATH as subprocess will."""
    if not command.strip():
        return ""  # no command: every command's start-up skips shlex
    import shlex

    program = shlex.split(command)[0]
    if os.sep in program:
        return os.path.abspath(program) if program else ""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = os.path.join(directory or ".", program)
        if os.path.isfile(found) and os.access(found, os.X_OK):
            return os.path.abspath(found)
    return ""  # not found: it fails to run, and reconcile says so


def _check_ownership(config: Config) -> None:
    """The config names programs that root runs: whoever can change it, or them, is root on the node."""
    _refuse_unless_roots_alone(config.path, "root runs the programs this config names", config.path)
    program = _program_of(config.pool.job_alive_command)
    if program:
        _refuse_unless_roots_alone(config.path, f"root runs [pool] job_alive_command ({program})", program)
    if config.batch.command:
        _refuse_unless_roots_alone(
            config.path, f"root runs [batch] command = {config.batch.command}", config.batch.command
        )


def _read_config(path: str) -> tuple[configparser.ConfigParser, int]:
    """The INI file parsed, and its mode."""
    try:
        with open(path, encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (use --config or $VMPOOL_CONFIG)") from None
    except PermissionError:
        why = must_be_root("the config is root's alone")
        raise ConfigError(f"{path}: cannot read config: permission denied{why}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config: {error}") from None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as error:
        raise ConfigError(f"{path}: not a valid INI file: {error}") from None
    return parser, mode


def load_config(path: str) -> Config:
    """Read and validate the INI file; every error names the file, the key and what is allowed."""
    parser, mode = _read_config(path)
    sections = ("pool", "openstack", "ssh", "batch", "check", "metrics", "logging")
    unknown = {section for section in parser.sections() if not section.startswith("class ")} - set(sections)
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {sorted(unknown)}; allowed: "
            + ", ".join(f"[{name}]" for name in sections)
            + ", [class NAME]"
        )
    _check_secret_permissions(path, parser, mode)
    config = Config(
        path=path,
        pool=_build_section(path, parser, "pool", PoolConfig),
        openstack=_build_section(path, parser, "openstack", OpenStackConfig),
        ssh=_build_section(path, parser, "ssh", SshConfig),
        batch=_build_section(path, parser, "batch", BatchConfig),
        check=_build_section(path, parser, "check", CheckConfig),
        metrics=_build_section(path, parser, "metrics", MetricsConfig),
        logging=_build_section(path, parser, "logging", LoggingConfig),
    )
    _check_pool_limits(path, config.pool)
    config = dataclasses.replace(config, pool=_build_classes(path, parser, config.pool, config.openstack.flavor))
    _check_openstack(path, config.openstack, named_classes=any(name.startswith("class ") for name in parser.sections()))
    _check_ssh(path, config.ssh)
    _check_batch(path, config.batch)
    _check_operations(path, config.check, config.metrics, config.logging)
    _check_key_permissions(path, config.ssh)
    _check_ownership(config)
    return config


# --- the model ---


@dataclass
class Vm:
    """One server of the pool as vmpool sees it."""

    name: str
    state: VmState
    since: float
    created_at: float
    server_id: str | None = None
    address: str | None = None
    reason: str = ""
    job: str | None = None
    user: str | None = None
    last_job: str | None = None
    last_healthy: float | None = None
    tainted: str = ""
    delete_requested_at: float | None = None
    host_keys: list[str] = field(default_factory=list)
    job_missing_since: float | None = None
    absent_since: float | None = None  # first listing that lacked the server (one is not proof)
    drained: str = ""  # an admin's "no new job": who, when and why; deleted once it holds no job
    vm_class: str = DEFAULT_CLASS  # left out of the state file while it is the default (OMITTED_AT_DEFAULT)

    @property
    def why(self) -> Why:
        """The kind of this VM's reason (the one place its text is read)."""
        if self.reason.startswith("status "):
            return Why.STATUS
        word = self.reason.partition(":")[0]
        if word in _WHY_BY_WORD and (word == self.reason or self.reason[len(word)] == ":"):
            return _WHY_BY_WORD[word]
        return Why.TAINTED if self.tainted else Why.NONE

    @property
    def detail(self) -> str:
        """The free text of this VM's reason, after its kind."""
        why = self.why
        if why is Why.STATUS:
            return self.reason[len("status ") :]
        return self.reason if why in (Why.TAINTED, Why.NONE) else self.reason[len(why.value) :].lstrip(": ")

    @property
    def booting(self) -> bool:
        """Still on its way to its first Free: counts as capacity that is coming."""
        return (
            self.state == UNUSABLE
            and not self.tainted
            and self.last_healthy is None
            and (self.why in (Why.CREATING, Why.BUILDING, Why.ADOPTED, Why.UNREACHABLE))
        )

    @property
    def deleting(self) -> bool:
        return self.delete_requested_at is not None

    @property
    def open_to_jobs(self) -> bool:
        """Free and not drained: a job may be given it."""
        return self.state == FREE and not self.drained


@dataclass
class Request:
    """A job waiting in acquire for a VM; served first-come first-served."""

    job: str
    user: str
    since: float
    pid: int
    host: str
    pid_start: int = 0  # the process's start time (clock ticks after boot): a reused pid is not this one
    started: float = 0.0  # when this attempt of the job began (the prologue's start)
    # what the job asked for (memory in MiB) and the class that fits it ("": not known until the
    # classes' flavors are: the next reconcile pass learns them); each left out while at its default
    cores: int = 1
    memory: int = 0
    gpus: int = 0
    vm_class: str = DEFAULT_CLASS

    @property
    def want(self) -> Want:
        return Want(self.cores, self.memory, self.gpus)


class Want(NamedTuple):
    """A job's resources, or a class's (memory in MiB). A NamedTuple: immutable and compared as a
    dataclass would be, but made at every start for a tenth of a frozen dataclass's cost."""

    cores: int = 1
    memory: int = 0
    gpus: int = 0

    def fits_in(self, size: Want) -> bool:
        return self.cores <= size.cores and self.memory <= size.memory and self.gpus <= size.gpus

    def __str__(self) -> str:
        memory = f"{self.memory // 1024}G" if self.memory % 1024 == 0 else f"{self.memory}M"
        return (
            f"{self.cores} cores"
            + (f", {memory} memory" if self.memory else "")
            + (f", {self.gpus} GPU(s)" if self.gpus else "")
        )


@dataclass
class ClassHealth:
    """How a class's creates fare: failed boots in a row, protected mode, the back-off after a
    refusal. Kept per class: a bad image or a quota on big flavors stops that class's boots, not
    the others'. The state file keeps the one class "default"'s at the top level, where a state
    from before classes has them."""

    boot_failures: int = 0
    protected_since: float | None = None
    backoff_until: float | None = None
    backoff_delay: float = 0.0

    def backing_off(self, now: float) -> bool:
        return self.backoff_until is not None and now < self.backoff_until


@dataclass
class PoolState:
    """The state file's content: the VMs, the waiting jobs, back-off and protected mode, counters."""

    pool: str
    vms: list[Vm] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    # waiters a freed VM was handed to while they slept (the VM is Busy for their job): each takes
    # its VM at its next look; should its acquire end first, the VM, untouched, is Free again
    handed: list[Request] = field(default_factory=list)
    serial: int = 0
    orphans: dict[str, float] = field(default_factory=dict)  # server id -> first seen
    last_reconcile: float | None = None
    last_pass: float | None = None
    health: dict[str, ClassHealth] = field(default_factory=dict)  # class -> its creates' health
    last_cloud_error: str = ""
    last_cloud_error_at: float | None = None
    ended_jobs: dict[str, float] = field(default_factory=dict)  # job -> when its release ran
    # name -> when the pool forgot a server that had served no unscrubbed job (a create intent
    # that never showed up, a Free VM missing from two listings): should it show up, it is clean
    dropped_clean: dict[str, float] = field(default_factory=dict)
    clock: dict[str, Any] = field(default_factory=dict)  # wall and boot clocks at the last write
    paused_since: float | None = None  # an admin paused creates (vmpool pause)
    paused_by: str = ""
    paused_reason: str = ""
    # Prometheus counters (only ever grow): boots, failed_boots, deletes, acquires, releases, tainted_releases
    counters: dict[str, int] = field(default_factory=dict)
    # acquire wait histogram: claims per ACQUIRE_WAIT_BUCKETS bucket (+ one for longer), their sum and count
    acquire_wait: dict[str, Any] = field(default_factory=dict)
    # the project's quota refused this pool's last create while its jobs waited: it asks the other
    # pools in the project to give way (their idle VMs) until a create goes through
    quota_blocked_since: float | None = None
    # the classes' flavors as Nova describes them: flavor ID -> {"vcpus", "ram" (MiB), "gpus"}
    flavors: dict[str, dict[str, int]] = field(default_factory=dict)
    # class -> the limit that held back the creates its waiting jobs need (the pool's, the class's,
    # the project's quota), as the last pass found it: the acquire timeout message names it
    held_back: dict[str, str] = field(default_factory=dict)

    def class_health(self, vm_class: str = DEFAULT_CLASS) -> ClassHealth:
        """The class's health record, made at its first change (plan_* functions change a copy)."""
        health = self.health.get(vm_class)
        if health is None:
            health = self.health[vm_class] = ClassHealth()
        return health

    def health_of(self, vm_class: str = DEFAULT_CLASS) -> ClassHealth:
        """The class's health, to read: a class that never failed has a fresh record."""
        return self.health.get(vm_class) or ClassHealth()

    def worst_health(self) -> ClassHealth:
        """The pool's health as one record (monitoring's and status's pool-wide figures): the most
        failed boots, protected since the first class was, backing off until the last class is."""
        records = list(self.health.values())
        protected = [health.protected_since for health in records if health.protected_since is not None]
        longest = max(records, key=lambda health: health.backoff_until or 0.0, default=ClassHealth())
        return ClassHealth(
            max((health.boot_failures for health in records), default=0),
            min(protected, default=None),
            longest.backoff_until,
            longest.backoff_delay,
        )

    def vm_named(self, name: str) -> Vm | None:
        return next((vm for vm in self.vms if vm.name == name), None)

    def vm_of_job(self, job: str) -> Vm | None:
        return next((vm for vm in self.vms if vm.job == job), None)

    def count(self, state: str) -> int:
        return sum(1 for vm in self.vms if vm.state == state)


def copy_state(state: PoolState) -> PoolState:
    """A deep copy for a plan_* function to change. copy.deepcopy's generic walk (memo, reduce)
    was most of a claim's lock hold with a few hundred VMs; the state holds only records, lists,
    dicts and immutable values, which _copied rebuilds directly."""
    copied: PoolState = _copied(state)
    return copied


# the state's tuples hold only these; a VM's state (an enum member) is immutable too: not deep-copied
_IMMUTABLE = frozenset({str, int, float, bool, type(None), tuple, VmState})


def _copied(value: Any) -> Any:
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is list:
        return [item if type(item) in _IMMUTABLE else _copied(item) for item in value]
    if kind is dict:
        return {key: item if type(item) in _IMMUTABLE else _copied(item) for key, item in value.items()}
    if hasattr(kind, "__dataclass_fields__"):  # a record (a class itself is not: its kind is type)
        new = object.__new__(kind)  # as copy.copy makes it, without its __reduce_ex__ round trip
        new.__dict__.update(
            {name: item if type(item) in _IMMUTABLE else _copied(item) for name, item in value.__dict__.items()}
        )
        return new
    return copy.deepcopy(value)  # anything else a future field might hold


ACQUIRE_WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)  # seconds


def _count(state: PoolState, counter: str, amount: int = 1) -> None:
    state.counters[counter] = state.counters.get(counter, 0) + amount


def _observe_wait(state: PoolState, seconds: float) -> None:
    """One claim into the acquire wait histogram kept in the state."""
    histogram = state.acquire_wait
    buckets = histogram.setdefault("buckets", [0] * (len(ACQUIRE_WAIT_BUCKETS) + 1))
    index = next((i for i, bound in enumerate(ACQUIRE_WAIT_BUCKETS) if seconds <= bound), len(ACQUIRE_WAIT_BUCKETS))
    buckets[index] += 1
    histogram["sum"] = histogram.get("sum", 0.0) + max(0.0, seconds)
    histogram["count"] = histogram.get("count", 0) + 1


# Nova's statuses, translated at the boundary into the few that matter to the policy.
# SERVER_UNKNOWN: Nova cannot say (a server in a down cell): no news, neither good nor bad.
SERVER_ACTIVE, SERVER_BUILDING, SERVER_ERROR, SERVER_DOWN, SERVER_DELETING, SERVER_OTHER, SERVER_UNKNOWN = (
    "active",
    "building",
    "error",
    "down",
    "deleting",
    "other",
    "unknown",
)

# The observations, actions and outcomes below are made once and only read, yet not frozen:
# frozen=True generates three more methods per class, paid for at every command's start-up.


@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class Server:
    """One server as the cloud lists it."""

    id: str
    name: str
    status: str
    address: str | None = None
    fault: str = ""
    vm_name: str = ""  # from the pool's metadata
    vm_class: str = DEFAULT_CLASS  # from the pool's metadata
    created_at: float | None = None


class ServerListing(list[Server]):
    """The cloud's servers; `complete` False when it may have left some out without a word."""

    complete = True


@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class JobRecord:
    """The hooks' record of a job's VM on this node (JOB_DIR/<job>/root.env, root's own), written
    after acquire and removed after release: it outlives a lost or restored state file."""

    job: str
    vm_name: str
    server_id: str
    user: str
    host_keys: tuple[str, ...] = ()


@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class ProbeResult:
    """One VM's SSH probe: did root log in, and the host keys seen."""

    name: str
    ok: bool
    detail: str = ""
    host_keys: tuple[str, ...] = ()  # keys learned (console or first contact) to pin
    host_key_changed: bool = False
    server_id: str = ""


@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class Observation:
    """What a reconcile pass saw outside the state: the cloud, local processes, jobs."""

    servers: list[Server] | None  # None: the listing failed, so nothing server-related is decided
    live_waiters: frozenset[tuple[int, int]] = frozenset()  # this host's waiting acquires: (pid, start)
    host: str = ""
    # jobs the batch system says are gone; None: it was not asked (an acquire's waiting pass),
    # which is no news either way, so a grace already running goes on running
    dead_jobs: frozenset[str] | None = frozenset()
    unsure_jobs: frozenset[str] = frozenset()  # asked, but no answer (down, hung): no news either
    probe_free: bool = True  # cron probes Free VMs; acquire's waiting passes do not
    records: Sequence[JobRecord] = ()  # job records the state does not explain (see job_records_to_follow)
    others_wanting: frozenset[str] = frozenset()  # other pools in the project whose jobs wait on its quota
    # False: the cloud may have left servers out without a word (ServerListing): absence proves nothing
    listing_complete: bool = True
    # Nova's absolute limits and use (maxTotalCores, totalCoresUsed, ...; -1: none); None: not asked
    limits: dict[str, int] | None = None


JobAnswers = tuple[frozenset[str] | None, frozenset[str]]  # Observation's dead_jobs and unsure_jobs


# Actions: decisions as data, applied by the executor through the adapters.
@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class CreateServer:
    """Action: create the server of an intent the state already records."""

    name: str
    vm_class: str = DEFAULT_CLASS


@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class DeleteServer:
    """Action: delete a server, and why."""

    name: str
    server_id: str
    reason: str


@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class ProbeSsh:
    """Action: probe a VM over SSH, with the host keys to pin."""

    name: str
    server_id: str
    address: str
    host_keys: tuple[str, ...]
    first_contact: bool = False  # never healthy yet: a key may be learned if the console has none


@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class Note:
    """A log line the policy wants an admin to see."""

    level: int
    message: str


Action = CreateServer | DeleteServer | ProbeSsh | Note


@dataclass
class Claimed:
    """Outcome of plan_acquire: the job has its VM."""

    vm: Vm
    already_held: bool = False  # the job held it before: an earlier run of its prologue may have prepared it
    handed: bool = False  # freed while the job waited, it was handed over at once (plan_hand_over)
    notes: list[Note] = field(default_factory=list)


@dataclass
class Waiting:
    """Outcome of plan_acquire: the job waits, at this place in the queue."""

    position: int
    notes: list[Note] = field(default_factory=list)


@dataclass
class Ended:
    """The job's release ran after this attempt began: its epilogue is done, it gets nothing."""

    at: float


@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class Refused:
    """No class of the pool fits the job: it never gets a VM here (the sentence names the largest class)."""

    why: str


# --- the pure pool policy ---
# These functions take a state and observations and return a new state plus actions.
# They never touch the network, the disk or the clock.

ONE_CLASS = PoolConfig()  # a policy call given no pool config: today's one class, "default"

WAITER_POLL_STRETCH = 8  # a waiter far back in the queue looks at most every 8 acquire_polls
FREED_MARK_RESET = 1 << 20  # the freed mark starts again past this many VMs


def describe_vm(vm: Vm) -> str:
    return f"vm {vm.name} ({vm.address or 'no address'})"


def _set_state(vm: Vm, state: VmState, reason: str, now: float) -> None:
    if vm.state != state or vm.reason != reason:
        vm.since = now
    vm.state, vm.reason = state, reason


# -- acquire and hand-over --


def plan_acquire(
    state: PoolState,
    job: str,
    user: str,
    now: float,
    pid: int,
    host: str,
    live_waiters: frozenset[tuple[int, int]],
    *,
    started: float | None = None,
    pid_start: int = 0,
    records: Sequence[JobRecord] = (),
    want: Want = Want(),
    pool: PoolConfig | None = None,
) -> tuple[PoolState, Claimed | Waiting | Ended | Refused]:
    """Claim a Free VM of the smallest class the job's `want` fits in, or queue it first-come
    first-served (per class); refuse it when no class fits.

    `started` is when this attempt of the job began: a release of the job after it means the
    job's epilogue ran (the job was deleted while it waited) and the attempt gets nothing.
    `records` are job records the state does not explain: their VMs are their jobs' first.
    """
    pool = pool or ONE_CLASS
    new = copy_state(state)
    notes: list[Note] = _follow_records(new, records, now)
    waiting = next((r for r in new.requests if r.job == job and r.pid == pid and r.host == host), None)
    # the stored start moves with a wall-clock step (plan_clock); the caller's copy would not
    started = waiting.started if waiting is not None else (now if started is None else started)
    ended = new.ended_jobs.get(job)
    if ended is not None and ended >= started:
        new.requests = [r for r in new.requests if r.job != job]
        return new, Ended(ended)
    handed = next((r for r in new.handed if r.job == job and r.pid == pid and r.host == host), None)
    new.handed = [r for r in new.handed if r.job != job]  # from here on the job's VM is this process's
    held = new.vm_of_job(job)
    if held is not None and held.state == BUSY and _same_owner(held.user, user):
        # the job runs there, or its prologue runs again: it keeps its VM (an acquire without
        # --user names no other owner; a VM recorded without one learns it now)
        held.user = held.user or user
        return new, Claimed(held, already_held=handed is None, handed=handed is not None, notes=notes)
    for stale in (vm for vm in new.vms if vm.job == job):
        # Nobody scrubbed this VM: the job asks again while an Unusable VM is still its own, or
        # a reused job id (a reset pbs_server) of another user finds the first owner's VM.
        owner = f" of {stale.user or 'no user'}" if stale.user != user else ""
        _give_up_job(stale, f"held by job {job}{owner} when it asked for a VM again", now)
        notes.append(Note(logging.WARNING, f"{describe_vm(stale)} tainted: {stale.tainted}; never handed out again"))
    _prune_requests(new, live_waiters, host, now)
    request = next((r for r in new.requests if r.job == job), None)
    if request is None and handed is not None:  # its VM failed before it took it: its place is kept
        new.requests.insert(sum(1 for r in new.requests if r.since <= handed.since), handed)
        request = handed
    elif request is None:
        request = Request(job=job, user=user, since=now, pid=pid, host=host, pid_start=pid_start, started=started)
        request.cores, request.memory, request.gpus = want.cores, want.memory, want.gpus
        request.vm_class = ""
        new.requests.append(request)
    else:  # a re-run of the prologue: this process now waits for the job
        request.pid, request.host, request.pid_start, request.user = pid, host, pid_start, user
    refusal = _decide_class(new, pool, request)
    if refusal:
        return new, Refused(refusal)
    ahead = new.requests[: new.requests.index(request)]
    if not request.vm_class:  # the classes' sizes are not known yet: a reconcile pass learns them
        return new, Waiting(len(ahead), notes)
    position = sum(1 for r in ahead if r.vm_class == request.vm_class and not _passed_over(new, r))
    free = _serving(new, pool, free_vms(new), request)
    if len(free) <= position:
        return new, Waiting(position, notes)
    vm = free[0]
    _claim(new, vm, request, now)
    return new, Claimed(vm, notes=notes)


# -- VM classes: which class a job needs, which VMs may serve it --


def class_size(state: PoolState, vm_class: ClassConfig | None) -> Want | None:
    """A class's cores, memory (MiB) and GPUs, once a reconcile pass had Nova describe its flavor."""
    flavor = state.flavors.get(vm_class.flavor) if vm_class is not None else None
    if vm_class is None or flavor is None:
        return None
    return Want(flavor["vcpus"], flavor["ram"], vm_class.gpus if vm_class.gpus >= 0 else flavor.get("gpus", 0))


def choose_class(state: PoolState, pool: PoolConfig, want: Want) -> tuple[str, str]:
    """The smallest class the job fits in ("" while a class's size is unknown), or why none does.

    One class and a job of one core, no memory, no GPU: that class without its size (today's pool,
    whose acquire must not wait on the cloud to learn it)."""
    classes = pool.vm_classes
    if len(classes) == 1 and want == Want():
        return classes[0].name, ""
    sized = [(vm_class, class_size(state, vm_class)) for vm_class in classes]
    known = [(vm_class, size) for vm_class, size in sized if size is not None]
    if len(known) < len(sized):
        return "", ""
    fitting = [(vm_class, size) for vm_class, size in known if want.fits_in(size)]
    if fitting:
        return min(fitting, key=lambda pair: (pair[1].gpus, pair[1].cores, pair[1].memory))[0].name, ""
    largest, size = max(known, key=lambda pair: (pair[1].cores, pair[1].memory, pair[1].gpus))
    return "", f"asks for {want}: more than any class of the pool offers (the largest, {largest.name}, has {size})"


def _decide_class(state: PoolState, pool: PoolConfig, request: Request) -> str:
    """Give an undecided request its class; a request no class fits leaves the queue: why, or ""."""
    if request.vm_class:
        return ""
    request.vm_class, refusal = choose_class(state, pool, request.want)
    if refusal:
        state.requests.remove(request)
        return f"job {request.job} {refusal}"
    return ""


def _serving(state: PoolState, pool: PoolConfig, free: list[Vm], request: Request) -> list[Vm]:
    """The Free VMs that may serve the request: its own class's first, then (if [pool]
    bigger_vm_may_serve) those of any class it fits in."""
    own = [vm for vm in free if vm.vm_class == request.vm_class]
    if not pool.bigger_vm_may_serve or not request.vm_class:
        return own
    sizes = {vm_class.name: class_size(state, vm_class) for vm_class in pool.vm_classes}
    bigger = [
        vm
        for vm in free
        if vm.vm_class != request.vm_class and (size := sizes.get(vm.vm_class)) and request.want.fits_in(size)
    ]
    return own + bigger


def _same_owner(holder: str | None, asker: str) -> bool:
    """An empty name is an unknown owner, never proof of another one."""
    return not holder or not asker or holder == asker


# -- the hooks' job records: after a lost, corrupt or restored state file --


def _follow_records(state: PoolState, records: Sequence[JobRecord], now: float) -> list[Note]:
    """Where the hooks' job records and the state disagree, the records are right: the state file
    was lost, corrupt or restored from a backup, and a running job must keep its VM and no other
    job may be given it. A record exists from the prologue's acquire to the epilogue's release."""
    naming: dict[str, list[str]] = {}
    for record in records:
        naming.setdefault(record.server_id, []).append(record.job)
    notes: list[Note] = []
    for record in records:
        vm = next((vm for vm in state.vms if vm.server_id == record.server_id), None)
        if vm is None or vm.job == record.job or record.job in state.ended_jobs:
            continue  # unknown to the state: adopted for the job once listed (_adopt_orphans)
        others = [job for job in naming[record.server_id] if job != record.job] + ([vm.job] if vm.job else [])
        if others:
            if not vm.tainted:
                vm.tainted = f"named by the records of jobs {', '.join(sorted({record.job, *others}))}"
                _set_state(vm, UNUSABLE, vm.tainted, now)
                notes.append(
                    Note(
                        logging.ERROR,
                        f"{describe_vm(vm)} {vm.tainted}: several jobs may run there; "
                        "never handed out again, deleted once released",
                    )
                )
            continue
        if vm.deleting:
            notes.append(
                Note(
                    logging.ERROR,
                    f"{describe_vm(vm)} runs job {record.job} by its record, but its "
                    "delete was already sent: the job loses its VM",
                )
            )
            continue
        was = f"{vm.state}" + (f" ({vm.reason})" if vm.reason else "")
        vm.job, vm.user, vm.job_missing_since = record.job, record.user, None
        if vm.tainted == UNKNOWN_PAST:
            vm.tainted = ""  # the record tells its past
        vm.host_keys = vm.host_keys or list(record.host_keys)
        vm.last_healthy = vm.last_healthy or now  # it served a job: not a boot to wait for
        if vm.state == FREE or vm.reason == UNKNOWN_PAST:
            _set_state(vm, BUSY, "", now)
        notes.append(
            Note(
                logging.ERROR,
                f"{describe_vm(vm)} runs job {record.job} ({record.user}) by the hooks' "
                f"record, but the state had it {was}: the state file was lost or "
                "restored; the VM is the job's again",
            )
        )
    return notes


def _claim(state: PoolState, vm: Vm, request: Request, now: float) -> None:
    _set_state(vm, BUSY, "", now)
    vm.job, vm.user, vm.job_missing_since = request.job, request.user, None
    state.requests.remove(request)
    _count(state, "acquires")
    _observe_wait(state, now - request.since)


def free_vms(state: PoolState) -> list[Vm]:
    """The VMs a job may be given, the most recently freed first: the others keep ageing, so a
    light load leaves the rest idle long enough to be trimmed (cloud hours are the site's bill)."""
    return sorted((vm for vm in state.vms if vm.open_to_jobs), key=lambda vm: vm.since, reverse=True)


def plan_hand_over(
    state: PoolState, now: float, host: str, alive: Callable[[Request], bool], pool: PoolConfig | None = None
) -> tuple[PoolState, list[Action]]:
    """Hand the Free VMs to the jobs at the head of the queue, in queue order, as they come Free.

    A waiter only learns of a freed VM at its next look, and takes the state lock after others
    woken with it, in whatever order the lock goes: claimed by the waiters themselves, a burst's
    VMs went out of queue order by seconds. Handed over by the change that frees them (a release,
    a boot, a recovery), each goes to the first waiter in line at once; the waiter finds it Busy
    for its job. A request ahead whose acquire died (alive says so; only this host's can be asked)
    is pruned rather than given a VM.
    """
    if not state.requests or not any(vm.open_to_jobs for vm in state.vms):
        return state, []
    new = copy_state(state)
    free = free_vms(new)
    notes: list[Action] = []
    for request in list(new.requests):
        if not free:
            break
        if request.host == host and not alive(request):
            new.requests.remove(request)
            continue
        serving = _serving(new, pool or ONE_CLASS, free, request)
        if _passed_over(new, request) or not serving:
            continue
        vm = serving[0]
        free.remove(vm)
        _claim(new, vm, request, now)
        new.handed.append(request)
        notes.append(
            Note(
                logging.INFO,
                f"{describe_vm(vm)} handed to job {request.job} ({request.user}), "
                f"first in line after {now - request.since:.1f}s",
            )
        )
    return new, notes


def _passed_over(state: PoolState, request: Request) -> bool:
    """A request that takes no VM in its turn: its job ended (its own locked try ends the wait), or
    its job still holds one (its own locked try sorts that out)."""
    ended = state.ended_jobs.get(request.job)
    return (ended is not None and ended >= request.started) or state.vm_of_job(request.job) is not None


def _give_up_job(vm: Vm, taint: str, now: float) -> None:
    """Detach the VM from its job and make sure it never serves anyone else."""
    vm.last_job, vm.job, vm.user, vm.job_missing_since = vm.job, None, None, None
    vm.tainted = vm.tainted or taint
    _set_state(vm, UNUSABLE, vm.tainted, now)


def vms_still_to_free(
    state: PoolState, job: str, pid: int, host: str, alive: Callable[[Request], bool] = lambda request: True
) -> int:
    """Seen in an unlocked snapshot: how many more VMs must come Free before a locked try can
    claim one for this waiter; 0 when a locked try could claim now, or end the wait.

    Waiting acquires poll; a full locked read-modify-write per poll would saturate the state lock
    with a few hundred waiters, so they look first and lock only when something changed for them.
    A request ahead whose acquire died (alive says so; only this host's can be asked) does not
    hold a place: the locked try prunes it. The count also spaces the waiter's looks: the tenth
    in line need not look as often as the first.
    """
    request = next((r for r in state.requests if r.job == job and r.pid == pid and r.host == host), None)
    if request is None:
        return 0  # withdrawn (the job's release) or pruned: the locked try says which
    ended = state.ended_jobs.get(job)
    if ended is not None and ended >= request.started:
        return 0
    if not request.vm_class:
        return 1  # its class is decided by a pass (which learns the flavors), or a bigger VM is handed to it
    free = sum(1 for vm in state.vms if vm.open_to_jobs and vm.vm_class == request.vm_class)
    ahead = [other for other in state.requests[: state.requests.index(request)] if other.vm_class == request.vm_class]
    return max(
        0,
        sum(1 for other in ahead if (other.host != host or alive(other)) and not _passed_over(state, other)) + 1 - free,
    )


def waiter_sleep(to_free: int, claims_per_second: float | None, poll: float) -> float:
    """How long a waiter sleeps before its next unlocked look (each look parses the whole state).

    Next in line (or nearly): one acquire_poll, so a freed VM is taken at once. Further back: about
    half the time the queue needs, at the rate it moved since the last look, to reach it; at most
    WAITER_POLL_STRETCH polls. 200 waiters looking every poll would spend both cores of a node
    parsing the state; spaced out, a burst's claims and releases get the CPU and the lock instead.
    """
    if to_free <= 1:
        return poll
    if not claims_per_second:
        return poll * WAITER_POLL_STRETCH  # the queue does not move: nothing to be quick for
    return min(max(poll, to_free / claims_per_second / 2), poll * WAITER_POLL_STRETCH)


def newly_free(before: PoolState, after: PoolState) -> int:
    """VMs a change made Free (a release, a boot, a recovery): what waiters are woken for."""
    was_free = {vm.name for vm in before.vms if vm.open_to_jobs}
    return sum(1 for vm in after.vms if vm.open_to_jobs and vm.name not in was_free)


def vms_freed_since(mark: int, now: int) -> int:
    """VMs that came Free between two readings of the store's freed mark (a mark that went back
    was reset: take it as many, so the waiter looks)."""
    return now - mark if now >= mark else FREED_MARK_RESET


def waiting_pass_may_help(state: PoolState, pool: PoolConfig) -> bool:
    """Can a pass run by a waiting acquire bring a VM nearer? Not when the pool is at max and
    every VM is Free or Busy: nothing boots, nothing can be created, and nothing waits for a probe
    (such a pass would only cost each waiter the cloud client's import; cron's pass still runs)."""
    return len(state.vms) < pool.max or any(vm.state == UNUSABLE for vm in state.vms)


def withdraw_request(state: PoolState, job: str, now: float) -> PoolState:
    """The job's acquire gives up: its request goes, and a VM handed to it, never used, is Free again."""
    new = copy_state(state)
    new.requests = [r for r in new.requests if r.job != job]
    _take_back(new, [r for r in new.handed if r.job == job], now)
    return new


def waiter_of(request: Request) -> tuple[int, int]:
    """The acquire process behind a request: its pid and start time (a pid alone may be reused,
    by another waiter too)."""
    return request.pid, request.pid_start


def _prune_requests(state: PoolState, live_waiters: frozenset[tuple[int, int]], host: str, now: float) -> None:
    """Drop requests whose acquire process died (on this host): they would block the queue. A VM
    handed to such a process was never touched: Free again."""
    state.requests = [r for r in state.requests if r.host != host or waiter_of(r) in live_waiters]
    _take_back(state, [r for r in state.handed if r.host == host and waiter_of(r) not in live_waiters], now)


def _take_back(state: PoolState, handed: list[Request], now: float) -> None:
    """VMs handed to waiters that never took them: untouched, Free again as any release would free
    them (a VM whose address changed meanwhile is probed first)."""
    for request in handed:
        state.handed.remove(request)
        vm = state.vm_of_job(request.job)
        if vm is not None and vm.state == BUSY and vm.user == request.user and not vm.tainted:
            last_job = vm.last_job  # the job never ran there
            _release_vm(vm, request.job, "", now)
            vm.last_job = last_job


# -- release --

ENDED_JOBS_KEPT = 2000  # releases remembered (a deleted job's prologue may wake much later)
ENDED_JOBS_MAX_AGE = 7 * 86400.0


def plan_release(
    state: PoolState, job: str, now: float, unusable: str = "", pool: PoolConfig | None = None
) -> tuple[PoolState, list[Action]]:
    """Give the job's VM back: Free, or tainted Unusable when it may be dirty or is single-use.

    The release is also the job's end: a prologue of this attempt still waiting for a VM
    (pbs_mom runs the epilogue of a deleted job while its prologue runs on) gives up.
    """
    new = copy_state(state)
    withdrawn = [r for r in new.requests if r.job == job]
    new.requests = [r for r in new.requests if r.job != job]
    if any(r.job == job for r in new.handed):
        # handed over, never taken by an acquire: nothing ran there, whatever the epilogue fears
        # (without a record of the job it releases it as unusable)
        unusable = ""
        new.handed = [r for r in new.handed if r.job != job]
    _remember_end(new, job, now)
    held = [vm for vm in new.vms if vm.job == job]
    if not held:
        if withdrawn:
            return new, [Note(logging.WARNING, f"job {job}: ended while waiting for a VM; its request is withdrawn")]
        return new, [Note(logging.WARNING, f"job {job}: no VM held, nothing to release")]
    single_use = {vm_class.name for vm_class in (pool or ONE_CLASS).vm_classes if vm_class.single_use}
    notes: list[Action] = [_release_vm(vm, job, unusable, now, vm.vm_class in single_use) for vm in held]
    _count(new, "releases", len(held))
    _count(new, "tainted_releases", sum(1 for vm in held if vm.tainted and not vm.tainted.startswith(SINGLE_USE_TAINT)))
    return new, notes


def _remember_end(state: PoolState, job: str, now: float) -> None:
    state.ended_jobs.pop(job, None)  # re-inserted last: the dict stays in release order
    state.ended_jobs[job] = now
    kept = [(name, at) for name, at in state.ended_jobs.items() if now - at < ENDED_JOBS_MAX_AGE]
    state.ended_jobs = dict(kept[-ENDED_JOBS_KEPT:])


def _release_vm(vm: Vm, job: str, unusable: str, now: float, single_use: bool = False) -> Note:
    if unusable:
        _give_up_job(vm, unusable, now)
        return Note(logging.WARNING, f"{describe_vm(vm)} released by job {job} as unusable: {unusable}")
    was, reason = vm.state, vm.reason
    vm.last_job, vm.job, vm.user, vm.job_missing_since = job, None, None, None
    if was == BUSY and not vm.tainted and single_use:
        vm.tainted = f"{SINGLE_USE_TAINT} {job}"
        _set_state(vm, UNUSABLE, vm.tainted, now)
        return Note(logging.INFO, f"{describe_vm(vm)} released by job {job}; single-use ({vm.vm_class}): to be deleted")
    if was == BUSY and not vm.tainted and not vm.host_keys:
        # Its address changed under the job: the pinned key went with the old address. Free,
        # the next prologue could not verify it; a probe pins it again first.
        _set_state(vm, UNUSABLE, reason_text(Why.UNREACHABLE, "address changed while busy, host key to pin"), now)
        return Note(
            logging.WARNING,
            f"{describe_vm(vm)} released by job {job}; its address changed, probing it before the next job",
        )
    if was == BUSY and not vm.tainted:
        _set_state(vm, FREE, "", now)
        return Note(logging.INFO, f"{describe_vm(vm)} released by job {job}, now free")
    if not vm.tainted:  # it failed under the job: whatever the job left there was never scrubbed
        vm.tainted = f"{reason or was} while held by job {job}"
        _set_state(vm, UNUSABLE, vm.tainted, now)
    return Note(logging.WARNING, f"{describe_vm(vm)} released by job {job} but it is {was} ({reason})")


# -- the reconcile pass, VM by VM --


def desired_size(state: PoolState, pool: PoolConfig, spares: bool = True) -> int:
    return min(pool.max, sum(class_desired(state, pool, vm_class, spares) for vm_class in pool.vm_classes))


def class_desired(state: PoolState, pool: PoolConfig, vm_class: ClassConfig, spares: bool = True) -> int:
    """The class's VMs wanted: its busy ones, one per job waiting for it, its spares; within its min and max."""
    busy = sum(1 for vm in state.vms if vm.state == BUSY and vm.vm_class == vm_class.name)
    waiting = sum(1 for request in state.requests if request.vm_class == vm_class.name)
    wanted = busy + waiting + (vm_class.min_free if spares else 0)
    return max(vm_class.min, min(vm_class.max or pool.max, wanted))


def starved(state: PoolState) -> bool:
    """Jobs wait and the project's quota refused the pool's last create: other pools in the project
    should let their idle VMs go (the signal goes out through the cloud, see ReconcilePass)."""
    return bool(state.requests) and state.quota_blocked_since is not None


def plan_reconcile(state: PoolState, seen: Observation, config: Config, now: float) -> tuple[PoolState, list[Action]]:
    """One reconcile decision: compare the state with the cloud and decide what to do."""
    new = copy_state(state)
    actions: list[Action] = []
    _prune_requests(new, seen.live_waiters, seen.host, now)
    if seen.servers is None:
        return new, actions
    servers = {server.id: server for server in seen.servers}
    suspect = _listing_lost_many(new, servers)
    if suspect:
        actions.append(Note(logging.ERROR, suspect))
    new.last_reconcile = now
    actions += _follow_records(new, seen.records, now)
    for request in list(new.requests):  # the flavors may be known now
        if refusal := _decide_class(new, config.pool, request):
            actions.append(Note(logging.ERROR, refusal))
    by_name = {server.vm_name or server.name: server for server in seen.servers}
    trust_absence = not suspect and seen.listing_complete
    for vm in list(new.vms):
        actions += _reconcile_vm(new, vm, servers, by_name, seen, config, now, trust_absence)
    tagged = [server for server in seen.servers if server.status != SERVER_UNKNOWN]
    actions += _adopt_orphans(new, tagged, seen.records, now)
    if suspect:
        return new, actions  # a listing that lost many servers may hide more: create nothing on it
    listed_names = {name for server in seen.servers for name in (server.name, server.vm_name)}
    give_way = bool(seen.others_wanting) and config.pool.give_way_after > 0
    return new, actions + _scale(new, config, listed_names, now, give_way, seen.limits)


def _listing_lost_many(state: PoolState, servers: dict[str, Server]) -> str:
    """A listing without half or more of the known servers is more likely broken (a page, a cell)
    than true (half of 4 lost, believed, made a pool of max 4 hold 6 once its cell came back)."""
    known = [vm for vm in state.vms if vm.server_id and not vm.deleting]
    lost = [vm for vm in known if vm.server_id not in servers]
    if len(lost) >= 2 and len(lost) * 2 >= len(known):
        return (
            f"the server listing lacks {len(lost)} of {len(known)} known servers at once: treated as "
            "incomplete (nothing dropped, nothing created)"
        )
    return ""


def _reconcile_vm(
    state: PoolState,
    vm: Vm,
    servers: dict[str, Server],
    by_name: dict[str, Server],
    seen: Observation,
    config: Config,
    now: float,
    trust_absence: bool = True,
) -> list[Action]:
    pool = config.pool
    if vm.server_id is None:  # creating: bind it once the cloud lists it
        server = by_name.get(vm.name)
        if server is None:
            # a down cell's servers are listed by id alone (UNKNOWN): this one may be among them
            cell_down = any(server.status == SERVER_UNKNOWN for server in servers.values())
            if now - vm.created_at > pool.create_grace and trust_absence and not cell_down:
                state.vms.remove(vm)
                state.dropped_clean[vm.name] = now  # should it show up after all, it never served a job
                return [Note(logging.WARNING, f"{describe_vm(vm)} never reached the cloud, dropped")]
            return []
        vm.server_id = server.id
    server = servers.get(vm.server_id)
    if server is None and vm.why is Why.BUILDING and now - vm.created_at < pool.create_grace:
        return []  # just created: the listing may not show it yet
    if server is None:
        return _server_absent(state, vm, seen, pool, now, trust_absence)
    vm.absent_since = None
    if server.status == SERVER_UNKNOWN:
        return []  # Nova cannot see it now (a down cell): no decision either way
    actions = _new_address(vm, server, now)
    if vm.deleting:
        return actions + _redelete_if_stuck(vm, pool, now)
    if vm.job:
        actions += _check_job_alive(vm, seen, pool, now)
        if vm.deleting:
            return actions
    if vm.drained and not vm.job:
        return actions + [_mark_delete(vm, f"drained {vm.drained}", now)]
    return actions + _by_server_status(state, vm, server, seen, config, now)


def _new_address(vm: Vm, server: Server, now: float) -> list[Action]:
    """A new address: any pinned key belonged to whoever had it before; probe before use."""
    if not server.address or server.address == vm.address:
        return []
    old, vm.address, vm.host_keys = vm.address, server.address, []
    if vm.state == FREE:
        _set_state(vm, UNUSABLE, reason_text(Why.UNREACHABLE, "address changed"), now)
    return [Note(logging.WARNING, f"{describe_vm(vm)}: address changed from {old}")] if old else []


def _by_server_status(
    state: PoolState, vm: Vm, server: Server, seen: Observation, config: Config, now: float
) -> list[Action]:
    pool = config.pool
    if server.status == SERVER_ERROR:
        return _delete_failed_boot(state, vm, f"server in ERROR: {server.fault or 'no fault given'}", pool, now)
    if server.status in (SERVER_BUILDING,):
        return _building(state, vm, pool, now)
    if server.status != SERVER_ACTIVE:
        return _inactive(state, vm, server, pool, now)
    return _active(state, vm, seen, config, now)


def _server_absent(
    state: PoolState, vm: Vm, seen: Observation, pool: PoolConfig, now: float, trust_absence: bool
) -> list[Action]:
    """Believe a server is gone only when two listings in a row lack it (one may be incomplete).

    A listing that may be incomplete (most servers lost at once, or pages a down cell's servers
    are left out of) proves nothing: the VM stays, counted toward max, its job's. Missing that
    long, one that holds no job is deleted: Nova's "not found" is the proof that it is gone."""
    if vm.absent_since is None:
        vm.absent_since = now
        return []
    if trust_absence:
        return _server_gone(state, vm, seen, pool, now)
    if now - vm.absent_since <= pool.unusable_timeout:
        return []
    if vm.deleting:
        return _redelete_if_stuck(vm, pool, now)
    if vm.job:
        return _check_job_alive(vm, seen, pool, now)
    return [_mark_delete(vm, f"missing from the listings for more than {pool.unusable_timeout:.0f}s", now)]


def _server_gone(state: PoolState, vm: Vm, seen: Observation, pool: PoolConfig, now: float) -> list[Action]:
    if vm.deleting:
        state.vms.remove(vm)
        return [Note(logging.INFO, f"{describe_vm(vm)} deleted")]
    if vm.job:
        actions: list[Action] = []
        if vm.reason != VANISHED:
            _set_state(vm, UNUSABLE, VANISHED, now)
            vm.tainted = VANISHED
            actions.append(
                Note(
                    logging.ERROR,
                    f"{describe_vm(vm)} VANISHED from the cloud while busy with job "
                    f"{vm.job} of {vm.user}: the job has lost its VM",
                )
            )
        # Its epilogue releases it; if that never comes, the batch system's word frees the slot.
        job = vm.job
        actions += _check_job_alive(vm, seen, pool, now)
        if vm.job is None:
            state.vms.remove(vm)
            actions.append(
                Note(logging.WARNING, f"{describe_vm(vm)}: its server is gone and job {job} is over: forgotten")
            )
        return actions
    state.vms.remove(vm)
    if not vm.tainted:
        state.dropped_clean[vm.name] = now
    return [Note(logging.WARNING, f"{describe_vm(vm)} vanished from the cloud (was {vm.state}), dropped")]


def _mark_delete(vm: Vm, reason: str, now: float) -> DeleteServer:
    vm.delete_requested_at = now
    if vm.state != UNUSABLE or vm.reason != DELETING:
        _set_state(vm, UNUSABLE, DELETING, now)
    assert vm.server_id is not None
    return DeleteServer(vm.name, vm.server_id, reason)


def _redelete_if_stuck(vm: Vm, pool: PoolConfig, now: float) -> list[Action]:
    assert vm.delete_requested_at is not None
    if now - vm.delete_requested_at <= pool.delete_timeout:
        return []
    return [_mark_delete(vm, f"delete not done after {pool.delete_timeout:.0f}s, re-issued", now)]


def _count_boot_failure(state: PoolState, vm: Vm, pool: PoolConfig, now: float) -> list[Action]:
    if vm.last_healthy is not None:
        return []
    health = state.class_health(vm.vm_class)
    health.boot_failures += 1
    _count(state, "failed_boots")
    if health.boot_failures < pool.protect_after_failures:
        return []
    _back_off(health, pool, now)  # each failed canary waits longer: no create/delete loop
    if health.protected_since is None:
        health.protected_since = now
        return [
            Note(
                logging.ERROR,
                f"protected mode{_of_class(vm.vm_class)}: {health.boot_failures} consecutive failed boots; "
                f"one canary boot at a time, next at {fmt_time(health.backoff_until)}",
            )
        ]
    return [
        Note(
            logging.WARNING,
            f"protected mode{_of_class(vm.vm_class)}: canary failed; next at {fmt_time(health.backoff_until)}",
        )
    ]


def _forget_if_healthy(state: PoolState, vm_class: str) -> None:
    """A class whose creates fare well again keeps no record (equal states, equal files)."""
    if state.health.get(vm_class) == ClassHealth():
        del state.health[vm_class]


def _of_class(vm_class: str) -> str:
    """' of class NAME' in a message, nothing for the one class of a pool without classes."""
    return "" if vm_class == DEFAULT_CLASS else f" of class {vm_class}"


def _back_off(health: ClassHealth, pool: PoolConfig, now: float, retry_after: float = 0.0) -> None:
    """The class's next create waits twice as long as the last (the cloud's Retry-After, if
    longer). Both stop at backoff_max: an asked-for day would idle the class that long, while one
    refused create per backoff_max costs the cloud nothing; `clear-backoff` asks at once."""
    doubled = max(pool.backoff_initial, health.backoff_delay * 2, retry_after)
    health.backoff_delay = min(pool.backoff_max, doubled)
    health.backoff_until = now + health.backoff_delay


def _delete_failed_boot(state: PoolState, vm: Vm, reason: str, pool: PoolConfig, now: float) -> list[Action]:
    actions: list[Action] = []
    if vm.job:
        actions.append(Note(logging.ERROR, f"{describe_vm(vm)} of job {vm.job} failed: {reason}"))
        vm.tainted = reason
    actions += _count_boot_failure(state, vm, pool, now)
    actions.append(_mark_delete(vm, reason, now))
    return actions


def _building(state: PoolState, vm: Vm, pool: PoolConfig, now: float) -> list[Action]:
    if vm.state != UNUSABLE or vm.reason not in (BUILDING,):
        _set_state(vm, UNUSABLE, BUILDING, now)
    if now - vm.created_at > pool.build_timeout:
        return _delete_failed_boot(state, vm, f"still building after {pool.build_timeout:.0f}s", pool, now)
    return []


def _inactive(state: PoolState, vm: Vm, server: Server, pool: PoolConfig, now: float) -> list[Action]:
    actions: list[Action] = []
    reason = SHUTOFF if server.status == SERVER_DOWN else reason_text(Why.STATUS, server.status)
    if server.status == SERVER_DELETING:
        reason = DELETING
    if vm.job and vm.reason != reason:
        actions.append(Note(logging.ERROR, f"{describe_vm(vm)} of job {vm.job} is {reason}"))
    if vm.state != UNUSABLE or vm.reason != reason:
        _set_state(vm, UNUSABLE, reason, now)
    if not vm.job and now - vm.since > pool.unusable_timeout:
        actions.append(_mark_delete(vm, f"{reason} for more than {pool.unusable_timeout:.0f}s", now))
    return actions


def _active(state: PoolState, vm: Vm, seen: Observation, config: Config, now: float) -> list[Action]:
    pool = config.pool
    if vm.state == BUSY:
        return []
    if vm.job and not vm.tainted:  # back from a reboot or migration under its job
        _set_state(vm, BUSY, "", now)
        return [Note(logging.WARNING, f"{describe_vm(vm)} of job {vm.job} is ACTIVE again")]
    if vm.tainted:
        if vm.job is None and vm.tainted.startswith(SINGLE_USE_TAINT):
            return [_mark_delete(vm, vm.tainted, now)]
        if vm.job is None and now - vm.since > pool.unusable_timeout:
            return [_mark_delete(vm, f"tainted ({vm.tainted}) for more than {pool.unusable_timeout:.0f}s", now)]
        return []
    if vm.job:
        return []  # tainted under its job: only its release detaches it
    not_yet_probed = vm.why in (Why.BUILDING, Why.SHUTOFF, Why.CREATING, Why.DELETING, Why.STATUS)
    if vm.state == UNUSABLE and not_yet_probed:
        _set_state(vm, UNUSABLE, UNREACHABLE, now)  # ACTIVE now: reachable only once SSH answers
    if vm.state == UNUSABLE and vm.last_healthy is None and now - vm.since > pool.ready_timeout:
        actions = _count_boot_failure(state, vm, pool, now)
        return actions + [_mark_delete(vm, f"not reachable over SSH {pool.ready_timeout:.0f}s after ACTIVE", now)]
    if vm.state == UNUSABLE and vm.last_healthy is not None and now - vm.since > pool.unusable_timeout:
        return [_mark_delete(vm, f"unreachable for more than {pool.unusable_timeout:.0f}s", now)]
    if vm.state == FREE and not seen.probe_free:
        return []
    if vm.address is None:
        return []
    return [
        ProbeSsh(vm.name, vm.server_id or "", vm.address, tuple(vm.host_keys), first_contact=vm.last_healthy is None)
    ]


def _check_job_alive(vm: Vm, seen: Observation, pool: PoolConfig, now: float) -> list[Action]:
    """A VM whose job is gone lost its epilogue: never reuse it silently."""
    if seen.dead_jobs is None or vm.job in seen.unsure_jobs:
        return []  # not asked, or no answer: the grace neither starts nor ends
    if vm.job not in seen.dead_jobs:
        vm.job_missing_since = None
        return []
    if vm.job_missing_since is None:
        vm.job_missing_since = now
        return [Note(logging.WARNING, f"{describe_vm(vm)}: job {vm.job} looks gone; grace {pool.job_gone_grace:.0f}s")]
    if now - vm.job_missing_since <= pool.job_gone_grace:
        return []
    job = vm.job
    _give_up_job(vm, f"job {job} gone without epilogue", now)
    if vm.server_id is None or vm.reason == VANISHED or vm.tainted == VANISHED:
        return [Note(logging.ERROR, f"{describe_vm(vm)}: job {job} gone without epilogue")]
    return [
        Note(logging.ERROR, f"{describe_vm(vm)}: job {job} gone without epilogue, deleting the VM"),
        _mark_delete(vm, vm.tainted, now),
    ]


DROPPED_CLEAN_MAX_AGE = 86400.0


def _adopt_orphans(state: PoolState, servers: list[Server], records: Sequence[JobRecord], now: float) -> list[Action]:
    """Servers with the pool's tag that the state does not know: adopt when seen twice, or at once
    for the job whose record names it (a lost state file: the job runs there, its VM is its own).

    A server this pool dropped while it was clean (a create that did not show up within
    create_grace, a Free VM missing from two listings) is adopted clean. Any other has an
    unknown past (a lost or restored state file, whatever its age: a young one may already run
    a job): it is adopted tainted and
    deleted after unusable_timeout, never handed out. Nova's created_at is never compared with
    this node's clock.
    """
    state.dropped_clean = {name: at for name, at in state.dropped_clean.items() if now - at < DROPPED_CLEAN_MAX_AGE}
    known = {vm.server_id for vm in state.vms}
    recorded: dict[str, list[JobRecord]] = {}
    for record in records:
        if record.job not in state.ended_jobs:
            recorded.setdefault(record.server_id, []).append(record)
    actions: list[Action] = []
    listed = set()
    for server in servers:
        listed.add(server.id)
        if server.id in known:
            continue
        if len(recorded.get(server.id, [])) == 1:
            state.orphans.pop(server.id, None)
            actions += _adopt_for_job(state, server, recorded[server.id][0], now)
            continue
        if server.id not in state.orphans:
            state.orphans[server.id] = now
            actions.append(
                Note(
                    logging.WARNING,
                    f"server {server.name} ({server.id}) carries the pool's tag but "
                    "is not in the state; adopting it if seen again",
                )
            )
            continue
        del state.orphans[server.id]
        name = server.vm_name or server.name
        ours = state.dropped_clean.pop(name, None) is not None
        vm = Vm(
            name=name,
            state=UNUSABLE,
            reason=ADOPTED,
            since=now,
            created_at=now,
            server_id=server.id,
            address=server.address,
            tainted="" if ours else UNKNOWN_PAST,
            vm_class=server.vm_class,
        )
        if vm.tainted:
            vm.reason = vm.tainted
        state.vms.append(vm)
        actions.append(
            Note(
                logging.WARNING,
                f"{describe_vm(vm)} adopted (server {server.id})"
                + ("" if ours else ": unknown past, will be deleted, never used"),
            )
        )
        if server.status == SERVER_ERROR:
            actions.append(_mark_delete(vm, "adopted in ERROR", now))
    state.orphans = {sid: first for sid, first in state.orphans.items() if sid in listed}
    return actions


def _adopt_for_job(state: PoolState, server: Server, record: JobRecord, now: float) -> list[Action]:
    """A server the state lost, that a job runs on by the hooks' record: the job's VM again, Busy
    (or Unusable under its job until ACTIVE), its pinned host key taken from the record."""
    active = server.status == SERVER_ACTIVE
    vm = Vm(
        name=server.vm_name or server.name,
        state=BUSY if active else UNUSABLE,
        since=now,
        created_at=now,
        reason="" if active else ADOPTED,
        server_id=server.id,
        address=server.address,
        job=record.job,
        user=record.user,
        last_healthy=now,
        host_keys=list(record.host_keys),
        vm_class=server.vm_class,
    )
    state.vms.append(vm)
    return [
        Note(
            logging.ERROR,
            f"{describe_vm(vm)} adopted for job {record.job} ({record.user}) from the hooks' "
            "record: the state had lost it",
        )
    ]


# -- scaling --


def _next_name(state: PoolState, prefix: str, taken: set[str]) -> str:
    while True:
        state.serial += 1
        name = f"{prefix}{state.serial:04d}"
        if name not in taken:
            return name


def _scale(
    state: PoolState,
    config: Config,
    listed_names: set[str],
    now: float,
    give_way: bool = False,
    limits: dict[str, int] | None = None,
) -> list[Action]:
    """Each class towards its desired size, the classes whose jobs wait longest first. While another
    pool's jobs wait on the project's quota (give_way), this pool keeps no spares and lets VMs idle
    for give_way_after go, down to min. Creates stay within the pool's max, max_cores and
    max_memory and the project's quota (`limits`): one that would pass them waits."""
    pool = config.pool
    # max bounds what the cloud holds: servers being deleted, servers missing from one listing
    # and tagged servers not adopted yet all count.
    room = pool.max - len(state.vms) - len(state.orphans)
    budget = _budget(state, pool, limits)
    first_in_queue: dict[str, int] = {}
    for place, request in enumerate(state.requests):
        first_in_queue.setdefault(request.vm_class, place)
    actions: list[Action] = []
    queue_end = len(state.requests)
    for vm_class in sorted(pool.vm_classes, key=lambda vm_class: first_in_queue.get(vm_class.name, queue_end)):
        mine = [vm for vm in state.vms if vm.vm_class == vm_class.name]
        live = [vm for vm in mine if not vm.deleting and not vm.tainted and not vm.drained]
        capacity = sum(1 for vm in live if vm.state in (FREE, BUSY) or vm.booting)
        desired = class_desired(state, pool, vm_class, spares=not give_way)
        class_room = (vm_class.max or pool.max) - len(mine)
        state.held_back.pop(vm_class.name, None)
        if min(room, class_room) <= 0 and capacity < _jobs_of(state, vm_class):
            state.held_back[vm_class.name] = (  # for the acquire timeout message
                f"[class {vm_class.name}] max = {vm_class.max} VMs"
                if class_room <= room
                else f"[pool] max = {pool.max} VMs ({pool.max - room} in the cloud or being deleted)"
            )
        if capacity < desired:
            room_here = min(room, class_room)
            created = _scale_up(state, config, vm_class, desired - capacity, room_here, budget, listed_names, now)
            room -= sum(1 for action in created if isinstance(action, CreateServer))
            actions += created
        elif capacity > desired:
            idle_for = min(pool.idle_timeout, pool.give_way_after) if give_way else pool.idle_timeout
            actions += _scale_down(state, pool, vm_class, capacity - desired, now, idle_for)
    return actions + _unknown_classes(state, pool, now)


PROJECT_QUOTA = "the project's quota"  # how a budget's limit set by Nova's absolute limits begins


def _jobs_of(state: PoolState, vm_class: ClassConfig) -> int:
    """The class's jobs: those its busy VMs run and those waiting for one (0: none waits)."""
    waiting = sum(1 for request in state.requests if request.vm_class == vm_class.name)
    busy = sum(1 for vm in state.vms if vm.state == BUSY and vm.vm_class == vm_class.name)
    return busy + waiting if waiting else 0


_NOT_SCHEDULED = (Why.CREATING, Why.BUILDING)  # a server Nova's /limits may not count yet


def _budget(state: PoolState, pool: PoolConfig, limits: dict[str, int] | None) -> dict[str, tuple[int, str]]:
    """What creates may still take ("cores", "memory" in MiB, "instances"), each with the limit
    that sets it: the tightest of [pool] max_cores / max_memory and the project's quota."""
    budget: dict[str, tuple[int, str]] = {}

    def limit(kind: str, left: int, what: str) -> None:
        if kind not in budget or left < budget[kind][0]:
            budget[kind] = (left, what)

    sizes = [class_size(state, pool.class_named(vm.vm_class)) or Want(0, 0, 0) for vm in state.vms]
    if pool.max_cores:
        limit("cores", pool.max_cores - sum(size.cores for size in sizes), f"[pool] max_cores = {pool.max_cores}")
    if pool.max_memory:
        used = sum(size.memory for size in sizes)
        limit("memory", pool.max_memory - used, f"[pool] max_memory = {pool.max_memory}M")
    # Nova's totals count a server once it is scheduled; a create still being scheduled is counted
    # by the quota check of the next POST but not by /limits: the pool's booting VMs are counted
    # here as well (at worst a boot waits a pass longer; never a refusal and its back-off)
    booting = [size for vm, size in zip(state.vms, sizes, strict=True) if vm.booting and vm.why in _NOT_SCHEDULED]
    not_yet_counted = {
        "cores": sum(size.cores for size in booting),
        "memory": sum(size.memory for size in booting),
        "instances": len(booting),
    }
    for kind, most, used_key in (
        ("cores", "maxTotalCores", "totalCoresUsed"),
        ("memory", "maxTotalRAMSize", "totalRAMUsed"),
        ("instances", "maxTotalInstances", "totalInstancesUsed"),
    ):
        maximum = (limits or {}).get(most, -1)
        if maximum >= 0:
            used = (limits or {}).get(used_key, 0)
            left = maximum - used - not_yet_counted[kind]
            limit(kind, left, f"{PROJECT_QUOTA} {most} = {maximum} ({used} used)")
    return budget


def _within_budget(budget: dict[str, tuple[int, str]], size: Want | None) -> str:
    """Take one VM of this size from the budget; or why it does not fit (nothing taken)."""
    if not budget:
        return ""
    if size is None:
        return "its flavor's size is not known yet (a reconcile pass asks Nova)"
    needs = {"cores": size.cores, "memory": size.memory, "instances": 1}
    for kind, (left, what) in budget.items():
        if needs[kind] > left:
            return f"{what} leaves room for {max(left, 0)} more {kind}, a VM needs {needs[kind]}"
    for kind, (left, what) in budget.items():
        budget[kind] = (left - needs[kind], what)
    return ""


def _scale_up(
    state: PoolState,
    config: Config,
    vm_class: ClassConfig,
    shortfall: int,
    room: int,
    budget: dict[str, tuple[int, str]],
    listed_names: set[str],
    now: float,
) -> list[Action]:
    count = min(shortfall, room)
    if count <= 0:
        return []
    if state.paused_since is not None:
        return [
            Note(
                logging.INFO,
                f"not creating {count} VM(s): paused since {fmt_time(state.paused_since)} "
                f"by {state.paused_by}: {state.paused_reason}",
            )
        ]
    health = state.health_of(vm_class.name)
    if health.backing_off(now):
        return [
            Note(
                logging.INFO,
                f"not creating {count} VM(s){_of_class(vm_class.name)}: backing off until "
                f"{fmt_time(health.backoff_until)}",
            )
        ]
    if health.protected_since is not None:
        if any(vm.booting and vm.vm_class == vm_class.name for vm in state.vms):
            return []
        count = 1  # protected mode: one canary boot at a time
    taken = {vm.name for vm in state.vms} | listed_names  # after a state loss the serial starts again
    size = class_size(state, vm_class)
    actions: list[Action] = []
    for index in range(count):
        if over := _within_budget(budget, size):
            # asked anyway, Nova would refuse (and back the class off): the boot waits for room
            if any(request.vm_class == vm_class.name for request in state.requests):
                state.held_back[vm_class.name] = over
                if over.startswith(PROJECT_QUOTA):  # the other pools' idle VMs can make room, not our own limit
                    state.quota_blocked_since = state.quota_blocked_since or now
            return actions + [
                Note(logging.WARNING, f"class {vm_class.name}: not creating {count - index} VM(s): {over}")
            ]
        name = _next_name(state, config.server_prefix, taken)
        taken.add(name)
        state.vms.append(
            Vm(name=name, state=UNUSABLE, reason=CREATING, since=now, created_at=now, vm_class=vm_class.name)
        )
        actions.append(CreateServer(name, vm_class.name))
    return actions


def _scale_down(
    state: PoolState, pool: PoolConfig, vm_class: ClassConfig, excess: int, now: float, idle_for: float
) -> list[Action]:
    mine = [vm for vm in state.vms if vm.vm_class == vm_class.name]
    in_cloud = sum(1 for vm in mine if not vm.deleting)
    idle = sorted((vm for vm in mine if vm.state == FREE and now - vm.since > idle_for), key=lambda vm: vm.since)
    count = min(excess, len(idle), max(0, in_cloud - vm_class.min))
    why = f"idle for more than {idle_for:.0f}s" + (
        ", giving way to another pool's waiting jobs" if idle_for < pool.idle_timeout else ""
    )
    return [_mark_delete(vm, why, now) for vm in idle[:count]]


def _unknown_classes(state: PoolState, pool: PoolConfig, now: float) -> list[Action]:
    """Free VMs of a class the config no longer names go (a busy one once its job released it)."""
    return [
        _mark_delete(vm, f"its class {vm.vm_class} is no longer configured", now)
        for vm in state.vms
        if vm.state == FREE and pool.class_named(vm.vm_class) is None
    ]


# -- outcomes of the cloud calls --


def plan_created(
    state: PoolState,
    name: str,
    server_id: str | None,
    error: CloudError | None,
    pool: PoolConfig,
    now: float,
    vm_class: str = "",
) -> tuple[PoolState, list[Action]]:
    """Record the outcome of a create call (for a VM of vm_class; default: its intent record's)."""
    new = copy_state(state)
    vm = new.vm_named(name)
    vm_class = vm_class or (vm.vm_class if vm is not None else DEFAULT_CLASS)
    if error is None:
        new.quota_blocked_since = None
        health = new.health.get(vm_class)
        if health is not None and health.protected_since is None:
            health.backoff_until, health.backoff_delay = None, 0.0
            _forget_if_healthy(new, vm_class)
        if vm is not None and vm.server_id is None:
            vm.server_id = server_id
            _set_state(vm, UNUSABLE, BUILDING, now)
        _count(new, "boots")
        return new, [Note(logging.INFO, f"vm {name} created (server {server_id})")]
    _record_cloud_error(new, str(error), now)
    health = new.class_health(vm_class)
    if isinstance(error, CloudRefused):
        _back_off(health, pool, now)
        if vm is not None and vm.server_id is None:
            new.vms.remove(vm)  # refused: nothing was created, no need to wait out create_grace
        where = "[openstack]" if vm_class == DEFAULT_CLASS else f"[class {vm_class}] and [openstack]"
        return new, [
            Note(
                logging.ERROR,
                f"vm {name} not created: {error}; check {where} image, flavor, "
                f"network, key_name, security_groups; backing off{_of_class(vm_class)} until "
                f"{fmt_time(health.backoff_until)}",
            )
        ]
    if isinstance(error, QuotaExceeded):
        _back_off(health, pool, now, error.retry_after)
        new.quota_blocked_since = new.quota_blocked_since or now
        if vm is not None and vm.server_id is None:
            new.vms.remove(vm)  # the cloud said no: nothing was created
        return new, [
            Note(
                logging.ERROR,
                f"vm {name} not created: {error}; backing off{_of_class(vm_class)} "
                f"{health.backoff_delay:.0f}s until {fmt_time(health.backoff_until)}",
            )
        ]
    # Any other failure may or may not have created the server: keep the intent; the next
    # passes bind it by name if it exists, or drop it after create_grace. It counts as a failed
    # boot, so a cloud that keeps refusing (a bad image, a 500) ends in protected mode.
    notes: list[Action] = [Note(logging.ERROR, f"vm {name}: create failed: {error}")]
    if vm is not None:
        notes += _count_boot_failure(new, vm, pool, now)
    return new, notes


def plan_not_created(state: PoolState, names: Sequence[str]) -> PoolState:
    """Withdraw create intents that were never sent to the cloud."""
    new = copy_state(state)
    new.vms = [vm for vm in new.vms if not (vm.name in names and vm.server_id is None)]
    return new


def plan_deleted(
    state: PoolState, name: str, error: CloudError | None, now: float, server_id: str = ""
) -> tuple[PoolState, list[Action]]:
    new = copy_state(state)
    vm = new.vm_named(name)
    if vm is None or (server_id and vm.server_id != server_id):
        return new, []
    if error is None:
        _count(new, "deletes")
        return new, [Note(logging.INFO, f"{describe_vm(vm)} delete requested")]
    if isinstance(error, ServerGone):
        new.vms.remove(vm)
        return new, [Note(logging.INFO, f"{describe_vm(vm)} already gone")]
    _record_cloud_error(new, str(error), now)
    return new, [Note(logging.ERROR, f"{describe_vm(vm)}: delete failed: {error}; retried on a later pass")]


def clear_protected_mode(state: PoolState) -> PoolState:
    """An admin's word: forget every class's failed boots and back-off; create again."""
    new = copy_state(state)
    new.health = {}
    return new


# Admin actions: plain state changes under the lock, idempotent; the reconcile pass does the cloud work.


# -- admin actions --


def _admin_vm(state: PoolState, name: str) -> Vm:
    vm = state.vm_named(name)
    if vm is None:
        known = ", ".join(sorted(vm.name for vm in state.vms)) or "none"
        raise BadInput(f"no VM named {name!r} in pool {state.pool} (its VMs: {known}; see `vmpool status`)")
    return vm


def plan_drain(
    state: PoolState, names: Sequence[str], by: str, reason: str, now: float
) -> tuple[PoolState, list[Action]]:
    """No new job on these VMs; each is deleted by the next pass once it holds no job."""
    new = copy_state(state)
    vms = [_admin_vm(new, name) for name in names]
    notes: list[Action] = [] if vms else [Note(logging.INFO, f"pool {state.pool}: no VM to drain")]
    for vm in vms:
        if vm.drained or vm.deleting:
            notes.append(Note(logging.INFO, f"{describe_vm(vm)} already {'drained' if vm.drained else 'deleting'}"))
            continue
        vm.drained = f"at {fmt_time(now)} by {by}: {reason}"
        until = f"once job {vm.job} ends" if vm.job else "by the next reconcile pass"
        notes.append(Note(logging.WARNING, f"{describe_vm(vm)} drained by {by}: {reason}; deleted {until}"))
    return new, notes


def plan_admin_delete(
    state: PoolState, name: str, by: str, reason: str, force: bool, now: float
) -> tuple[PoolState, list[Action]]:
    """Delete a VM by the next pass; a Busy one only with force (its job loses the VM)."""
    vm = _admin_vm(state, name)
    if vm.job and not force:
        raise BadInput(
            f"{describe_vm(vm)} is busy with job {vm.job} of {vm.user or 'no user'}: "
            "use `vmpool drain` to delete it once the job ends, or --force to delete it now"
        )
    new, notes = plan_drain(state, [name], by, reason, now)
    held = new.vm_named(name)
    assert held is not None
    if held.job:
        job, user = held.job, held.user
        _give_up_job(held, f"deleted by {by} under job {job}", now)
        notes = [
            Note(
                logging.ERROR,
                f"{describe_vm(held)} deleted by {by} while busy with job {job} of "
                f"{user or 'no user'}: {reason}; the job loses its VM",
            )
        ]
    return new, notes


def plan_pause(state: PoolState, by: str, reason: str, now: float) -> tuple[PoolState, list[Action]]:
    """No creates until resumed (deletes and probes go on)."""
    if state.paused_since is not None:
        return state, [
            Note(
                logging.INFO,
                f"already paused since {fmt_time(state.paused_since)} by {state.paused_by}: {state.paused_reason}",
            )
        ]
    new = copy_state(state)
    new.paused_since, new.paused_by, new.paused_reason = now, by, reason
    return new, [
        Note(logging.WARNING, f"pool {state.pool} paused by {by}: {reason}; no VM is created until `vmpool resume`")
    ]


def plan_resume(state: PoolState, by: str, reason: str, now: float) -> tuple[PoolState, list[Action]]:
    if state.paused_since is None:
        return state, [Note(logging.INFO, f"pool {state.pool} is not paused")]
    new = copy_state(state)
    was = f"paused since {fmt_time(state.paused_since)} by {state.paused_by}"
    new.paused_since, new.paused_by, new.paused_reason = None, "", ""
    return new, [Note(logging.WARNING, f"pool {state.pool} resumed by {by} ({was}): {reason}")]


def plan_clear_backoff(state: PoolState, by: str, reason: str, now: float) -> tuple[PoolState, list[Action]]:
    """Every class creates again at the next pass, not at the end of its back-off (protected mode
    keeps its own switch)."""
    backing_off = {name: health for name, health in state.health.items() if health.backoff_until is not None}
    if not backing_off and not any(health.backoff_delay for health in state.health.values()):
        return state, [Note(logging.INFO, f"pool {state.pool}: no back-off to clear")]
    new = copy_state(state)
    was = ", ".join(
        f"{'' if name == DEFAULT_CLASS else f'class {name} '}until {fmt_time(health.backoff_until)}, "
        f"delay {health.backoff_delay:.0f}s"
        for name, health in backing_off.items()
    )
    for name, health in list(new.health.items()):
        health.backoff_until, health.backoff_delay = None, 0.0
        _forget_if_healthy(new, name)
    return new, [Note(logging.WARNING, f"pool {state.pool}: back-off ({was}) cleared by {by}: {reason}")]


# -- outcomes of cloud errors and SSH probes --


def plan_cloud_error(state: PoolState, message: str, now: float) -> PoolState:
    """Remember the last cloud failure: status and acquire's timeout message show it."""
    new = copy_state(state)
    _record_cloud_error(new, message, now)
    return new


def _record_cloud_error(state: PoolState, message: str, now: float) -> None:
    state.last_cloud_error, state.last_cloud_error_at = message, now


def plan_probed(state: PoolState, results: Sequence[ProbeResult], now: float) -> tuple[PoolState, list[Action]]:
    """Apply SSH probe outcomes to VMs that are still in the state they were probed in."""
    new = copy_state(state)
    actions: list[Action] = []
    for result in results:
        vm = new.vm_named(result.name)
        if vm is None or (result.server_id and vm.server_id != result.server_id):
            continue
        if vm.state == BUSY or vm.job or vm.deleting or vm.tainted:
            continue  # claimed, deleted or tainted while we probed: the probe says nothing now
        if result.host_keys and not vm.host_keys:
            vm.host_keys = list(result.host_keys)
        if result.host_key_changed:
            vm.tainted = "host key changed"
            _set_state(vm, UNUSABLE, vm.tainted, now)
            actions.append(Note(logging.ERROR, f"{describe_vm(vm)} unusable: host key changed ({result.detail})"))
        elif result.ok:
            actions += _probe_ok(new, vm, now)
        elif vm.state == FREE or vm.reason != reason_text(Why.UNREACHABLE, result.detail):
            if vm.state == UNUSABLE and vm.why is Why.UNREACHABLE:  # keep since: the timeout runs from the first
                vm.reason = reason_text(Why.UNREACHABLE, result.detail)
            else:
                _set_state(vm, UNUSABLE, reason_text(Why.UNREACHABLE, result.detail), now)
            actions.append(
                Note(logging.WARNING, f"{describe_vm(vm)} unusable: {result.detail}, since {fmt_time(vm.since)}")
            )
    return new, actions


def _probe_ok(state: PoolState, vm: Vm, now: float) -> list[Action]:
    actions: list[Action] = []
    first_boot = vm.last_healthy is None
    vm.last_healthy = now
    if vm.state != FREE:
        actions.append(Note(logging.INFO, f"{describe_vm(vm)} reachable over SSH, now free"))
        _set_state(vm, FREE, "", now)
    health = state.health.get(vm.vm_class)
    if first_boot and health is not None:
        health.boot_failures = 0
        if health.protected_since is not None:
            health.protected_since = None
            actions.append(Note(logging.WARNING, f"protected mode{_of_class(vm.vm_class)} cleared: a VM booted"))
        _forget_if_healthy(state, vm.vm_class)
    return actions


CLOCK_STEP_TOLERANCE = 5.0  # seconds the wall clock may drift from the boot clock between writes
CLOCK_REFRESH = 60.0  # how stale the recorded clock pair may get before a write refreshes it


# -- the clock --


def plan_clock(state: PoolState, now: float, boot_id: str, boot_seconds: float) -> tuple[PoolState, list[Action]]:
    """Keep the state's wall-clock times true to elapsed time across a wall-clock step.

    The state records the wall clock beside the boot clock (CLOCK_BOOTTIME, which never steps)
    at its last write. If the wall clock moved more or less than the boot clock since (an NTP
    step, a resumed VM), every stored time is shifted by the difference: a +1 h step then fails
    no boot and a backward step freezes no timeout. After a reboot the boot clocks cannot be
    compared; times continue on the wall clock.
    """
    last = state.clock
    stale = not last or last.get("boot_id") != boot_id or now - float(last.get("wall", 0)) > CLOCK_REFRESH
    notes: list[Action] = []
    step = 0.0
    if last and last.get("boot_id") == boot_id:
        step = now - (float(last["wall"]) + boot_seconds - float(last["boot"]))
    if abs(step) <= CLOCK_STEP_TOLERANCE and not stale:
        return state, notes
    new = copy_state(state)
    if abs(step) > CLOCK_STEP_TOLERANCE:
        _shift_times(new, step)
        notes.append(
            Note(
                logging.WARNING,
                f"the wall clock stepped by {step:+.0f}s since the state was last "
                "written; its times are shifted with it (timeouts keep real time)",
            )
        )
    new.clock = {"wall": now, "boot": boot_seconds, "boot_id": boot_id}
    return new, notes


def _shift_times(state: PoolState, step: float) -> None:
    def shifted(value: float | None) -> float | None:
        return None if value is None else value + step

    for vm in state.vms:
        vm.since, vm.created_at = vm.since + step, vm.created_at + step
        vm.last_healthy, vm.delete_requested_at = shifted(vm.last_healthy), shifted(vm.delete_requested_at)
        vm.job_missing_since, vm.absent_since = shifted(vm.job_missing_since), shifted(vm.absent_since)
    for request in (*state.requests, *state.handed):
        request.since, request.started = request.since + step, request.started + step
    state.last_reconcile, state.last_pass = shifted(state.last_reconcile), shifted(state.last_pass)
    for health in state.health.values():
        health.protected_since, health.backoff_until = shifted(health.protected_since), shifted(health.backoff_until)
    state.paused_since = shifted(state.paused_since)
    state.last_cloud_error_at = shifted(state.last_cloud_error_at)
    for times in (state.orphans, state.ended_jobs, state.dropped_clean):
        for key in times:
            times[key] += step


# -- read-outs: explanations, health, log text --


def explain_no_vm(state: PoolState, pool: PoolConfig, now: float, vm_class: str = DEFAULT_CLASS) -> str:
    """Say why no VM of the job's class could be had, for the acquire timeout message: the limit
    that held its creates back names the setting (or quota) an admin would change."""
    reasons = []
    busy = state.count(BUSY)
    if busy >= pool.max:
        reasons.append(f"pool at max ({busy} of {pool.max} VMs busy)")
    if held := state.held_back.get(vm_class):
        reasons.append(f"creates{_of_class(vm_class)} held back by {held}")
    health = state.health_of(vm_class)
    if health.backing_off(now):
        reasons.append(
            f"cloud refused creates{_of_class(vm_class)}, backing off until {fmt_time(health.backoff_until)}"
        )
    if health.protected_since is not None:
        reasons.append(
            f"protected mode{_of_class(vm_class)} since {fmt_time(health.protected_since)} "
            f"after {health.boot_failures} failed boots"
        )
    if state.paused_since is not None:
        reasons.append(
            f"creates paused since {fmt_time(state.paused_since)} by {state.paused_by}: {state.paused_reason}"
        )
    booting = sum(1 for vm in state.vms if vm.booting and vm.vm_class == vm_class)
    if booting:
        reasons.append(f"{booting} VM(s){_of_class(vm_class)} still booting")
    if state.last_cloud_error_at and now - state.last_cloud_error_at < 600:
        reasons.append(f"last cloud error at {fmt_time(state.last_cloud_error_at)}: {state.last_cloud_error}")
    waiting = len(state.requests)
    if waiting > 1:
        reasons.append(f"{waiting} jobs waiting")
    return "; ".join(reasons) or "no VM became free"


def reason_kind(vm: Vm) -> str:
    """A VM's reason as a short fixed word (a metric label must not carry free text)."""
    if vm.tainted:
        return Why.TAINTED.value
    return "other" if vm.why is Why.STATUS else vm.why.value


@dataclass(eq=False, repr=False)  # made at every start: no methods it does not use
class Health:
    """What monitoring reads from the state: `vmpool check`'s perfdata and the Prometheus gauges."""

    free: int
    busy: int
    unusable: int
    drained: int
    waiting: int
    oldest_wait: float  # seconds the longest-waiting job has waited (0: none waits)
    since_reconcile: float | None  # seconds since the last reconcile pass saw the cloud (None: never)
    backoff: float  # seconds of create back-off left
    protected: bool
    paused: bool
    desired: int


def pool_health(state: PoolState, pool: PoolConfig, now: float) -> Health:
    oldest = min((request.since for request in state.requests), default=now)
    worst = state.worst_health()
    backoff = max(0.0, worst.backoff_until - now) if worst.backoff_until is not None else 0.0
    return Health(
        free=state.count(FREE),
        busy=state.count(BUSY),
        unusable=state.count(UNUSABLE),
        drained=sum(1 for vm in state.vms if vm.drained),
        waiting=len(state.requests),
        oldest_wait=max(0.0, now - oldest),
        since_reconcile=None if state.last_reconcile is None else max(0.0, now - state.last_reconcile),
        backoff=backoff,
        protected=worst.protected_since is not None,
        paused=state.paused_since is not None,
        desired=desired_size(state, pool),
    )


def pool_capacity(state: PoolState, pool: PoolConfig) -> dict[str, Any] | None:
    """What the pool can hold at once, the batch node's size: its most cores, memory (MiB) and
    GPUs, each on its own (the classes' VMs, largest first, up to each class's max and the pool's
    max in VMs, within max_cores and max_memory), its max in VMs, and the classes as
    NAME:CORES:MEMORY_MIB:GPUS joined by '+'. None while a class's flavor size is not known."""
    sizes = [(vm_class, class_size(state, vm_class)) for vm_class in pool.vm_classes]
    known = [(vm_class, size) for vm_class, size in sizes if size is not None]
    if len(known) < len(sizes):
        return None

    def most(part: int, cap: int) -> int:
        left, total = pool.max, 0
        for vm_class, size in sorted(known, key=lambda pair: -pair[1][part]):
            count = min(vm_class.max or pool.max, left)
            total, left = total + count * size[part], left - count
        return min(total, cap) if cap else total

    return {
        "cores": most(0, pool.max_cores),
        "memory": most(1, pool.max_memory),
        "gpus": most(2, 0),
        "vms": pool.max,
        "classes": "+".join(f"{vm_class.name}:{size.cores}:{size.memory}:{size.gpus}" for vm_class, size in known),
    }


def describe_action(action: Action) -> str:
    """An action in the log's words, for `reconcile --dry-run`."""
    if isinstance(action, CreateServer):
        return f"would create server {action.name}"
    if isinstance(action, DeleteServer):
        return f"would delete vm {action.name} (server {action.server_id}): {action.reason}"
    if isinstance(action, ProbeSsh):
        return f"would probe vm {action.name} ({action.address}) over SSH"
    return f"would log: {logging.getLevelName(action.level)} {action.message}"


def fmt_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


# --- the state store ---


def state_to_json(state: PoolState) -> dict[str, Any]:
    """The state file's content as plain data."""
    data: dict[str, Any] = json.loads(state_text(state))
    return data


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _fields_of(value: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, one level deep (json.dumps walks the rest)."""
    names = _FIELD_NAMES.get(type(value))
    if names is None:
        if not dataclasses.is_dataclass(value) or isinstance(value, type):
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        names = _FIELD_NAMES.setdefault(type(value), tuple(f.name for f in dataclasses.fields(value)))
    fields = {name: getattr(value, name) for name in names}
    for name, default in OMITTED_AT_DEFAULT.get(type(value), {}).items():
        if fields[name] == default:
            del fields[name]
    return fields


NEWER_FIELDS: dict[str, Any] = {
    "handed": [],
    "quota_blocked_since": None,
    "flavors": {},
    "held_back": {},
    "class_health": {},
}  # the state file's, with their defaults
# PoolState.health in the file: the class "default"'s at the top level, as before classes (always
# written: an older vmpool reads its protected mode and back-off); other classes' in class_health
LEGACY_HEALTH = tuple(field.name for field in dataclasses.fields(ClassHealth))
# a VM's and a request's newer fields, left out while at their defaults: an older vmpool still
# reads a one-class state
OMITTED_AT_DEFAULT: dict[type, dict[str, Any]] = {
    Vm: {"vm_class": DEFAULT_CLASS},
    Request: {"cores": 1, "memory": 0, "gpus": 0, "vm_class": DEFAULT_CLASS},
}


def state_text(state: PoolState) -> str:
    """The state file's content: compact JSON in field order (equal states give equal text)."""
    fields = {}
    for name, value in _fields_of(state).items():
        if name == "health":
            fields.update(_fields_of(state.health_of(DEFAULT_CLASS)))
            fields["class_health"] = {name: health for name, health in value.items() if name != DEFAULT_CLASS}
        else:
            fields[name] = value
    for name, default in NEWER_FIELDS.items():  # an older vmpool still reads the file while they are unused
        if fields[name] == default:
            del fields[name]
    return (
        json.dumps(
            {"schema": STATE_SCHEMA, "version": STATE_VERSION, **fields}, default=_fields_of, separators=(",", ":")
        )
        + "\n"
    )


def state_from_json(data: Any, path: str, pool_name: str) -> PoolState:
    if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA:
        raise StateError(f'{path}: not a vmpool state file (no "schema": "{STATE_SCHEMA}"); left untouched')
    version = data.get("version")
    if version != STATE_VERSION:
        newer = isinstance(version, int) and version > STATE_VERSION
        raise StateError(
            f"{path}: state version {version!r} "
            + (
                f"was written by a newer vmpool (this one reads {STATE_VERSION}); upgrade vmpool"
                if newer
                else f"is not one this vmpool reads ({STATE_VERSION})"
            )
            + "; left untouched"
        )
    if data.get("pool") != pool_name:
        raise StateError(f"{path}: belongs to pool {data.get('pool')!r}, not {pool_name!r}; left untouched")
    try:
        body = {k: v for k, v in data.items() if k not in ("schema", "version")}
        body["vms"] = [Vm(**{**vm, "state": VmState(vm.get("state"))}) for vm in body.get("vms", [])]
        body["requests"] = [Request(**request) for request in body.get("requests", [])]
        body["handed"] = [Request(**request) for request in body.get("handed", [])]
        health = {name: ClassHealth(**record) for name, record in body.pop("class_health", {}).items()}
        legacy = ClassHealth(**{name: body.pop(name) for name in LEGACY_HEALTH if name in body})
        if legacy != ClassHealth():
            health[DEFAULT_CLASS] = legacy
        return PoolState(**body, health=health)
    except (TypeError, ValueError) as error:
        raise StateCorrupt(f"{path}: malformed state ({error}); {REBUILT_BY_RECONCILE}") from None


REBUILT_BY_RECONCILE = (
    "the next `vmpool reconcile` sets it aside and rebuilds the pool from the cloud and the "
    "hooks' job records (or restore a backup: docs/operating.md)"
)


def state_access_error(path: str, error: OSError) -> StateAccessError:
    """One sentence for an OSError on the state file, its locks or its directory, naming the fix."""
    directory = os.path.dirname(path)
    where = error.filename or path
    if isinstance(error, PermissionError) and os.geteuid() != 0:
        why = must_be_root(f"the state and its locks in {directory} are root's")
        return StateAccessError(f"{where}: permission denied{why}")
    if isinstance(error, PermissionError):
        return StateAccessError(
            f"{where}: permission denied, even to root: check the owner, mode and attributes "
            f"(lsattr) of {directory} and of the filesystem it is on"
        )
    reason = (error.strerror or str(error)).lower()
    return StateAccessError(
        f"state directory {directory} cannot be created or written ({reason}: {where}); "
        f"create it (mkdir -m 700 {directory}) or set [pool] state_file to a file in a "
        "local directory that root can write"
    )


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, text: str, mode: int = 0o600) -> None:
    """Write a file so that a crash leaves either the old or the new content, never a mix."""
    directory = os.path.dirname(path) or "."
    # tempfile.mkstemp's way (O_EXCL, a random name), without importing tempfile on the fast path
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        failpoint("before-replace")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    failpoint("after-replace")


class _LockExpired(Exception):
    """SIGALRM ended a blocking flock: the lock timeout has passed."""


def _raise_lock_expired(signum: int, frame: Any) -> None:
    raise _LockExpired


def wait_for_flock(fd: int, deadline: float) -> bool:
    """Take an exclusive flock on fd by `deadline` (time.monotonic); False when it passes.

    Waits in the kernel, which hands the lock to the next waiter the moment it is released;
    the timeout is a SIGALRM, as util-linux `flock -w` does it. Off the main thread (no signals
    there) or while the process has an alarm of its own, it falls back to polling every 10 ms.
    """
    import fcntl

    if filelock.lock_descriptor(fd, blocking=False):
        return True
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        while not filelock.lock_descriptor(fd, blocking=False):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
    previous = signal.signal(signal.SIGALRM, _raise_lock_expired)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, remaining)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _LockExpired:
            return False  # if the lock came with the alarm, closing fd lets go of it
    finally:
        signal.signal(signal.SIGALRM, previous)
    return True


LOCK_PATIENCE = 10  # lock_timeouts a command waits at most while the state keeps changing (a burst)


class StateStore:
    """The pool state on disk: locked read-modify-write, atomic replace, never a damaged file.

    The lock of record is a filelock.FileLock on ``<state_file>.lock``. vmpool's own waiters
    first queue in the kernel on ``<state_file>.queue.lock`` (a blocking flock), so only the head
    of the queue ever asks for the FileLock: a burst of 200 prologues waits asleep and is handed
    the lock one by one, instead of 200 processes retrying it every 50 ms. A wait past
    lock_timeout fails (exit 7) only if the state did not change meanwhile: a stuck holder.
    While it keeps changing (commands taking their turns in a burst), a command waits on, up to
    LOCK_PATIENCE lock_timeouts; acquire, which has a deadline of its own, retries itself.
    """

    def __init__(self, path: str, pool_name: str, lock_timeout: float):
        self.path = path
        self.pool_name = pool_name
        self.lock_timeout = lock_timeout
        self._lock = filelock.FileLock(f"{path}.lock", timeout=lock_timeout, mode=0o600)
        self._queue_path = f"{path}.queue.lock"
        self._freed_path = f"{path}.freed"
        self._held = threading.local()  # depth of locked() in this thread: nested, it holds both already

    def _ensure_dir(self) -> None:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)

    def load(self) -> PoolState:
        return self._load()[0]

    def _load(self) -> tuple[PoolState, str]:
        """The state and the text it was read from (for a missing file: the empty pool's text)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                text = handle.read()
        except FileNotFoundError:
            empty = PoolState(pool=self.pool_name)
            return empty, state_text(empty)
        except (PermissionError, NotADirectoryError) as error:
            raise state_access_error(self.path, error) from None
        except (OSError, UnicodeDecodeError) as error:
            raise StateError(f"{self.path}: cannot read state: {error}") from None
        if mode & 0o022:
            raise StateError(
                f"{self.path}: state is writable by group/others (mode {stat.S_IMODE(mode):04o}); "
                f"check who changed it, then: chmod 600 {self.path}"
            )
        if mode & 0o044:  # job ids, users and VM addresses are root's business only
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
                log.warning(
                    f"{self.path}: state was readable by group/others (mode {stat.S_IMODE(mode):04o}); made it 0600"
                )
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise StateCorrupt(f"{self.path}: corrupt state (not JSON: {error}); {REBUILT_BY_RECONCILE}") from None
        return state_from_json(data, self.path, self.pool_name), text

    def save(self, state: PoolState) -> None:
        write_atomically(self.path, state_text(state))

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the state lock; LockTimeout after `timeout` seconds (default: lock_timeout)."""
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth
            return
        started = time.monotonic()
        window = self.lock_timeout if timeout is None else timeout
        deadline = started + window
        try:
            self._ensure_dir()
            queue = os.open(self._queue_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise state_access_error(self.path, error) from None
        try:  # closing the queue descriptor, last, hands the turn to the next waiter
            seen = self._stamp()
            while not wait_for_flock(queue, deadline):
                # A stuck holder writes nothing; a burst of commands taking turns keeps changing the
                # state. A release lost to a burst would leave its VM Busy: wait on, while it moves.
                now = self._stamp()
                moved, seen = now != seen, now
                waited = time.monotonic() - started
                if timeout is not None or not moved or waited >= LOCK_PATIENCE * window:
                    raise self._timeout(waited)
                log.warning(
                    f"{self.path}.lock: busy for {waited:.0f}s while other vmpool commands take their turns; waiting on"
                )
                deadline = time.monotonic() + window
            try:
                # Only the head of the queue polls here, and only while something outside the queue
                # (an older vmpool, an admin's script) holds the FileLock.
                self._lock.acquire(timeout=max(0.0, deadline - time.monotonic()), poll_interval=0.01)
            except filelock.Timeout:
                raise self._timeout(time.monotonic() - started) from None
            except OSError as error:
                raise state_access_error(self.path, error) from None
            got = time.monotonic()
            try:
                self._held.depth = 1
                self._sweep_temp_files()
                yield
            finally:
                self._held.depth = 0
                self._lock.release()
                log.debug(
                    f"state lock: waited {(got - started) * 1000:.0f} ms, held {(time.monotonic() - got) * 1000:.0f} ms"
                )
        finally:
            os.close(queue)

    def note_freed(self, count: int) -> None:
        """Tell waiting acquires that `count` VMs came Free: one byte each, appended to
        ``<state_file>.freed`` (its size is the mark). Waiters far back in the queue sleep long
        between looks at the state; a stat of this file each acquire_poll wakes them when enough
        VMs came Free for their place. A hint, never the record: no lock, no fsync."""
        try:
            fd = os.open(self._freed_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size >= FREED_MARK_RESET:
                    os.ftruncate(fd, 0)
                os.write(fd, b"." * count)
            finally:
                os.close(fd)
        except OSError as error:  # the waiters still look on their own schedule
            log.debug(f"{self._freed_path}: {error}")

    def freed_mark(self) -> int:
        try:
            return os.stat(self._freed_path).st_size
        except OSError:
            return 0

    def _stamp(self) -> tuple[int, int] | None:
        """Which state file is there: every write replaces it (a new inode and mtime)."""
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns

    def _timeout(self, waited: float) -> LockTimeout:
        return LockTimeout(
            f"{self.path}.lock: could not lock the state within {waited:.0f}s "
            "(another vmpool holds it; see `fuser -v` on the lock file)"
        )

    def _sweep_temp_files(self) -> None:
        """Temp files of the state left by a writer killed mid-write (only lock holders write them)."""
        directory, base = os.path.split(self.path)
        for name in os.listdir(directory):
            if name.startswith(f".{base}.") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))

    def update(self, change: Callable[[PoolState], tuple[PoolState, Any]], lock_timeout: float | None = None) -> Any:
        """Read, change and write the state under the lock; return what change returned beside it."""
        with self.locked(lock_timeout):
            state, before = self._load()
            new, result = change(state)
            text = state_text(new)
            if text != before:  # compared as text: no deep copy of the state to compare with
                try:
                    write_atomically(self.path, text)
                except OSError as error:
                    raise state_access_error(self.path, error) from None
            return result

    def read(self) -> PoolState:
        """A consistent snapshot (the file is always replaced whole, so no lock is needed)."""
        return self.load()

    def set_aside_if_corrupt(self, now: float) -> str:
        """Move a damaged state file aside (kept for the admin), so the pool is rebuilt from the
        cloud and the job records; what was done, or "" for a sound (or missing) file."""
        with self.locked():
            try:
                self._load()
                return ""
            except StateCorrupt as error:
                aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S', time.localtime(now))}"
                os.replace(self.path, aside)
                fsync_dir(os.path.dirname(self.path))
                return (
                    f"{error.args[0].split('; ')[0]}: moved to {aside}; rebuilding the pool from the cloud "
                    "and the hooks' job records"
                )


@contextlib.contextmanager
def reconcile_lock(state_file: str) -> Iterator[bool]:
    """A non-blocking lock that keeps reconcile passes apart; yields False if another holds it."""
    lock = filelock.FileLock(f"{state_file}.reconcile.lock", timeout=0, mode=0o600)
    try:
        os.makedirs(os.path.dirname(state_file), mode=0o700, exist_ok=True)
        lock.acquire()
    except filelock.Timeout:
        yield False
        return
    except OSError as error:
        raise state_access_error(state_file, error) from None
    try:
        yield True
    finally:
        lock.release()


def known_hosts_text(state: PoolState, port: int) -> str:
    """The OpenSSH known_hosts lines for every pinned VM, for the hooks' ssh client."""
    lines = []
    for vm in sorted(state.vms, key=lambda vm: vm.name):
        if not vm.address or vm.deleting or vm.tainted:
            continue
        host = vm.address if port == 22 else f"[{vm.address}]:{port}"
        lines += [f"{host} {key}" for key in vm.host_keys]
    return "".join(line + "\n" for line in lines)


def sync_known_hosts(state: PoolState, ssh: SshConfig) -> None:
    text = known_hosts_text(state, ssh.port)
    try:
        with open(ssh.known_hosts, encoding="utf-8") as handle:
            if handle.read() == text:
                return
    except FileNotFoundError:
        os.makedirs(os.path.dirname(ssh.known_hosts), mode=0o755, exist_ok=True)
    write_atomically(ssh.known_hosts, text, mode=0o644)


# --- the Cloud adapter (OpenStack Nova) ---


class Cloud(Protocol):
    def list_servers(self) -> list[Server]: ...
    def create_server(self, name: str, vm_class: str = DEFAULT_CLASS) -> str: ...
    def flavor_size(self, flavor: str) -> dict[str, int]: ...  # {"vcpus", "ram" (MiB), "gpus"}
    def absolute_limits(self) -> dict[str, int]: ...  # Nova's maxTotalCores, totalCoresUsed ...
    def delete_server(self, server_id: str) -> None: ...
    def console_output(self, server_id: str) -> str: ...
    def pools_wanting(self) -> frozenset[str]: ...  # the project's pools whose jobs wait on its quota
    def signal_wanting(self, pool: str, wanting: bool) -> None: ...


DEMAND_GROUP_PREFIX = "vmpool-demand-"  # + the pool's name: a server group saying its jobs wait on the quota

NOVA_STATUS = {
    "ACTIVE": SERVER_ACTIVE,
    "BUILD": SERVER_BUILDING,
    "ERROR": SERVER_ERROR,
    "SHUTOFF": SERVER_DOWN,
    "STOPPED": SERVER_DOWN,
    "SUSPENDED": SERVER_DOWN,
    "PAUSED": SERVER_DOWN,
    "SHELVED": SERVER_DOWN,
    "SHELVED_OFFLOADED": SERVER_DOWN,
    "DELETED": SERVER_DELETING,
    "SOFT_DELETED": SERVER_DELETING,
}


def server_status_from_nova(status: str, task_state: str | None) -> str:
    if task_state == "deleting":
        return SERVER_DELETING
    if status.upper() == "UNKNOWN":
        return SERVER_UNKNOWN
    return NOVA_STATUS.get(status.upper(), SERVER_OTHER)


def parse_nova_time(text: str | None) -> float | None:
    import datetime

    try:
        return datetime.datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


def next_page_marker(links: list[dict[str, Any]]) -> str:
    """The marker of Nova's "next" link (its host may be one we cannot reach: only the marker is used)."""
    from urllib.parse import parse_qs, urlsplit

    for link in links:
        if link.get("rel") == "next":
            return parse_qs(urlsplit(str(link.get("href", ""))).query).get("marker", [""])[0]
    return ""


def first_ipv4(addresses: dict[str, Any]) -> str | None:
    for entries in addresses.values():
        for entry in entries:
            addr = entry.get("addr", "")
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(addr).version == 4:
                    return addr
    return None


# Nova answers a create that is over a limit with 403 and its OverQuota family's words (nova/exception.py):
# "Quota exceeded for instances: ...", "Maximum number of ports exceeded" (Neutron's port quota), "The
# number of defined ports: 12 is over the limit: 10", "Maximum number of metadata items exceeds 128".
# Its other 403s will never work: "Policy doesn't allow os_compute_api:servers:create to be performed.",
# a zero-disk flavor ("Only volume-backed servers are allowed ..."), an external network.
OVER_LIMIT_RE = re.compile(r"quota|limit|maximum number", re.IGNORECASE)


def retry_after_seconds(value: str | None, now: float) -> float:
    """An HTTP Retry-After (seconds, or an HTTP date) as seconds from now; 0 when absent or unreadable."""
    if not value:
        return 0.0
    if value.strip().isdigit():
        return float(value.strip())
    import email.utils

    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return 0.0


def translate_cloud_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """novaclient and keystoneauth1 exceptions stop here and become vmpool's CloudError."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from keystoneauth1 import exceptions as ks_exc
        from novaclient import exceptions as nova_exc

        what = func.__name__.replace("_", " ")
        auth_url = getattr(args[0], "auth_url", "?") if args else "?"
        hint = getattr(args[0], "credentials_hint", "check the cloud credentials") if args else ""
        try:
            return func(*args, **kwargs)
        except nova_exc.NotFound as error:
            raise ServerGone(f"{what}: not found ({error})") from None
        except (nova_exc.OverLimit, nova_exc.RateLimit, nova_exc.Forbidden) as error:
            if isinstance(error, nova_exc.Forbidden) and not OVER_LIMIT_RE.search(str(error)):
                raise CloudRefused(f"{what}: forbidden: {error}") from None
            # novaclient reads a Retry-After in seconds only; the answer's header, kept by the session, may be a date
            retry_after = retry_after_seconds(getattr(args[0], "last_retry_after", lambda: None)(), time.time())
            raise QuotaExceeded(f"{what}: over a limit of the cloud: {error}", retry_after) from None
        except (nova_exc.BadRequest, nova_exc.Unauthorized) as error:
            raise CloudRefused(f"{what}: refused (HTTP {error.code}): {error}") from None
        except nova_exc.ClientException as error:
            raise CloudError(f"{what}: HTTP {getattr(error, 'code', '?')}: {error}") from None
        except (ks_exc.ConnectTimeout, ks_exc.RequestTimeout):  # keystoneauth1 reports read timeouts as connect
            raise CloudError(f"{what}: the cloud did not answer in time (api_timeout)") from None
        except ks_exc.ConnectFailure as error:
            raise CloudError(f"{what}: {unreachable(str(error), auth_url)}") from None
        except ks_exc.Unauthorized as error:
            raise not_keystone(args[0], what) or CloudRefused(
                f"{what}: authentication failed at {auth_url}: {error} ({hint})"
            ) from None
        except (ks_exc.NotFound, ks_exc.BadRequest, ks_exc.DiscoveryFailure, ks_exc.InvalidResponse) as error:
            raise not_keystone(args[0], what) or CloudRefused(
                f"{what}: Keystone at {auth_url} answered {type(error).__name__}: {error} "
                "(check [openstack] auth_url: the Keystone v3 URL, e.g. https://host:5000/v3)"
            ) from None
        except ks_exc.ClientException as error:
            raise CloudError(f"{what}: {type(error).__name__} (auth_url {auth_url}): {error}") from None

    return wrapper


def unreachable(message: str, auth_url: str) -> str:
    """keystoneauth1's ConnectFailure (a long urllib3 line) in one sentence: which service, where, why."""
    url = re.search(r"connection to (\S+?):? ", message)
    errno = re.search(r"\[Errno -?\d+\] ([^'\"()\]]+)", message)
    reason = errno.group(1).strip().lower() if errno else "no connection"
    if url is None or auth_url == "?" or url.group(1).startswith(auth_url.rstrip("/")):
        return f"cannot reach Keystone at {auth_url}: {reason} (check auth_url: its host, port and scheme)"
    return (
        f"cannot reach the compute API at {url.group(1)}, which Keystone's catalog names: {reason} "
        "(check the region_name and interface of the credentials)"
    )


def known_clouds() -> str:
    """The clouds OpenStack's loader finds, for an error about a cloud name it does not know."""
    import openstack.config.loader

    try:
        loader = openstack.config.loader.OpenStackConfig()
        names = sorted(name for name in loader.get_cloud_names() if name != "envvars")
    except Exception:  # the error being reported says enough
        return ""
    if not loader.config_filename:
        return "; no clouds.yaml was found"
    return f"; {loader.config_filename} has " + (f"cloud(s) {', '.join(names)}" if names else "no clouds")


def not_keystone(cloud: Any, what: str) -> CloudRefused | None:
    """A refusal naming the cause when the auth URL answers as something else than Keystone (Nova's URL)."""
    auth_url = getattr(cloud, "auth_url", "?")
    if auth_url == "?" or getattr(cloud, "answers_as_keystone", lambda: True)():
        return None
    return CloudRefused(
        f"{what}: {auth_url} answered, but is not a Keystone identity endpoint; set auth_url to "
        "Keystone's v3 URL, e.g. https://host:5000/v3 (`openstack endpoint list --service identity`)"
    )


class NovaCloud:
    """The pool's servers in OpenStack, through novaclient over a keystoneauth1 session."""

    # 2.69: a server in a down cell is listed with status UNKNOWN instead of left out (only by a
    # listing without filters and paging: list_servers).
    MICROVERSION = "2.69"

    def __init__(self, config: Config):
        self.config = config
        self._nova: Any = None
        self._answers = threading.local()
        self._region: str | None = None
        self._interface = "public"
        self.auth_url = config.openstack.auth_url or "?"  # known once a clouds.yaml or OS_* is read

    @property
    def credentials_hint(self) -> str:
        cloud = self.config.openstack
        if cloud.cloud:
            return f"check the auth of cloud {cloud.cloud!r} in clouds.yaml and secure.yaml"
        if cloud.auth_url:
            return "check [openstack] username, password, project_name or the application credential"
        return "check OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME or OS_APPLICATION_CREDENTIAL_* (or OS_CLOUD)"

    def _client(self) -> Any:
        if self._nova is None:
            from novaclient import client as nova_client

            # keystoneauth1 re-authenticates on a 401 (an expired token) and retries once by itself.
            session = self._session()
            session.session.hooks["response"].append(self._keep_retry_after)
            self._nova = nova_client.Client(
                self.MICROVERSION, session=session, region_name=self._region, endpoint_type=self._interface
            )
        return self._nova

    def _keep_retry_after(self, response: Any, *args: Any, **kwargs: Any) -> None:
        """requests' response hook: each thread's last answer's Retry-After (creates run side by side)."""
        self._answers.retry_after = response.headers.get("Retry-After")

    def last_retry_after(self) -> str | None:
        return getattr(self._answers, "retry_after", None)

    def answers_as_keystone(self) -> bool:
        """Does auth_url answer with Keystone's version document? True when it cannot tell."""
        import requests

        cloud = self.config.openstack
        try:
            answer = requests.get(
                self.auth_url,
                timeout=cloud.api_timeout,
                verify=cloud.cacert or True,
                headers={"Accept": "application/json"},
            )
        except (requests.RequestException, ValueError):
            return True
        return "vnd.openstack.identity" in answer.text  # the media type every Keystone version names

    def _session(self) -> Any:
        """A keystoneauth1 session from the one source of credentials the config names."""
        cloud = self.config.openstack
        if not cloud.auth_url:
            return self._session_from_openstack_config()
        from keystoneauth1 import session as ks_session
        from keystoneauth1.identity import v3

        auth: Any
        if cloud.application_credential_id:
            auth = v3.ApplicationCredential(
                auth_url=cloud.auth_url,
                application_credential_id=cloud.application_credential_id,
                application_credential_secret=cloud.application_credential_secret,
            )
        else:
            auth = v3.Password(
                auth_url=cloud.auth_url,
                username=cloud.username,
                password=cloud.password,
                user_domain_name=cloud.user_domain_name or "Default",
                project_name=cloud.project_name,
                project_domain_name=cloud.project_domain_name or "Default",
            )
        self._region, self._interface = cloud.region_name or None, cloud.interface or "public"
        return ks_session.Session(auth=auth, timeout=cloud.api_timeout, verify=cloud.cacert or True)

    def _session_from_openstack_config(self) -> Any:
        """[openstack] cloud's clouds.yaml entry (with secure.yaml), else the OS_* environment, read by
        OpenStack's own loader: its search path (./, ~/.config/openstack/, /etc/openstack/, or
        $OS_CLIENT_CONFIG_FILE), auth plugins, region, interface, cacert and verify (insecure).
        [openstack] region_name, interface and cacert, when set, override what it read."""
        import openstack.config
        import openstack.exceptions

        cloud = self.config.openstack
        source = credentials_source(cloud)
        overrides: dict[str, Any] = {
            key: value for key, value in (("region_name", cloud.region_name), ("cacert", cloud.cacert)) if value
        }
        # The loader skips a clouds.yaml that does not parse with a warning only: keep it for the error.
        skipped: list[str] = []
        collect = logging.Handler(logging.WARNING)
        collect.emit = lambda record: skipped.append(" ".join(record.getMessage().split()))  # type: ignore[method-assign]
        loader_log = logging.getLogger("openstack.config")
        loader_log.addHandler(collect)
        try:
            region = openstack.config.get_cloud_region(
                cloud=cloud.cloud or None, api_timeout=cloud.api_timeout, **overrides
            )
            session = region.get_session()
        except openstack.exceptions.ConfigException as error:
            because = f" ({'; '.join(skipped)})" if skipped else known_clouds() if "not found" in str(error) else ""
            raise ConfigError(
                f"{self.config.path}: {source}: {error}{because} (clouds.yaml is read from ./, "
                "~/.config/openstack/, /etc/openstack/ or $OS_CLIENT_CONFIG_FILE)"
            ) from None
        except Exception as error:  # a file it cannot read, an auth plugin it does not know
            raise ConfigError(
                f"{self.config.path}: {source}: cannot be read: {type(error).__name__}: {' '.join(str(error).split())}"
            ) from None
        finally:
            loader_log.removeHandler(collect)
        for warning in skipped:
            log.warning(f"{source}: {warning}")
        self.auth_url = str((region.config.get("auth") or {}).get("auth_url") or "?")
        self._region = region.get_region_name("compute") or None
        read = region.get_interface("compute")  # a list when clouds.yaml gives several
        self._interface = (
            cloud.interface or (read[0] if isinstance(read, list) and read else str(read or "")) or "public"
        )
        return session

    def _metadata(self, name: str, vm_class: str = DEFAULT_CLASS) -> dict[str, str]:
        tags = {METADATA_POOL_KEY: self.config.pool.name, METADATA_VM_KEY: name}
        return {
            **dict(self.config.openstack.metadata),
            **tags,
            **({METADATA_CLASS_KEY: vm_class} if vm_class != DEFAULT_CLASS else {}),
        }

    @translate_cloud_errors
    def list_servers(self) -> ServerListing:
        """Every server of the pool, matched by its tag, over every page Nova's max_limit cuts the list into.

        The project's whole listing, unfiltered: Nova lists a down cell's servers (status UNKNOWN,
        by id alone) only when a listing has no filter and no paging; with a name filter they are
        left out without a word (believed gone, they made a pool of max 4 hold 6 once the cell was back).
        Pages after the first (a marker) leave them out too, as does a first page full of the
        other cells' servers: such a listing is marked incomplete.

        Pages are followed by Nova's own "next" link (present only when a page is full), so a pool
        that fits one page costs one request; novaclient's limit=-1 would always ask once more.
        A server can come twice: one still being scheduled is listed from its build request, and
        when the marker is such a request, Nova lists every instance on the next page, that server
        included once it has reached its cell. Each server counts once, as its latest page shows it.
        """
        from urllib.parse import urlencode

        servers: dict[str, Server] = {}
        marker, pages = "", 0
        while True:
            url = "/servers/detail" + ("?" + urlencode({"marker": marker}) if marker else "")
            _, body = self._client().client.get(url)
            pages += 1
            page = body.get("servers") or []
            servers.update((server.id, server) for raw in page if (server := self._server(raw)) is not None)
            marker = next_page_marker(body.get("servers_links") or [])
            if not marker or not page:
                listing = ServerListing(servers.values())
                listing.complete = pages == 1
                return listing

    def _server(self, raw: dict[str, Any]) -> Server | None:
        if str(raw.get("status", "")).upper() == "UNKNOWN":
            # a down cell: Nova gives the id and little else (no tag): it may be ours
            return Server(id=raw["id"], name=raw.get("name") or "", status=SERVER_UNKNOWN)
        metadata = raw.get("metadata") or {}
        if metadata.get(METADATA_POOL_KEY) != self.config.pool.name:
            return None  # not ours, whatever its name says (vmpool-gpu- also matches ^vmpool-)
        return Server(
            id=raw["id"],
            name=raw.get("name") or "",
            vm_name=metadata.get(METADATA_VM_KEY, ""),
            vm_class=metadata.get(METADATA_CLASS_KEY, DEFAULT_CLASS),
            created_at=parse_nova_time(raw.get("created")),
            status=server_status_from_nova(raw.get("status") or "", raw.get("OS-EXT-STS:task_state")),
            address=first_ipv4(raw.get("addresses") or {}),
            fault=(raw.get("fault") or {}).get("message", ""),
        )

    @translate_cloud_errors
    def create_server(self, name: str, vm_class: str = DEFAULT_CLASS) -> str:
        cloud = self.config.openstack
        kind = self.config.pool.class_named(vm_class) or ClassConfig()
        extra: dict[str, Any] = {}
        if kind.key_name or cloud.key_name:
            extra["key_name"] = kind.key_name or cloud.key_name
        if cloud.security_groups:
            extra["security_groups"] = list(cloud.security_groups)
        if cloud.availability_zone:
            extra["availability_zone"] = cloud.availability_zone
        server = self._client().servers.create(
            name=name,
            image=kind.image or cloud.image,
            flavor=kind.flavor or cloud.flavor,
            nics=[{"net-id": kind.network or cloud.network}],
            meta=self._metadata(name, vm_class),
            **extra,
        )
        return str(server.id)

    @translate_cloud_errors
    def flavor_size(self, flavor: str) -> dict[str, int]:
        """The flavor's vCPUs, RAM (MiB) and GPUs: those its extra specs ask of the host
        (resources:VGPU, resources:PGPU, pci_passthrough:alias counts)."""
        from urllib.parse import quote

        client = self._client().client
        described = client.get(f"/flavors/{quote(flavor, safe='')}")[1]["flavor"]
        specs = client.get(f"/flavors/{quote(flavor, safe='')}/os-extra_specs")[1].get("extra_specs") or {}
        return {"vcpus": int(described["vcpus"]), "ram": int(described["ram"]), "gpus": gpus_of(specs)}

    @translate_cloud_errors
    def absolute_limits(self) -> dict[str, int]:
        absolute = self._client().client.get("/limits")[1]["limits"]["absolute"]
        return {key: int(value) for key, value in absolute.items() if isinstance(value, int)}

    @translate_cloud_errors
    def delete_server(self, server_id: str) -> None:
        self._client().servers.delete(server_id)

    def _demand_groups(self) -> list[dict[str, Any]]:
        _, body = self._client().client.get("/os-server-groups")
        return [
            group
            for group in body.get("server_groups") or []
            if str(group.get("name", "")).startswith(DEMAND_GROUP_PREFIX)
        ]

    @translate_cloud_errors
    def pools_wanting(self) -> frozenset[str]:
        """The pools of the project whose jobs wait on its quota. Each says so with a server group
        named after it: the one kind of object every pool can list, and make, without a server of
        its own (a pool the quota keeps at no server at all must still be heard)."""
        return frozenset(group["name"][len(DEMAND_GROUP_PREFIX) :] for group in self._demand_groups())

    @translate_cloud_errors
    def signal_wanting(self, pool: str, wanting: bool) -> None:
        name = DEMAND_GROUP_PREFIX + pool
        mine = [group["id"] for group in self._demand_groups() if group.get("name") == name]
        if wanting and not mine:
            self._client().client.post(
                "/os-server-groups", body={"server_group": {"name": name, "policy": "soft-affinity"}}
            )
        for group_id in mine if not wanting else ():
            self._client().client.delete(f"/os-server-groups/{group_id}")

    @translate_cloud_errors
    def console_output(self, server_id: str) -> str:
        return str(self._client().servers.get_console_output(server_id) or "")

    @translate_cloud_errors
    def check_setup(self, public_key: str | None) -> list[tuple[str, str]]:
        """What the cloud says of each [openstack] key vmpool's creates name: (key, what is wrong,
        "" when right). Authenticates first: wrong credentials or auth_url raise, naming the keys.

        Looked up through Nova's API at microversion 2.1, whose image and network proxies reach
        Glance and Neutron without a client for each. The key pair must hold public_key (the
        private key's), or root could not log in to any VM.
        """
        from urllib.parse import quote

        from novaclient import client as nova_client
        from novaclient import exceptions as nova_exc

        cloud = self.config.openstack
        session = self._client().client.session
        session.get_auth_headers()  # authenticate now
        legacy = nova_client.Client("2.1", session=session, region_name=self._region, endpoint_type=self._interface)

        def get(path: str) -> dict[str, Any] | None:
            try:
                body: dict[str, Any] = legacy.client.get(path)[1]
                return body
            except nova_exc.NotFound:
                return None

        def by_id(key: str, value: str, collection: str) -> str:
            if get(f"/{collection}/{quote(value, safe='')}") is not None:
                return ""
            named = [
                item["id"] for item in (get(f"/{collection}") or {}).get(collection, []) if item.get("name") == value
            ]
            if named:
                return f"{value!r} is the name of {key} {named[0]}; give its ID: {key} = {named[0]}"
            return f"the cloud has no {key} with ID {value!r} (`openstack {key} list` shows them)"

        def network(value: str) -> str:
            if get(f"/os-networks/{quote(value, safe='')}") is not None:
                return ""
            return f"the cloud has no network with ID {value!r} (`openstack network list` shows them)"

        checks = {
            "flavor": lambda value: by_id("flavor", value, "flavors"),
            "image": lambda value: by_id("image", value, "images"),
            "network": network,
        }
        findings: list[tuple[str, str]] = []
        for key, check in checks.items():  # [openstack]'s value, then each class's own
            values = {f"[openstack] {key} = {getattr(cloud, key)}": getattr(cloud, key)} if getattr(cloud, key) else {}
            values.update(
                (f"[class {vm_class.name}] {key} = {getattr(vm_class, key)}", getattr(vm_class, key))
                for vm_class in self.config.pool.vm_classes
                if getattr(vm_class, key) and getattr(vm_class, key) != getattr(cloud, key)
            )
            findings += [(where, check(value)) for where, value in values.items()]
        if cloud.key_name:
            keypair = (get(f"/os-keypairs/{quote(cloud.key_name, safe='')}") or {}).get("keypair")
            if keypair is None:
                problem = f"no key pair {cloud.key_name!r} in this project (`openstack keypair list`)"
            elif public_key is not None and keypair.get("public_key", "").split()[:2] != public_key.split()[:2]:
                problem = (
                    f"key pair {cloud.key_name!r} does not hold the public half of [ssh] private_key: "
                    "root could not log in to the VMs"
                )
            else:
                problem = ""
            findings.append((f"[openstack] key_name = {cloud.key_name}", problem))
        return findings


HOST_KEY_BLOCK_RE = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", re.DOTALL)
HOST_KEY_LINE_RE = re.compile(r"((?:ssh-(?:rsa|ed25519|dss)|ecdsa-sha2-nistp(?:256|384|521)|sk-\S+)\s+[A-Za-z0-9+/=]+)")


def gpus_of(extra_specs: dict[str, str]) -> int:
    """The GPUs a flavor's extra specs ask for: resources:VGPU / resources:PGPU = N, and the counts
    of pci_passthrough:alias = "a100:2,t4:1"."""
    gpus = 0
    for key in ("resources:VGPU", "resources:PGPU"):
        with contextlib.suppress(ValueError):
            gpus += int(extra_specs.get(key, "0"))
    for alias in extra_specs.get("pci_passthrough:alias", "").split(","):
        name, _, count = alias.partition(":")
        if name.strip():
            with contextlib.suppress(ValueError):
                gpus += int(count or "1")
    return gpus


def host_keys_from_console(console: str) -> list[str]:
    """The host keys cloud-init printed; the last block wins (a reboot prints it again)."""
    blocks = HOST_KEY_BLOCK_RE.findall(console)
    if not blocks:
        return []
    return [match.group(1) for match in HOST_KEY_LINE_RE.finditer(blocks[-1])]


# --- the Remote adapter (SSH) ---


class Remote(Protocol):
    def probe(self, address: str, host_keys: Sequence[str]) -> ProbeResult: ...
    def probe_all(self, targets: Sequence[tuple[str, Sequence[str]]]) -> list[ProbeResult]: ...


class FabricRemote:
    """SSH to pool VMs through fabric, with the VM's host key pinned and every wait bounded."""

    def __init__(self, ssh: SshConfig):
        self.ssh = ssh

    def _connection(self, address: str, sock: Any = None) -> Any:
        """A fabric connection to the VM; over `sock` if given (connected already, by _reach)."""
        import fabric

        ssh = self.ssh
        return fabric.Connection(
            address,
            user=ssh.user,
            port=ssh.port,
            # connect_timeout bounds only the TCP connect and is truncated to an int (0 = none).
            connect_timeout=max(1, int(ssh.connect_timeout)),
            connect_kwargs={
                "key_filename": ssh.private_key,
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": ssh.banner_timeout,
                "auth_timeout": ssh.auth_timeout,
                # a dead peer otherwise holds a channel open for paramiko's default hour
                "channel_timeout": ssh.command_timeout,
                **({"sock": sock} if sock is not None else {}),
            },
        )

    def _pin(self, connection: Any, address: str, host_keys: Sequence[str]) -> list[str]:
        """Trust exactly the pinned keys; with none, learn the key on first contact."""
        import paramiko

        client = connection.client
        learned: list[str] = []
        if host_keys:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            entry = address if self.ssh.port == 22 else f"[{address}]:{self.ssh.port}"
            for line in host_keys:
                keytype, _, data = line.partition(" ")
                with contextlib.suppress(Exception):
                    client.get_host_keys().add(entry, keytype, paramiko.PKey.from_type_string(keytype, _b64(data)))
        else:
            client.set_missing_host_key_policy(_learning_policy(learned))
        return learned

    def probe_all(self, targets: Sequence[tuple[str, Sequence[str]]]) -> list[ProbeResult]:
        """Probe many VMs at once (address, pinned keys), at most probe_parallelism logins at a time.

        A probe first waits for the VM's TCP connect and SSH banner without a login slot (_reach),
        so dead VMs all wait out their timeouts together from the start of the pass, whatever their
        number, while the live ones go through the slots. Paramiko runs each login in Python under
        the GIL, CPU-bound: past PROBES_PER_PROCESS VMs one process is bound to one core,
        so the probes are shared out over worker processes, one per core. Should the workers fail
        to start, this process probes them all itself.
        """
        processes = min(os.cpu_count() or 1, -(-len(targets) // PROBES_PER_PROCESS))
        logins = -(-self.ssh.probe_parallelism // max(processes, 1))
        if processes > 1:
            try:
                return _probe_in_processes(self.ssh, list(targets), processes, logins)
            except Exception as error:  # a worker killed (OOM), no /dev/shm...: slower, but probed
                log.warning(
                    f"probing in {processes} processes failed ({type(error).__name__}: {error}); probing in this one"
                )
        return probe_in_threads(self.ssh, list(targets), self.ssh.probe_parallelism)

    def _reach(self, address: str) -> Any:
        """A TCP connection to the VM's sshd once its banner is there to read (paramiko reads it), or
        the ProbeResult of a VM that is not reached: no connection within connect_timeout, or no
        banner within banner_timeout."""
        import socket

        ssh = self.ssh
        try:
            sock = socket.create_connection((address, ssh.port), timeout=max(1, int(ssh.connect_timeout)))
        except TimeoutError:
            return ProbeResult(address, False, f"ssh timeout after {ssh.connect_timeout:.0f}s")
        except OSError as error:
            return ProbeResult(address, False, _ssh_failure(error))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(ssh.banner_timeout)
            sock.recv(1, socket.MSG_PEEK)  # the server speaks first; b"" (closed): paramiko says why
        except TimeoutError:
            sock.close()
            log.debug(
                f"ssh {address} port {ssh.port}: TCP connected, but no SSH protocol banner within "
                f"{ssh.banner_timeout:g}s (a hung sshd, or one refusing over MaxStartups)"
            )
            return ProbeResult(address, False, f"ssh: no SSH banner within {ssh.banner_timeout:.0f}s")
        except OSError as error:
            sock.close()
            return ProbeResult(address, False, _ssh_failure(error))
        return sock

    def probe(self, address: str, host_keys: Sequence[str], logins: Any = None) -> ProbeResult:
        """Whether the VM takes a login and runs `true`. `logins` (a semaphore): the login waits for
        a slot in it once the VM is reached."""
        reached = self._reach(address)
        if isinstance(reached, ProbeResult):
            return reached
        try:
            with logins or contextlib.nullcontext():
                return self._log_in(address, host_keys, reached)
        finally:
            reached.close()

    def _log_in(self, address: str, host_keys: Sequence[str], sock: Any) -> ProbeResult:
        import paramiko
        from invoke.exceptions import CommandTimedOut

        connection = self._connection(address, sock)
        learned = self._pin(connection, address, host_keys)
        # logged in, then the VM stopped answering (or a hung shell): no better than no SSH
        timed_out = ProbeResult(address, False, f"ssh: `true` did not finish within {self.ssh.command_timeout:g}s")
        try:
            connection.open()
            started = time.monotonic()
            result = connection.run("true", hide=True, warn=True, in_stream=False, timeout=self.ssh.command_timeout)
            # invoke's timer closes the channel (exit status -1) and raises CommandTimedOut only if
            # the timer thread has ended by the time run() checks it: under load it often has not
            if result.exited == -1 and time.monotonic() - started >= self.ssh.command_timeout:
                return timed_out
            if result.exited != 0:
                return ProbeResult(address, False, f"`true` exited {result.exited}")
            return ProbeResult(address, True, host_keys=tuple(learned))
        except CommandTimedOut:
            return timed_out
        except paramiko.BadHostKeyException as error:
            return ProbeResult(
                address, False, f"presented {error.key.get_name()} key not pinned", host_key_changed=True
            )
        except paramiko.SSHException as error:
            if "not found in known_hosts" in str(error):
                return ProbeResult(address, False, "host key not pinned", host_key_changed=True)
            if "protocol banner" in str(error) or "No existing session" in str(error):
                # TCP connected, SSH never answered (a hung sshd); paramiko words it either way
                return ProbeResult(address, False, f"ssh: no SSH banner within {self.ssh.banner_timeout:.0f}s")
            return ProbeResult(address, False, f"ssh: {error or type(error).__name__}")
        except OSError as error:  # connected already (_reach): a reset, a timeout mid-login
            return ProbeResult(address, False, _ssh_failure(error))
        except Exception as error:  # invoke's other failures (ThreadException...)
            return ProbeResult(address, False, f"ssh: {type(error).__name__}: {error}")
        finally:
            connection.close()
            connection.client.close()  # after a failed open() fabric's close() leaves the socket behind


def _ssh_failure(error: OSError) -> str:
    return f"ssh: {(error.strerror or str(error)).lower()}"


PROBES_PER_PROCESS = 100  # one process's logins keep up with this many VMs in a pass
WAITS_PER_LOGIN = 4  # VMs waited on (TCP connect, SSH banner) per login slot: a sleeping thread and a socket each


def probe_threads(logins: int, targets: int) -> int:
    """A probing process's threads: WAITS_PER_LOGIN per login slot, no more than the targets, nor
    than half its file descriptor limit (each thread holds a socket; the rest is for the logins)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = soft // 2 if soft != resource.RLIM_INFINITY else WAITS_PER_LOGIN * logins
    return max(1, min(WAITS_PER_LOGIN * logins, targets, budget))


def probe_in_threads(ssh: SshConfig, targets: list[tuple[str, Sequence[str]]], logins: int) -> list[ProbeResult]:
    """FabricRemote.probe over the targets, `logins` logins at a time; results in the targets' order."""
    from concurrent.futures import ThreadPoolExecutor

    remote, slots = FabricRemote(ssh), threading.BoundedSemaphore(logins)
    with ThreadPoolExecutor(max_workers=probe_threads(logins, len(targets))) as executor:
        return list(executor.map(lambda target: remote.probe(target[0], target[1], slots), targets))


def _probe_in_processes(
    ssh: SshConfig, targets: list[tuple[str, Sequence[str]]], processes: int, logins: int
) -> list[ProbeResult]:
    """The targets through `processes` workers of `logins` login slots (and probe_threads threads)
    each, every thread taking the next target from one queue: a dead VM holds a thread for its
    timeout wherever it is, and the rest flow to the free threads. (Dealt out in fixed shares,
    dead VMs that fell into one share starved its healthy ones: the pass waited for its last
    dead VM to start.) Each worker is a fresh interpreter (forkserver: no fork of this process's
    threads and locks), quiet as this one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("forkserver")
    todo = context.Queue()  # a feeder thread writes it: put() never blocks on the pipe
    for item in enumerate(targets):
        todo.put(item)
    threads = probe_threads(logins, len(targets))
    for _ in range(processes * threads):
        todo.put(None)  # one end mark per thread
    verbose = log.isEnabledFor(logging.DEBUG)
    try:
        with ProcessPoolExecutor(
            processes, mp_context=context, initializer=_probe_worker_started, initargs=(verbose, todo)
        ) as executor:
            answers = list(
                executor.map(_probe_from_queue, [ssh] * processes, [logins] * processes, [threads] * processes)
            )
    finally:
        todo.cancel_join_thread()  # what a broken worker left in it is not waited for
        todo.close()
    by_index = dict(pair for answer in answers for pair in answer)
    if len(by_index) != len(targets):  # a thread died mid-probe: its target is not known
        raise RuntimeError(f"{len(targets) - len(by_index)} of {len(targets)} probes got no answer from the workers")
    return [by_index[index] for index in range(len(targets))]


_probe_queue: Any = None  # a probe worker's queue of (index, target), set as the worker starts


def _probe_worker_started(verbose: bool, todo: Any) -> None:
    """A probe worker logs as the command does: paramiko's tracebacks only with -v."""
    global _probe_queue
    _probe_queue = todo
    setup_logging(verbose)


def _probe_from_queue(ssh: SshConfig, logins: int, threads: int) -> list[tuple[int, ProbeResult]]:
    """In a probe worker: `threads` threads probe the queue's targets, `logins` logins at a time,
    until each thread takes an end mark. Each thread starts with its first target taken, and no
    login begins before every thread has started: logins are CPU-bound under the GIL, and begun
    early they held back the other threads' connects, so dead VMs began their waits seconds late."""
    remote, slots, all_started = FabricRemote(ssh), threading.BoundedSemaphore(logins), threading.Event()
    answers: list[tuple[int, ProbeResult]] = []

    @contextlib.contextmanager
    def login_slot() -> Iterator[None]:
        all_started.wait()
        with slots:
            yield

    def probe_until_end(item: Any) -> None:
        while item is not None:
            index, (address, host_keys) = item
            answers.append((index, remote.probe(address, host_keys, login_slot())))  # list.append: atomic
            item = _probe_queue.get()

    workers = [
        threading.Thread(target=probe_until_end, args=(_probe_queue.get(),), daemon=True) for _ in range(threads)
    ]
    try:
        for worker in workers:
            worker.start()
    finally:
        all_started.set()  # even if a thread could not start: the started ones must not wait forever
    for worker in workers:
        worker.join()
    return answers


def public_key_of(path: str) -> tuple[str | None, str]:
    """The OpenSSH public line of a private key file, or why it cannot be used (passphrase, format)."""
    import paramiko

    try:
        key = paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        return None, "is protected by a passphrase: cron and the hooks cannot type it; use a key without one"
    except (OSError, paramiko.SSHException, ValueError) as error:
        return None, f"cannot be read as an SSH private key: {error}"
    return f"{key.get_name()} {key.get_base64()}", ""


def _b64(data: str) -> bytes:
    import base64

    return base64.b64decode(data.split()[0])


def _learning_policy(learned: list[str]) -> Any:
    """Trust on first use, right after boot, when the console printed no keys: record the key."""
    import paramiko

    class LearnHostKey(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
            learned.append(f"{key.get_name()} {key.get_base64()}")

    return LearnHostKey()


# --- the Batch adapter (Torque, Slurm) ---
# Whether a job still lives: a VM whose job ended without its epilogue (a lost epilogue, a failed
# release) is recovered by reconcile only if the batch system can be asked.

JOB_ALIVE, JOB_GONE, JOB_UNKNOWN = "alive", "gone", "unknown"
TORQUE_UNKNOWN_JOB = 153  # qstat's exit code for "Unknown Job Id"
# Slurm job states after which the job holds nothing (COMPLETING still runs the epilog).
SLURM_ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
    "SPECIAL_EXIT",
    "REVOKED",
}


class Batch(Protocol):
    def job_state(self, job: str) -> str: ...  # JOB_ALIVE, JOB_GONE or JOB_UNKNOWN + ": why"


def torque_job_state(exit_code: int, stdout: str, stderr: str) -> str:
    """Read `qstat -f -1 JOBID`: unknown id (153) or job_state C (completed, kept for keep_completed) = gone."""
    if exit_code == TORQUE_UNKNOWN_JOB or "Unknown Job Id" in stderr:
        return JOB_GONE
    if exit_code != 0:
        return f"{JOB_UNKNOWN}: qstat exited {exit_code}: {stderr.strip()[:200]}"
    found = re.search(r"^\s*job_state = (\S+)", stdout, re.MULTILINE)
    if found is None:
        return f"{JOB_UNKNOWN}: qstat printed no job_state"
    return JOB_GONE if found.group(1) == "C" else JOB_ALIVE


def slurm_job_state(exit_code: int, stdout: str, stderr: str) -> str:
    """Read `scontrol -o show job JOBID`: an invalid id (purged after MinJobAge) or an ended state = gone."""
    if "Invalid job id" in stderr:
        return JOB_GONE
    if exit_code != 0:
        return f"{JOB_UNKNOWN}: scontrol exited {exit_code}: {stderr.strip()[:200]}"
    found = re.search(r"\bJobState=(\S+)", stdout)
    if found is None:
        return f"{JOB_UNKNOWN}: scontrol printed no JobState"
    return JOB_GONE if found.group(1) in SLURM_ENDED else JOB_ALIVE


class CommandBatch:
    """Asks the batch system through a command line; `parse` reads its answer."""

    def __init__(self, argv: list[str], parse: Callable[[int, str, str], str], timeout: float):
        self.argv = argv
        self.parse = parse
        self.timeout = timeout

    def job_state(self, job: str) -> str:
        import subprocess

        argv = [part.replace("{jobid}", job) for part in self.argv]
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.timeout, errors="replace"
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{JOB_UNKNOWN}: {argv[0]} failed to run: {error}"
        return self.parse(done.returncode, done.stdout, done.stderr)


class NoBatch:
    def job_state(self, job: str) -> str:
        return JOB_ALIVE  # [batch] system = none: only the epilogue frees a VM


def _exit_code_answer(gone_codes: tuple[int, ...]) -> Callable[[int, str, str], str]:
    def parse(exit_code: int, stdout: str, stderr: str) -> str:
        if exit_code in gone_codes:
            return JOB_GONE
        return JOB_ALIVE if exit_code == 0 else f"{JOB_UNKNOWN}: job_alive_command exited {exit_code}"

    return parse


def batch_for(config: Config) -> Batch:
    """The configured way to ask whether a job lives: job_alive_command, else the batch system's own tool."""
    import shlex
    import shutil

    pool, batch = config.pool, config.batch
    if pool.job_alive_command:
        return CommandBatch(
            shlex.split(pool.job_alive_command), _exit_code_answer(pool.job_gone_exit_codes), pool.job_alive_timeout
        )
    if batch.system == "none":
        return NoBatch()
    # cron's PATH is /usr/bin:/bin; TORQUE and Slurm built from source live in /usr/local/bin
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/bin", "/usr/local/sbin"])
    program = shutil.which(batch.program, path=search)
    if program is None:
        return UnreachableBatch(f"{batch.program} not found (set [batch] command, or system = none)")
    if batch.system == "slurm":
        return CommandBatch([program, "-o", "show", "job", "{jobid}"], slurm_job_state, pool.job_alive_timeout)
    return CommandBatch([program, "-f", "-1", "{jobid}"], torque_job_state, pool.job_alive_timeout)


class UnreachableBatch:
    def __init__(self, why: str):
        self.why = why

    def job_state(self, job: str) -> str:
        return f"{JOB_UNKNOWN}: {self.why}"


# --- the executor: applies the policy's actions through the adapters ---


# Seconds between a waiting acquire's locked tries when its unlocked look saw no chance: a safety
# net only (the look already skips dead waiters ahead; the try tidies their requests away). Shorter,
# a burst's waiters take the lock time its releases need (bench_burst.py, part 2).
WAITER_HEARTBEAT = 300.0


class Pool:
    """Wires config, store and adapters; every decision comes from the pure policy above. Every
    state change goes through _update. Its two long-running machines are classes of their own:
    the acquire that waits for a VM (WaitingAcquire) and the reconcile pass (ReconcilePass)."""

    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.time,
        cloud: Cloud | None = None,
        remote: Remote | None = None,
        batch: Batch | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        boot_clock: Callable[[], tuple[str, float]] | None = None,
    ):
        self.config = config
        self.clock = clock  # wall clock: what the state records
        self.monotonic = monotonic  # waits and deadlines inside this process
        self.sleep = sleep
        self.boot_clock = boot_clock or read_boot_clock
        self.store = StateStore(config.pool.state_file, config.pool.name, config.pool.lock_timeout)
        self._cloud = cloud
        self._remote = remote
        self._batch = batch
        self.host = os.uname().nodename  # socket.gethostname(), without importing socket on the fast path
        self.list_error: CloudError | None = None  # the last pass could not see the cloud
        self.list_error_told = ""  # the listing failure this process logged last
        # class -> the last pass's create of it, refused for good (a class's own image may be wrong)
        self.create_refused: dict[str, CloudRefused] = {}

    def _update(self, change: Callable[[PoolState], tuple[PoolState, Any]], lock_timeout: float | None = None) -> Any:
        """StateStore.update, with the state's times first kept true across a wall-clock step, and
        the VMs the change frees handed to the queue's head in the same write."""
        freed = 0
        handed: list[Action] = []

        def checked(state: PoolState) -> tuple[PoolState, Any]:
            nonlocal freed, handed
            boot_id, boot_seconds = self.boot_clock()
            state, notes = plan_clock(state, self.clock(), boot_id, boot_seconds)
            self.apply_notes(notes)
            new, result = change(state)
            freed = newly_free(state, new)
            if freed:
                new, handed = plan_hand_over(new, self.clock(), self.host, request_alive, self.config.pool)
            return new, result

        result = self.store.update(checked, lock_timeout)
        if freed:  # once the state says so: a woken waiter must find its VM Free, or handed to it
            self.store.note_freed(freed)
        self.apply_notes(handed)
        return result

    @property
    def cloud(self) -> Cloud:
        if self._cloud is None:
            self._cloud = NovaCloud(self.config)
        return self._cloud

    @property
    def remote(self) -> Remote:
        if self._remote is None:
            self._remote = FabricRemote(self.config.ssh)
        return self._remote

    @property
    def batch(self) -> Batch:
        if self._batch is None:
            self._batch = batch_for(self.config)
        return self._batch

    # -- acquire / release --

    def try_claim(
        self,
        job: str,
        user: str,
        started: float | None = None,
        lock_timeout: float | None = None,
        want: Want = Want(),
    ) -> Claimed | Waiting | Ended:
        pid = os.getpid()

        def change(state: PoolState) -> tuple[PoolState, Claimed | Waiting | Ended | Refused]:
            return plan_acquire(
                state,
                job,
                user,
                self.clock(),
                pid,
                self.host,
                live_waiters(state),
                started=started,
                pid_start=process_start(pid),
                records=job_records_to_follow(state, self.config.pool.job_records),
                want=want,
                pool=self.config.pool,
            )

        outcome: Claimed | Waiting | Ended | Refused = self._update(change, lock_timeout)
        if isinstance(outcome, Refused):
            raise BadInput(outcome.why)
        if not isinstance(outcome, Ended):
            self.apply_notes(outcome.notes)
        return outcome

    def acquire(
        self, job: str, user: str, timeout: float, started: float | None = None, want: Want = Want()
    ) -> Claimed:
        """Claim a VM for the job, waiting up to timeout seconds (see WaitingAcquire)."""
        return WaitingAcquire(self, want).run(job, user, timeout, started)

    def release(self, job: str, unusable: str = "") -> None:
        actions = self._update(lambda state: plan_release(state, job, self.clock(), unusable, self.config.pool))
        self.apply_notes(actions)

    # -- reconcile --

    def reconcile(self, *, probe_free: bool = True, dry_run: bool = False, quiet: bool = False) -> bool:
        """One pass; returns False when another pass holds the reconcile lock."""
        with reconcile_lock(self.config.pool.state_file) as mine:
            if not mine:
                if not quiet:
                    log.info("another reconcile is running; nothing to do")
                return False
            if not dry_run and (aside := self.store.set_aside_if_corrupt(self.clock())):
                log.error(aside)
            ReconcilePass(self).run(probe_free, dry_run)
            return True

    def admin(self, plan: Callable[..., tuple[PoolState, list[Action]]], **kwargs: Any) -> None:
        """An admin's state change, under the lock, logged with who asked and why."""
        self.apply_notes(self._update(lambda state: plan(state, by=invoking_user(), now=self.clock(), **kwargs)))

    def apply_notes(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Note):
                log.log(action.level, action.message)


class ClaimRate:
    """How fast the queue moves: claims per second between a waiter's looks (None at the first)."""

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None  # (when, claims counted so far) at the last look

    def claimed(self, claims: int, now: float) -> float | None:
        rate = None
        if self.last is not None and now > self.last[0]:
            rate = max(0, claims - self.last[1]) / (now - self.last[0])
        self.last = (now, claims)
        return rate


class WaitingAcquire:
    """One acquire that waits for its VM: looks without the lock, tries with it when a VM may be
    there, runs a pass of its own while boots are due, and gives up at its deadline."""

    def __init__(self, pool: Pool, want: Want = Want()):
        self.pool, self.want = pool, want
        self.config, self.store, self.host = pool.config, pool.store, pool.host
        self.clock, self.monotonic, self.sleep = pool.clock, pool.monotonic, pool.sleep

    def _why_none(self, job: str) -> str:
        state, pool = self.store.read(), self.config.pool
        request = next((request for request in state.requests if request.job == job), None)
        vm_class = request.vm_class if request is not None else ""
        return explain_no_vm(
            state, pool, self.clock(), vm_class or choose_class(state, pool, self.want)[0] or DEFAULT_CLASS
        )

    def run(self, job: str, user: str, timeout: float, started: float | None = None) -> Claimed:
        """Claim a VM for the job, waiting up to timeout seconds (monotonic: a clock step changes nothing)."""
        deadline = self.monotonic() + timeout
        started = self.clock() if started is None else started
        outcome = self._try_claim_by(deadline, job, user, started)
        heartbeat = self.monotonic() + WAITER_HEARTBEAT
        if isinstance(outcome, Waiting):
            log.info(f"job {job}: no free VM, waiting (position {outcome.position + 1}, timeout {timeout:.0f}s)")
        try:
            queue_speed = ClaimRate()
            while isinstance(outcome, Waiting):
                if self.monotonic() >= deadline:
                    outcome = self._try_claim_by(deadline, job, user, started)  # a VM handed over meanwhile?
                    if isinstance(outcome, Waiting):
                        raise NoVmAvailable(f"job {job}: no VM within {timeout:.0f}s: {self._why_none(job)}")
                    break
                mark = self.store.freed_mark()  # before the look: a VM freed meanwhile wakes it early
                to_free, claims = self._look(job)
                refused = self._refused(job)
                if refused is not None:
                    raise refused  # a wrong password or image stays wrong: no point waiting out the timeout
                if to_free == 0 or self.monotonic() >= heartbeat:  # the heartbeat's try prunes dead waiters
                    heartbeat = self.monotonic() + WAITER_HEARTBEAT
                    outcome = self._try_claim_by(deadline, job, user, started)
                if isinstance(outcome, Waiting):
                    rate = queue_speed.claimed(claims, self.monotonic())
                    self._sleep_unless_freed(waiter_sleep(to_free, rate, self.config.pool.acquire_poll), to_free, mark)
        except BaseException:
            with contextlib.suppress(VmpoolError):
                self.pool._update(functools.partial(_without_result, withdraw_request, job=job, now=self.clock()))
            raise
        if isinstance(outcome, Ended):
            raise JobEnded(
                f"job {job}: its epilogue released it at {fmt_time(outcome.at)}, after this attempt "
                f"began at {fmt_time(started)}: the job is over, no VM taken"
            )
        vm = outcome.vm
        held = (
            " (already held: an earlier run of its prologue may have prepared it)"
            if outcome.already_held
            else (f" (handed over when it came Free, at {fmt_time(vm.since)})" if outcome.handed else "")
        )
        log.info(f"{describe_vm(vm)} acquired by job {job} for {user}{held}")
        return outcome

    def _sleep_unless_freed(self, seconds: float, to_free: int, mark: int) -> None:
        """A waiter's sleep between looks, cut short (within an acquire_poll) once `to_free` VMs
        came Free after its look: a waiter far back sleeps long while the queue stands still,
        yet a burst of releases brings it its VM at once, in queue order."""
        poll = self.config.pool.acquire_poll
        end = self.monotonic() + seconds
        while (left := end - self.monotonic()) > 0:
            self.sleep(min(left, poll))
            if vms_freed_since(mark, self.store.freed_mark()) >= to_free:
                return

    def _try_claim_by(self, deadline: float, job: str, user: str, started: float) -> Claimed | Waiting | Ended:
        """try_claim; a state lock still busy after lock_timeout is contention (a few hundred prologues
        at once on a loaded node), not a failure, while the acquire may still wait. A lock wait
        ends by the acquire's deadline (the hook's own timeout follows it), after at least a second."""
        lock_timeout = self.config.pool.lock_timeout
        while True:
            try:
                return self.pool.try_claim(
                    job, user, started, min(lock_timeout, max(deadline - self.monotonic(), 1.0)), self.want
                )
            except LockTimeout as error:
                if self.monotonic() >= deadline:
                    raise
                log.warning(f"job {job}: {error}; trying again until the acquire's timeout")

    def _refused(self, job: str) -> CloudError | None:
        """What the cloud refused for good in the last pass that this job waits on: the listing
        (credentials), or a create of the job's class (its image, flavor, network)."""
        if isinstance(self.pool.list_error, CloudRefused):
            return self.pool.list_error
        if not self.pool.create_refused:
            return None
        try:
            request = next((request for request in self.store.read().requests if request.job == job), None)
        except StateError:
            return None
        return self.pool.create_refused.get(request.vm_class if request is not None else DEFAULT_CLASS)

    def _look(self, job: str) -> tuple[int, int]:
        """A waiter's unlocked look: how many VMs must still come Free before its locked try can
        claim one (0: try now), and the pool's claims so far. It also runs the waiter's own pass
        when one is due and can help."""
        try:
            state = self.store.read()
        except StateError:
            return 0, 0  # the locked try reports it
        last = state.last_pass
        if waiting_pass_may_help(state, self.config.pool) and (
            last is None or self.clock() - last >= self.config.pool.pass_interval
        ):
            try:  # drive boots forward, leaving room between passes for other waiters
                self.pool.reconcile(probe_free=False, quiet=True)
            except LockTimeout as error:
                log.warning(f"job {job}: skipping a waiting pass: {error}")
            with contextlib.suppress(StateError):
                state = self.store.read()
        return (vms_still_to_free(state, job, os.getpid(), self.host, request_alive), state.counters.get("acquires", 0))


class ReconcilePass:
    """One reconcile pass: what the cloud, the batch system and the job records say, the policy's
    decision on it, then the deletes, creates, probes and known_hosts, each step on its own."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.config, self.store, self.host, self.clock = pool.config, pool.store, pool.host, pool.clock
        self.signalled: bool | None = None  # whether the cloud shows this pool waiting on the quota (None: unknown)

    @property
    def cloud(self) -> Cloud:
        return self.pool.cloud

    @property
    def remote(self) -> Remote:
        return self.pool.remote

    @property
    def batch(self) -> Batch:
        return self.pool.batch

    def run(self, probe_free: bool, dry_run: bool) -> None:
        """One pass, under the reconcile lock: observe, decide, then each step of the work."""
        servers, (dead_jobs, unsure_jobs) = self._observe(probe_free, dry_run)
        # Other pools' demand: cron's passes ask (once a minute is soon enough to give way)
        others = self._others_wanting() if probe_free and servers is not None else frozenset()
        snapshot = self.store.read()
        flavors = self._learn_flavors(snapshot) if servers is not None else {}
        limits = self._limits(snapshot) if servers is not None else None

        def decide(state: PoolState) -> tuple[PoolState, list[Action]]:
            seen = Observation(
                servers=servers,
                live_waiters=live_waiters(state),
                host=self.host,
                dead_jobs=dead_jobs,
                unsure_jobs=unsure_jobs,
                probe_free=probe_free,
                records=job_records_to_follow(state, self.config.pool.job_records),
                others_wanting=others,
                listing_complete=getattr(servers, "complete", True),
                limits=limits,
            )
            if flavors:
                state = copy_state(state)
                state.flavors.update(flavors)
            new, actions = plan_reconcile(state, seen, self.config, self.clock())
            new.last_pass = self.clock()
            return new, actions

        if dry_run:
            for action in decide(snapshot)[1]:
                click.echo(describe_action(action))
            return
        actions = self.pool._update(decide)
        self.pool.apply_notes(actions)
        self._step("delete servers", self._delete, [a for a in actions if isinstance(a, DeleteServer)])
        self._step("create servers", self._create, [a for a in actions if isinstance(a, CreateServer)])
        self._step("probe VMs", self._probe, [a for a in actions if isinstance(a, ProbeSsh)])
        self._step("known_hosts", self._sync_known_hosts, [])
        if probe_free and servers is not None:
            self._step("demand signal", self._signal_demand, [])
        if probe_free and self.config.metrics.textfile:  # cron's passes; an acquire's waiting passes stay light
            self._step("metrics", lambda _: write_metrics_file(self.store.read(), self.config, self.clock()), [])

    def _learn_flavors(self, state: PoolState) -> dict[str, dict[str, int]]:
        """The classes' flavors Nova has not described to this pool yet (once each: a flavor is immutable)."""
        learned: dict[str, dict[str, int]] = {}
        for flavor in {vm_class.flavor for vm_class in self.config.pool.vm_classes} - set(state.flavors) - {""}:
            try:
                learned[flavor] = self.cloud.flavor_size(flavor)
            except CloudError as error:
                log.error(f"cannot learn the size of flavor {flavor}: {error}; its class waits")
                continue
            log.info(
                f"flavor {flavor}: {learned[flavor]['vcpus']} vCPUs, {learned[flavor]['ram']} MiB, "
                f"{learned[flavor]['gpus']} GPUs"
            )
        return learned

    def _limits(self, state: PoolState) -> dict[str, int] | None:
        """Nova's absolute limits, asked only when the pool may create (a pass without creates costs no request)."""
        pool = self.config.pool
        undecided = sum(1 for request in state.requests if not request.vm_class)  # classes chosen by this pass
        if sum(1 for vm in state.vms if not vm.deleting and not vm.tainted) >= desired_size(state, pool) + undecided:
            return None
        try:
            return self.cloud.absolute_limits()
        except CloudError as error:
            log.warning(f"cannot read the project's limits: {error}; creating as the pool's own limits allow")
            return None

    def _others_wanting(self) -> frozenset[str]:
        """The other pools of the project whose jobs wait on its quota (none if the cloud cannot say)."""
        try:
            wanting = self.cloud.pools_wanting()
        except CloudError as error:
            log.warning(f"cannot tell whether other pools wait on the project's quota: {error}")
            return frozenset()
        self.signalled = self.config.pool.name in wanting
        others = wanting - {self.config.pool.name}
        if others:
            log.info(
                f"pools {', '.join(sorted(others))} wait on the project's quota: idle VMs above min give way "
                f"after {self.config.pool.give_way_after:.0f}s"
            )
        return others

    def _signal_demand(self, _: object) -> None:
        """Tell the project's other pools whether this pool's jobs wait on its quota (only on a change)."""
        wanting = starved(self.store.read())
        if self.signalled is None or self.signalled == wanting:
            return
        self.cloud.signal_wanting(self.config.pool.name, wanting)
        if wanting:
            log.warning(
                "jobs wait and the project's quota refused a create: asking the project's other pools to give way"
            )
        else:
            log.info("no longer waiting on the project's quota")

    def _sync_known_hosts(self, _: object) -> None:
        """Under the state lock, so a slower pass never writes an older known_hosts over a newer one."""
        with self.store.locked():
            sync_known_hosts(self.store.load(), self.config.ssh)

    def _step(self, what: str, run: Callable[[Any], None], items: Any) -> None:
        """Each step of a pass runs even when an earlier one failed."""
        try:
            run(items)
        except VmpoolError as error:
            log.error(f"reconcile step '{what}' failed: {error}")
        except Exception:
            log.exception(f"reconcile step '{what}' failed unexpectedly")

    def _observe(self, probe_free: bool, dry_run: bool) -> tuple[list[Server] | None, JobAnswers]:
        servers: list[Server] | None = None
        self.pool.list_error, self.pool.create_refused = None, {}
        try:
            servers = self.cloud.list_servers()
            self.pool.list_error_told = ""
        except CloudError as error:
            self.pool.list_error = error
            # an acquire's waiting passes meet the same failure every pass_interval: say it once
            level = logging.DEBUG if str(error) == self.pool.list_error_told else logging.ERROR
            self.pool.list_error_told = str(error)
            log.log(level, f"cannot list servers, skipping cloud decisions this pass: {error}")
            if not dry_run:
                self.pool._update(
                    functools.partial(_without_result, plan_cloud_error, message=str(error), now=self.clock())
                )
        # Asking the batch system is slow: cron's passes do it, an acquire's waiting passes do not
        # (and say so: not asking is no news, it must not restart a lost epilogue's grace).
        return servers, self._ask_jobs() if probe_free else (None, frozenset())

    def _ask_jobs(self) -> JobAnswers:
        """Jobs the batch system says are over, and those it could not answer for (a failure to
        ask is never "over")."""
        jobs = sorted({vm.job for vm in self.store.read().vms if vm.job})
        if not jobs:
            return frozenset(), frozenset()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as executor:
            answers = list(executor.map(self.batch.job_state, jobs))
        for job, answer in zip(jobs, answers, strict=True):
            if answer.startswith(JOB_UNKNOWN):
                log.warning(f"cannot tell whether job {job} lives: {answer[len(JOB_UNKNOWN) :].strip(': ')}")
        return (
            frozenset(job for job, answer in zip(jobs, answers, strict=True) if answer == JOB_GONE),
            frozenset(job for job, answer in zip(jobs, answers, strict=True) if answer.startswith(JOB_UNKNOWN)),
        )

    def _delete(self, deletes: list[DeleteServer]) -> None:
        for action in deletes:
            log.info(f"vm {action.name}: deleting server {action.server_id}: {action.reason}")
            error: CloudError | None = None
            failpoint("before-delete")
            try:
                self.cloud.delete_server(action.server_id)
            except CloudError as caught:
                error = caught
            failpoint("after-delete")
            self.pool.apply_notes(
                self.pool._update(
                    functools.partial(
                        plan_deleted, name=action.name, error=error, now=self.clock(), server_id=action.server_id
                    )
                )
            )

    def _create(self, creates: list[CreateServer]) -> None:
        """Send the creates side by side (a real Nova takes 0.5-2 s per POST), each still between
        its intent record (made by the decision) and its outcome record (made here, as it returns).

        The first goes alone: a cloud that refuses (quota, a bad image) is asked once per pass,
        not once per VM wanted, and the back-off its answer starts stops the rest unsent.
        """
        if not creates:
            return
        from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait

        cloud = self.cloud  # one client, made before the threads share it

        def send(action: CreateServer) -> tuple[str | None, CloudError | None] | None:
            if self.store.read().health_of(action.vm_class).backing_off(self.clock()):
                return None  # the cloud just refused this class: ask no more
            log.info(f"vm {action.name}: creating server")
            server_id: str | None = None
            error: CloudError | None = None
            failpoint("before-create")
            try:
                server_id = cloud.create_server(action.name, action.vm_class)
            except CloudError as caught:
                error = caught
                if isinstance(caught, CloudRefused):
                    self.pool.create_refused[action.vm_class] = caught
            failpoint("after-create")
            return server_id, error

        skipped: list[str] = []
        unexpected: Exception | None = None

        def record(action: CreateServer, future: Future[tuple[str | None, CloudError | None] | None]) -> None:
            nonlocal unexpected
            try:
                outcome = future.result()
            except Exception as bug:  # not the cloud: the intent stays; later passes bind or drop it
                unexpected = unexpected or bug
                return
            if outcome is None:
                skipped.append(action.name)
                return
            server_id, error = outcome
            self.pool.apply_notes(
                self.pool._update(
                    functools.partial(
                        plan_created,
                        name=action.name,
                        server_id=server_id,
                        error=error,
                        pool=self.config.pool,
                        now=self.clock(),
                        vm_class=action.vm_class,
                    )
                )
            )

        # 10 at a time: a burst of creates takes a few POSTs' time, and the API is not flooded
        with ThreadPoolExecutor(max_workers=min(len(creates), 10)) as executor:
            first = executor.submit(send, creates[0])
            wait([first])
            record(creates[0], first)
            sent = {executor.submit(send, action): action for action in creates[1:]}
            for future in as_completed(sent):
                record(sent[future], future)
        if skipped:
            self.pool._update(functools.partial(_without_result, plan_not_created, names=skipped))
            log.info(f"not creating {', '.join(sorted(skipped))}: backing off")
        if unexpected is not None:
            raise unexpected

    def _probe(self, probes: list[ProbeSsh]) -> None:
        if not probes:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(probes), 16)) as executor:  # console reads, first contact only
            pinned = list(executor.map(self._keys_to_pin, probes))
        unpinned = [(action, keys) for action, keys in zip(probes, pinned, strict=True) if keys is None]
        to_probe = [(action, keys) for action, keys in zip(probes, pinned, strict=True) if keys is not None]
        answers = self.remote.probe_all([(action.address, keys) for action, keys in to_probe])
        results = [
            ProbeResult(action.name, False, "no pinned host key (console shows none)", server_id=action.server_id)
            for action, _ in unpinned
        ]
        for (action, keys), result in zip(to_probe, answers, strict=True):
            learned = tuple(keys) if keys and not action.host_keys else result.host_keys
            results.append(dataclasses.replace(result, name=action.name, host_keys=learned, server_id=action.server_id))

        def record(state: PoolState) -> tuple[PoolState, list[Action]]:
            new, notes = plan_probed(state, results, self.clock())
            # known_hosts first: once the state says Free, a prologue may claim the VM and ssh to it
            sync_known_hosts(new, self.config.ssh)
            return new, notes

        self.pool.apply_notes(self.pool._update(record))

    def _keys_to_pin(self, action: ProbeSsh) -> list[str] | None:
        """The host keys to trust for the probe (none: learn on first contact); None: do not probe."""
        keys = list(action.host_keys)
        if not keys:
            keys = self._console_host_keys(action)
            if not keys and not action.first_contact:
                # Learning a key is only safe right after boot; later it would trust whoever answers.
                return None
        return keys

    def _console_host_keys(self, action: ProbeSsh) -> list[str]:
        try:
            return host_keys_from_console(self.cloud.console_output(action.server_id))
        except CloudError as error:
            log.info(f"vm {action.name}: no console output ({error})")
            return []


def _without_result(plan: Callable[..., PoolState], state: PoolState, **kwargs: Any) -> tuple[PoolState, None]:
    """Adapt a plan that only returns a state to StateStore.update."""
    return plan(state, **kwargs), None


def _proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name ([0] is the state), or [] if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_start(pid: int) -> int:
    """When the process started, in clock ticks after boot (0 if unknown): a pid and this identify it."""
    fields = _proc_stat(pid)
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else 0


def live_waiters(state: PoolState) -> frozenset[tuple[int, int]]:
    """Which waiting acquire processes on this host still exist, as (pid, start time): zombies count
    as dead, and so does a pid now another process's, even another waiter's."""
    return frozenset(waiter_of(request) for request in (*state.requests, *state.handed) if request_alive(request))


def request_alive(request: Request) -> bool:
    """Does the acquire process of this (this host's) request still run?"""
    fields = _proc_stat(request.pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    started = int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else 0
    return not (request.pid_start and started != request.pid_start)  # else the pid is another process's


def job_records_to_follow(state: PoolState, directory: str) -> list[JobRecord]:
    """The hooks' records of jobs that the state shows neither holding a VM nor ended: none while
    the two agree, which costs one directory listing (acquire's fast path runs this)."""
    try:
        names = os.listdir(directory) if directory else []
    except OSError:
        return []
    if not names:
        return []
    explained = {vm.job for vm in state.vms if vm.job} | state.ended_jobs.keys()
    records = (read_job_record(directory, name) for name in names if name not in explained and JOB_ID_RE.match(name))
    return [record for record in records if record is not None]


def read_job_record(directory: str, job: str) -> JobRecord | None:
    """A job's record as the hooks wrote it (root.env, root_known_hosts); None if there is none, or
    if it is not root's alone (only root's own files are evidence of what root's hooks did)."""
    values: dict[str, str] = {}
    keys: list[str] = []
    for name in ("root.env", "root_known_hosts"):
        try:
            fd = os.open(os.path.join(directory, job, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            if name == "root.env":
                return None
            continue
        with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
            info = os.fstat(handle.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                return None
            lines = handle.read().splitlines()
        if name == "root.env":
            values = dict(line.split("=", 1) for line in lines if "=" in line)
        else:
            keys = [" ".join(line.split()[1:3]) for line in lines if len(line.split()) >= 3]
    if not values.get("SERVER_ID") or not values.get("VM_NAME"):
        return None
    return JobRecord(
        job=job,
        vm_name=values["VM_NAME"],
        server_id=values["SERVER_ID"],
        user=values.get("JOB_USER", ""),
        host_keys=tuple(keys),
    )


def invoking_user() -> str:
    """Who ran the command: the admin behind sudo, else this process's user."""
    import pwd

    if os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def read_boot_clock() -> tuple[str, float]:
    """This boot's id and the seconds since it (CLOCK_BOOTTIME: never stepped, counts suspend)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot_id = handle.read().strip()
    except OSError:
        boot_id = ""
    return boot_id, time.clock_gettime(time.CLOCK_BOOTTIME)


# --- monitoring: the Nagios/Icinga plugin and Prometheus metrics ---
# nagiosplugin and prometheus_client are imported only here, in `check`, `metrics` and the metrics
# step of cron's reconcile pass: never on the acquire/release path.

COUNTERS = {
    "boots": "Servers the cloud accepted to create",
    "failed_boots": "Boots that failed (ERROR, BUILD or no SSH past their timeout, failed creates)",
    "deletes": "Server deletes the cloud accepted",
    "acquires": "VMs claimed by jobs",
    "releases": "VMs released by jobs",
    "tainted_releases": "Releases that left the VM tainted (never reused)",
}
# Every metric name vmpool exports (a histogram adds _bucket, _sum and _count; a counter _total).
METRIC_NAMES = (
    "vmpool_vms",
    "vmpool_vms_drained",
    "vmpool_waiting_jobs",
    "vmpool_oldest_wait_seconds",
    "vmpool_desired_vms",
    "vmpool_max_vms",
    "vmpool_min_vms",
    "vmpool_protected_mode",
    "vmpool_consecutive_failed_boots",
    "vmpool_backoff_seconds",
    "vmpool_paused",
    "vmpool_waiting_on_quota",
    "vmpool_last_reconcile_timestamp_seconds",
    "vmpool_acquire_wait_seconds",
    "vmpool_class_vms",
    "vmpool_class_waiting_jobs",
    "vmpool_class_desired_vms",
    "vmpool_class_protected_mode",
    "vmpool_class_backoff_seconds",
    *(f"vmpool_{name}_total" for name in COUNTERS),
)


def metric_families(state: PoolState, config: Config, now: float) -> list[Any]:
    """The pool as Prometheus metric families (built fresh from the state on each call)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    pool, health, name = config.pool, pool_health(state, config.pool, now), config.pool.name
    vms = GaugeMetricFamily("vmpool_vms", "VMs per state and reason", labels=["pool", "state", "reason"])
    by_kind: dict[tuple[str, str], int] = {(FREE, ""): 0, (BUSY, ""): 0, (UNUSABLE, ""): 0}
    for vm in state.vms:
        key = (vm.state, reason_kind(vm))
        by_kind[key] = by_kind.get(key, 0) + 1
    for (vm_state, kind), count in sorted(by_kind.items()):
        vms.add_metric([name, vm_state, kind], count)
    families: list[Any] = [vms]

    def gauge(metric: str, help_text: str, value: float) -> None:
        family = GaugeMetricFamily(metric, help_text, labels=["pool"])
        family.add_metric([name], value)
        families.append(family)

    gauge("vmpool_vms_drained", "VMs drained by an admin (no new job; deleted once free)", health.drained)
    gauge("vmpool_waiting_jobs", "Jobs waiting in acquire for a VM", health.waiting)
    gauge("vmpool_oldest_wait_seconds", "How long the longest-waiting job has waited", health.oldest_wait)
    gauge("vmpool_desired_vms", "VMs the pool aims at: clamp(busy + waiting + min_free, min, max)", health.desired)
    gauge("vmpool_max_vms", "[pool] max", pool.max)
    gauge("vmpool_min_vms", "[pool] min", pool.min)
    gauge("vmpool_protected_mode", "1 while in protected mode (one canary boot at a time)", int(health.protected))
    gauge(
        "vmpool_consecutive_failed_boots",
        "Failed boots since the last good one (the class with the most)",
        state.worst_health().boot_failures,
    )
    gauge("vmpool_backoff_seconds", "Seconds of create back-off left", health.backoff)
    gauge("vmpool_paused", "1 while an admin paused creates", int(health.paused))
    gauge(
        "vmpool_waiting_on_quota",
        "1 while jobs wait and the project's quota refused a create (the other pools are asked to give way)",
        int(starved(state)),
    )
    gauge(
        "vmpool_last_reconcile_timestamp_seconds",
        "When a reconcile pass last saw the cloud (0: never)",
        state.last_reconcile or 0,
    )
    families += class_metric_families(state, pool, now)
    for counter, help_text in COUNTERS.items():
        family = CounterMetricFamily(f"vmpool_{counter}", help_text, labels=["pool"])
        family.add_metric([name], state.counters.get(counter, 0))
        families.append(family)
    histogram = state.acquire_wait
    counts = histogram.get("buckets") or [0] * (len(ACQUIRE_WAIT_BUCKETS) + 1)
    cumulative, buckets = 0, []
    for bound, count in zip([*(str(bound) for bound in ACQUIRE_WAIT_BUCKETS), "+Inf"], counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    waits = HistogramMetricFamily("vmpool_acquire_wait_seconds", "How long acquire waited for a VM", labels=["pool"])
    waits.add_metric([name], buckets, sum_value=histogram.get("sum", 0.0))
    families.append(waits)
    return families


def class_metric_families(state: PoolState, pool: PoolConfig, now: float) -> list[Any]:
    """Per class: its VMs by state, the jobs waiting for it, the VMs it aims at, its protected
    mode and back-off."""
    from prometheus_client.core import GaugeMetricFamily

    def per_class(metric: str, help_text: str) -> Any:
        return GaugeMetricFamily(metric, help_text, labels=["pool", "class"])

    vms = GaugeMetricFamily("vmpool_class_vms", "VMs of each class per state", labels=["pool", "class", "state"])
    waiting = per_class("vmpool_class_waiting_jobs", "Jobs waiting for a VM of the class")
    desired = per_class(
        "vmpool_class_desired_vms", "VMs the class aims at: its busy + waiting + min_free, within its min and max"
    )
    protected = per_class("vmpool_class_protected_mode", "1 while the class is in protected mode (its boots fail)")
    backoff = per_class("vmpool_class_backoff_seconds", "Seconds of the class's create back-off left")
    for entry in classes_json(state, pool):
        name = entry["name"]
        for vm_state, count in entry["counts"].items():
            vms.add_metric([pool.name, name, str(vm_state)], count)
        waiting.add_metric([pool.name, name], entry["waiting"])
        desired.add_metric([pool.name, name], entry["desired"])
        protected.add_metric([pool.name, name], int(entry["protected_since"] is not None))
        backoff.add_metric([pool.name, name], max(0.0, (entry["backoff_until"] or now) - now))
    return [vms, waiting, desired, protected, backoff]


def metrics_registry(state: PoolState, config: Config, now: float) -> Any:
    from prometheus_client import CollectorRegistry

    class PoolCollector:
        def collect(self) -> list[Any]:
            return metric_families(state, config, now)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector())
    return registry


def metrics_text(state: PoolState, config: Config, now: float) -> str:
    from prometheus_client import generate_latest

    return str(generate_latest(metrics_registry(state, config, now)).decode("utf-8"))


def write_metrics_file(state: PoolState, config: Config, now: float) -> None:
    """Replace the textfile collector's file whole (prometheus_client writes a temp file and renames it)."""
    from prometheus_client import write_to_textfile

    try:
        write_to_textfile(config.metrics.textfile, metrics_registry(state, config, now))
    except OSError as error:
        raise ConfigError(f"[metrics] textfile = {config.metrics.textfile!r}: cannot write: {error}") from None


def run_check(
    state_of: Callable[[], PoolState],
    config: Config,
    now: Callable[[], float],
    thresholds: CheckConfig,
    output_problems: Sequence[tuple[str, str]] = (),
) -> None:
    """`vmpool check` as a Nagios/Icinga plugin; nagiosplugin prints the result and exits 0-3.
    A log, syslog or metrics output that cannot work (`setup_outputs`) is a WARNING."""
    import nagiosplugin

    def pool_wide(context: str) -> str:
        """With classes, each class's oldest wait and protected mode are judged by its own context
        (a GPU job may be expected to wait longer); the pool's figures are then perfdata alone."""
        return "count" if config.pool.classes else context

    class PoolResource(nagiosplugin.Resource):
        name = "VMPOOL"

        def probe(self) -> list[nagiosplugin.Metric]:
            state, at = state_of(), now()
            health = pool_health(state, config.pool, at)
            since = health.since_reconcile
            return [
                nagiosplugin.Metric("free", health.free, min=0, context="count"),
                nagiosplugin.Metric("busy", health.busy, min=0, context="count"),
                nagiosplugin.Metric("unusable", health.unusable, min=0, context="unusable"),
                nagiosplugin.Metric("waiting", health.waiting, min=0, context="count"),
                nagiosplugin.Metric(
                    "oldest_wait", round(health.oldest_wait), "s", min=0, context=pool_wide("oldest_wait")
                ),
                *self.per_class(state, at),
                # never reconciled: reported as -1 and judged by its own context
                nagiosplugin.Metric(
                    "since_reconcile", -1 if since is None else round(since), "s", context="since_reconcile"
                ),
                nagiosplugin.Metric("backoff", round(health.backoff), "s", min=0, context="count"),
                nagiosplugin.Metric("protected", int(health.protected), min=0, max=1, context=pool_wide("protected")),
                nagiosplugin.Metric("paused", int(health.paused), min=0, max=1, context="paused"),
                nagiosplugin.Metric("outputs", len(output_problems), context="outputs"),
            ]

        @staticmethod
        def per_class(state: PoolState, at: float) -> list[nagiosplugin.Metric]:
            """Each class's waiting jobs, oldest wait and protected mode, judged by its own contexts."""
            metrics = []
            for name in (vm_class.name for vm_class in config.pool.classes):
                oldest = min((request.since for request in state.requests if request.vm_class == name), default=at)
                protected = state.health_of(name).protected_since is not None
                metrics += [
                    nagiosplugin.Metric(
                        f"waiting_{name}", sum(r.vm_class == name for r in state.requests), min=0, context="count"
                    ),
                    nagiosplugin.Metric(
                        f"oldest_wait_{name}", round(max(0.0, at - oldest)), "s", min=0, context=f"oldest_wait/{name}"
                    ),
                    nagiosplugin.Metric(f"protected_{name}", int(protected), min=0, max=1, context=f"protected/{name}"),
                ]
            return metrics

    class SinceReconcile(nagiosplugin.ScalarContext):
        def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
            if metric.value < 0:
                return self.result_cls(nagiosplugin.Critical, "no reconcile pass has seen the cloud yet", metric)
            return super().evaluate(metric, resource)

    class Outputs(nagiosplugin.Context):  # no perfdata: the count of broken outputs is no measurement
        def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
            if not metric.value:
                return self.result_cls(nagiosplugin.Ok, None, metric)
            return self.result_cls(
                nagiosplugin.Warn, "; ".join(f"{setting}: {problem}" for setting, problem in output_problems), metric
            )

    def switch(level: str) -> str | None:  # a 0/1 metric: alert when it is 1
        return None if level == "ok" else "0:0"

    class Words(nagiosplugin.Summary):
        def ok(self, results: Any) -> str:
            values = {result.metric.name: result.metric.value for result in results}
            return (
                f"{values['free']} free, {values['busy']} busy, {values['unusable']} unusable, "
                f"{values['waiting']} waiting; last reconcile {values['since_reconcile']}s ago"
            )

        def problem(self, results: Any) -> str:
            return "; ".join(self.describe(result) for result in results.most_significant)

        def describe(self, result: Any) -> str:
            metric, value = result.metric.name, result.metric.value
            if result.hint and (metric == "outputs" or (metric == "since_reconcile" and value < 0)):
                return str(result.hint)
            kind, _, vm_class = result.metric.context.partition("/")  # a class's own: "oldest_wait/gpu"
            of_class = f" of class {vm_class}" if vm_class else ""
            words = {
                "since_reconcile": f"no reconcile pass for {value}s",
                "oldest_wait": f"a job has waited {value}s for a VM{of_class}",
                "unusable": f"{value} VM(s) unusable",
                "protected": f"protected mode{of_class}: boots keep failing",
                "paused": "paused by an admin (vmpool resume)",
            }
            limit = f" (threshold {result.hint.split('range ')[-1].rstrip(')')})" if result.hint else ""
            return words.get(kind, str(result)) + (limit if kind not in ("protected", "paused") else "")

    check = nagiosplugin.Check(
        PoolResource(),
        nagiosplugin.ScalarContext("count"),
        nagiosplugin.ScalarContext(
            "unusable", thresholds.unusable_warning or None, thresholds.unusable_critical or None
        ),
        nagiosplugin.ScalarContext("oldest_wait", thresholds.wait_warning or None, thresholds.wait_critical or None),
        SinceReconcile("since_reconcile", thresholds.reconcile_warning or None, thresholds.reconcile_critical or None),
        nagiosplugin.ScalarContext("protected", *_levels(thresholds.protected, switch)),
        nagiosplugin.ScalarContext("paused", *_levels(thresholds.paused, switch)),
        *(
            context
            for vm_class in config.pool.classes
            for context in (
                nagiosplugin.ScalarContext(
                    f"oldest_wait/{vm_class.name}",
                    vm_class.check_wait_warning or thresholds.wait_warning or None,
                    vm_class.check_wait_critical or thresholds.wait_critical or None,
                ),
                nagiosplugin.ScalarContext(f"protected/{vm_class.name}", *_levels(thresholds.protected, switch)),
            )
        ),
        Outputs("outputs"),
        Words(),
    )
    try:
        check.main(timeout=thresholds.timeout)
    except nagiosplugin.Timeout:
        raise VmpoolError(
            f"no answer within the plugin timeout ({thresholds.timeout:g}s) while reading {config.pool.state_file}"
        ) from None


def _levels(level: str, switch: Callable[[str], str | None]) -> tuple[str | None, str | None]:
    """(warning, critical) ranges of a 0/1 metric that alerts at the given level."""
    return (switch(level) if level == "warning" else None, switch(level) if level == "critical" else None)


# --- the replay (vmpool simulate) ---
# A site's job log replayed through the pool's own decisions, to see the waits and the cloud bill of
# a [pool] setting before running it for a month. The clock, the cloud, SSH and the batch system
# are simulated; every decision is the policy's (the plan_* functions above): Replay calls them in
# the order Pool does (a change, then the hand-over of what it freed; a pass: list, decide, delete,
# create the first alone, probe), on a state in memory. What it leaves out is in docs/simulate.md.

SIM_HOST = "simulated"  # the node the replay's acquires run on
SWF_FIELDS = (
    "job number",
    "submit time",
    "wait time",
    "run time",
    "allocated processors",
    "average cpu time",
    "used memory",
    "requested processors",
    "requested time",
    "requested memory",
    "status",
    "user id",
    "group id",
    "executable number",
    "queue number",
    "partition number",
    "preceding job number",
    "think time",
)
CSV_COLUMNS = {  # a column's accepted names (sacct's among them) -> the field it fills
    "job": "job",
    "jobid": "job",
    "submit": "submit",
    "submit_time": "submit",
    "run": "run",
    "elapsed": "run",
    "run_time": "run",
    "runtime": "run",
    "cores": "cores",
    "alloccpus": "cores",
    "ncpus": "cores",
    "processors": "cores",
    "memory": "memory",
    "reqmem": "memory",
    "mem": "memory",
    "user": "user",
}
MEMORY_UNITS = {"k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024}  # -> MiB


# The replay's records are plain classes, not dataclasses: every command imports this file, and a
# dataclass is made (its methods generated and compiled) at each start; acquire and release must
# not pay for what only `vmpool simulate` uses.


class _Record:
    """Equality and repr by the record's slots, for the replay's plain records."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Record) and type(other) is type(self) and self._values() == other._values()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class LoggedJob(_Record):
    """One job of a site's log: what the replay needs, and what VM classes will (cores, memory)."""

    __slots__ = ("cores", "job", "memory", "run", "submit", "user")

    def __init__(self, job: str, submit: float, run: float, cores: int = 1, memory: float = 0.0, user: str = ""):
        self.job = job
        self.submit = submit  # seconds
        self.run = run  # seconds it held its node
        self.cores = cores
        self.memory = memory  # MiB for the whole job, 0 = unknown
        self.user = user


class JobLog(_Record):
    __slots__ = ("jobs", "skipped")

    def __init__(self, jobs: list[LoggedJob], skipped: int = 0):
        self.jobs = jobs
        self.skipped = skipped  # jobs whose run time the log does not know


def read_job_log(path: str, kind: str = "auto") -> JobLog:
    """A job log in the Standard Workload Format (SWF) or a CSV with a header; a bad line is a
    BadInput naming the file, the line and the field."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: cannot read the job log: {error}") from None
    if kind == "auto":
        first = next((line.strip() for line in lines if line.strip() and not line.lstrip().startswith(";")), "")
        kind = "swf" if path.endswith(".swf") or first[:1].isdigit() or first[:1] == "-" else "csv"
    log_ = _swf_jobs(path, lines) if kind == "swf" else _csv_jobs(path, lines)
    seen: dict[str, int] = {}
    for index, job in enumerate(log_.jobs):
        if job.job in seen:
            raise BadInput(
                f"{path}: job {job.job} appears twice (jobs {seen[job.job] + 1} and {index + 1} "
                "of the log): each job needs its own id"
            )
        seen[job.job] = index
    log_.jobs.sort(key=lambda job: job.submit)
    if not log_.jobs:
        raise BadInput(f"{path}: no job to replay in the log")
    return log_


def _number(path: str, line: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadInput(f"{path}:{line}: {name} = {text!r}: not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadInput(f"{path}:{line}: {name} = {text!r}: not a number")
    return value


def _swf_jobs(path: str, lines: list[str]) -> JobLog:
    jobs, skipped = [], 0
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith(";"):
            continue
        if len(fields) != len(SWF_FIELDS):
            raise BadInput(
                f"{path}:{number}: {len(fields)} fields, an SWF line has {len(SWF_FIELDS)} "
                f"({', '.join(SWF_FIELDS[:4])}, ...)"
            )
        values = [
            _number(path, number, f"field {index} ({name})", text)
            for index, (name, text) in enumerate(zip(SWF_FIELDS, fields, strict=True), 1)
        ]
        if values[1] < 0:
            raise BadInput(f"{path}:{number}: field 2 (submit time) = {fields[1]}: a job needs its submit time")
        if values[3] < 0:
            skipped += 1  # -1: unknown (a job cancelled before it ran)
            continue
        cores = int(values[4] if values[4] > 0 else values[7] if values[7] > 0 else 1)
        per_core = values[9] if values[9] > 0 else values[6] if values[6] > 0 else 0.0  # KiB per processor
        jobs.append(
            LoggedJob(
                job=fields[0],
                submit=values[1],
                run=values[3],
                cores=cores,
                memory=per_core * cores / 1024,
                user="" if values[11] < 0 else f"u{fields[11]}",
            )
        )
    return JobLog(jobs, skipped)


def _csv_jobs(path: str, lines: list[str]) -> JobLog:
    import csv

    header_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_at is None:
        raise BadInput(f"{path}: no job to replay in the log")
    header = lines[header_at]
    delimiter = "|" if "|" in header and "," not in header else ","
    names = [CSV_COLUMNS.get(name.strip().lower(), "") for name in header.split(delimiter)]
    missing = [name for name in ("submit", "run") if name not in names]
    if missing:
        raise BadInput(
            f"{path}:{header_at + 1}: the header names no {' and no '.join(missing)} column "
            "(a CSV job log has submit,run[,cores,memory,user,job])"
        )
    jobs, skipped = [], 0
    for number, row in enumerate(csv.reader(lines[header_at + 1 :], delimiter=delimiter), header_at + 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(names):
            raise BadInput(f"{path}:{number}: {len(row)} columns, the header names {len(names)}")
        values = {name: text.strip() for name, text in zip(names, row, strict=True) if name}
        run = _duration(path, number, values["run"])
        if run is None:
            skipped += 1
            continue
        cores = int(_number(path, number, "cores", values["cores"])) if values.get("cores") else 1
        jobs.append(
            LoggedJob(
                job=values.get("job") or f"line{number}",
                submit=_instant(path, number, values["submit"]),
                run=run,
                cores=max(cores, 1),
                memory=_mebibytes(path, number, values.get("memory", ""), max(cores, 1)),
                user=values.get("user", ""),
            )
        )
    return JobLog(jobs, skipped)


def _duration(path: str, line: int, text: str) -> float | None:
    """Seconds, or [D-]HH:MM:SS (sacct's Elapsed, Torque's walltime); None: unknown."""
    if text.lower() in ("", "-1", "unknown", "none"):
        return None
    days, _, clock = text.rpartition("-") if ":" in text else ("", "", text)
    if ":" not in clock:
        seconds = _number(path, line, "run", text)
        return None if seconds < 0 else seconds
    parts = clock.split(":")
    if len(parts) > 3 or not all(part.isdigit() for part in parts) or (days and not days.isdigit()):
        raise BadInput(f"{path}:{line}: run = {text!r}: expected seconds or [D-]HH:MM:SS")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


def _instant(path: str, line: int, text: str) -> float:
    """Seconds (since the epoch or the log's start), or an ISO 8601 date and time (sacct's Submit)."""
    try:
        return float(text)
    except ValueError:
        pass
    import datetime

    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(
            f"{path}:{line}: submit = {text!r}: expected seconds or a date like 2024-03-01T09:30:00"
        ) from None
    return moment.replace(tzinfo=moment.tzinfo or datetime.UTC).timestamp()


def _mebibytes(path: str, line: int, text: str, cores: int) -> float:
    """MiB for the whole job from a number (MiB) or sacct's ReqMem (4000M, 4Gc: per core, 4Gn: per node)."""
    if not text or text == "0":
        return 0.0
    match = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)i?b?([cn]?)", text.lower())
    if not match:
        raise BadInput(f"{path}:{line}: memory = {text!r}: expected MiB or a size like 4000M, 4G, 2Gc")
    amount = _number(path, line, "memory", match[1]) * MEMORY_UNITS[match[2] or "m"]
    return amount * cores if match[3] == "c" else amount


class SimCloudSettings(_Record):
    __slots__ = ("boot_failures", "boot_time", "quota", "seed")

    def __init__(self, boot_time: float = 60.0, boot_failures: float = 0.0, quota: int = 0, seed: int = 1):
        self.boot_time = boot_time  # create -> ACTIVE and answering SSH
        self.boot_failures = boot_failures  # the share of boots that end in ERROR instead
        self.quota = quota  # servers the project may hold (0: no limit below max)
        self.seed = seed

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class SimCloud:
    """The cloud as the replay's clock sees it: a server is BUILD for boot_time, then ACTIVE (or
    ERROR, for the share of boots that fail); a delete takes it away at once."""

    def __init__(self, settings: SimCloudSettings, clock: Callable[[], float]):
        import random

        self.settings = settings
        self.clock = clock
        self.random = random.Random(settings.seed)
        self.servers: dict[str, tuple[str, float, bool]] = {}  # id -> (name, ready at, fails)
        self.serial = 0

    def list_servers(self) -> list[Server]:
        now = self.clock()
        return [
            Server(
                id=server_id,
                name=name,
                vm_name=name,
                address=f"sim-{server_id}",
                created_at=ready - (self.settings.boot_time),
                status=SERVER_BUILDING if now < ready else SERVER_ERROR if fails else SERVER_ACTIVE,
                fault="simulated boot failure" if fails else "",
            )
            for server_id, (name, ready, fails) in self.servers.items()
        ]

    def create_server(self, name: str) -> str:
        if self.settings.quota and len(self.servers) >= self.settings.quota:
            raise QuotaExceeded(f"quota exceeded: {len(self.servers)} of {self.settings.quota} servers (simulated)")
        self.serial += 1
        server_id = f"s{self.serial}"
        fails = self.random.random() < self.settings.boot_failures
        self.servers[server_id] = (name, self.clock() + self.settings.boot_time, fails)
        return server_id

    def delete_server(self, server_id: str) -> None:
        if self.servers.pop(server_id, None) is None:
            raise ServerGone(f"server {server_id} not found (simulated)")

    def next_change(self) -> float | None:
        """When a server's status changes next (a boot ends), if ever."""
        now = self.clock()
        return min((ready for _, ready, _ in self.servers.values() if ready > now), default=None)


class ReplayedJob(_Record):
    __slots__ = ("claimed", "job", "started", "vm")

    def __init__(self, job: LoggedJob):
        self.job = job
        self.started: float | None = None  # its prologue began (a slot on the pool's node was free)
        self.claimed: float | None = None
        self.vm = ""


class Usage(_Record):
    """Seconds x VMs, by what the VMs were doing (integrated over the replay's clock)."""

    __slots__ = ("booting", "busy", "cloud", "free")

    def __init__(self, cloud: float = 0.0, busy: float = 0.0, free: float = 0.0, booting: float = 0.0):
        self.cloud = cloud  # servers that exist (what the cloud bills)
        self.busy = busy
        self.free = free
        self.booting = booting

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


END, SUBMIT, CRON, PASS = range(4)  # the order of a replay's events that fall on the same second


class Replay:
    """Replays a job log through the policy: Pool's order of calls on an in-memory state, with a
    simulated clock, cloud (SimCloud), SSH (always answers) and batch system (first come first
    served, one job per VM, at most `max` jobs at once on the pool's node, as its np or CPUs say).

    Cron's pass runs every reconcile_every seconds; a waiting acquire's, pass_interval after the
    last pass. A pass that found nothing to do makes the passes after it no-ops until something
    changes (a release, an acquire, a boot ending, a timeout or back-off running out): those are
    skipped, only stamped (every_pass=True runs them all, to show it changes nothing).
    """

    def __init__(
        self,
        jobs: Sequence[LoggedJob],
        config: Config,
        cloud: SimCloudSettings,
        *,
        prepare_time: float = 0.0,
        reconcile_every: float = 60.0,
        every_pass: bool = False,
        samples: bool = False,
    ):
        self.config, self.pool = config, config.pool
        self.prepare_time, self.reconcile_every, self.every_pass = prepare_time, reconcile_every, every_pass
        self.now = jobs[0].submit if jobs else 0.0
        self.cloud = SimCloud(cloud, lambda: self.now)
        self.state = PoolState(pool=config.pool.name)
        self.jobs = {job.job: ReplayedJob(job) for job in jobs}
        self.pids = {job.job: index for index, job in enumerate(jobs, 1)}
        import heapq
        from collections import deque

        self.push, self.pop = heapq.heappush, heapq.heappop
        self.events: list[tuple[float, int, int, Any]] = []
        self.sequence = 0
        self.queue: deque[str] = deque()  # submitted, waiting for a slot on the node
        self.running = 0  # jobs in their prologue or running (the node's slots taken)
        self.waiting: set[str] = set()  # jobs in acquire, waiting for a VM
        self.pass_at: tuple[float, int] | None = None  # the waiting pass to come: (when, token)
        self.quiet_until: tuple[float, float] | None = None  # passes are no-ops before (these, after these)
        self.usage = Usage()
        self.peak = 0
        self.left = len(jobs)
        # (when, what, vm, job or reason): acquire and release (the hooks' calls), create, claim, delete
        self.trace: list[tuple[float, str, str, str]] = []
        self.samples: list[tuple[float, int, int, int]] | None = [] if samples else None

    def run(self) -> Replay:
        for job in self.jobs.values():
            self._at(job.job.submit, SUBMIT, job.job.job)
        self._at(self.now, CRON, None)
        while self.events and self.left:
            when, kind, _, item = self.pop(self.events)
            self._advance(when)
            if kind == END:
                self._end(item)
            elif kind == SUBMIT:
                self.queue.append(item)
                self._start_prologues()
            elif kind == CRON:
                self._reconcile(probe_free=True)
                self._at(when + self.reconcile_every, CRON, None)
            elif self.pass_at is not None and item == self.pass_at[1]:
                self.pass_at = None
                if self.waiting and waiting_pass_may_help(self.state, self.pool):
                    self._reconcile(probe_free=False)
        return self

    def _at(self, when: float, kind: int, item: Any) -> None:
        self.sequence += 1
        self.push(self.events, (when, kind, self.sequence, item))

    def _advance(self, when: float) -> None:
        """Move the clock, counting what the VMs did meanwhile."""
        elapsed = when - self.now
        if elapsed <= 0:
            return
        busy = free = booting = 0
        for vm in self.state.vms:
            if vm.state == BUSY:
                busy += 1
            elif vm.state == FREE:
                free += 1
            elif vm.server_id is not None and vm.booting:
                booting += 1
        usage = self.usage
        usage.cloud += elapsed * len(self.cloud.servers)
        usage.busy += elapsed * busy
        usage.free += elapsed * free
        usage.booting += elapsed * booting
        if self.samples is not None:
            self.samples.append((self.now, busy, free, booting))
        self.now = when

    # -- the batch system and the hooks --

    def _start_prologues(self) -> None:
        while self.queue and self.running < self.pool.max:
            job = self.queue.popleft()
            self.running += 1
            self.jobs[job].started = self.now
            self.trace.append((self.now, "acquire", "", job))
            self._acquire(job)

    def _acquire(self, job: str) -> None:
        """The prologue's `vmpool acquire` (Pool.try_claim), or a waiter taking the VM handed to it."""
        user = self.jobs[job].job.user
        outcome = self._update(
            lambda state: plan_acquire(
                state, job, user, self.now, self.pids[job], SIM_HOST, self._live_waiters(), started=self.now
            )
        )
        if isinstance(outcome, Claimed):
            self.waiting.discard(job)
            replayed = self.jobs[job]
            replayed.claimed, replayed.vm = self.now, outcome.vm.name
            self.trace.append((self.now, "claim", outcome.vm.name, job))
            self._at(self.now + self.prepare_time + replayed.job.run, END, job)
        elif isinstance(outcome, Waiting) and job not in self.waiting:
            self.waiting.add(job)
            self._schedule_pass()

    def _end(self, job: str) -> None:
        """The epilogue's `vmpool release` (Pool.release); the node's slot goes to the next job."""
        self.trace.append((self.now, "release", self.jobs[job].vm, job))
        self._update(lambda state: plan_release(state, job, self.now))
        # The pool remembers the last releases to refuse a prologue that wakes after its job's
        # epilogue; no replayed job comes back, and copying that memory would be most of the work.
        self.state.ended_jobs.clear()
        self.running -= 1
        self.left -= 1
        self._start_prologues()

    def _live_waiters(self) -> frozenset[tuple[int, int]]:
        return frozenset((self.pids[job], 0) for job in self.waiting)

    def _update(self, change: Callable[[PoolState], tuple[PoolState, Any]]) -> Any:
        """Pool._update in memory: the change, then the VMs it freed handed to the queue's head,
        whose waiters take them at once."""
        before = self.state
        new, result = change(before)
        if newly_free(before, new):
            new, _ = plan_hand_over(new, self.now, SIM_HOST, lambda request: True)
        self.state = new
        self.quiet_until = None
        for request in list(new.handed):
            if request.job in self.waiting:  # not taken yet (by a change this one led to)
                self._acquire(request.job)
        self._schedule_pass()
        return result

    # -- reconcile passes: cron's, and those of waiting acquires --

    def _schedule_pass(self) -> None:
        """A waiting acquire runs a pass once pass_interval has gone by since the last pass."""
        if not self.waiting:
            return
        last = self.state.last_pass
        due = self.now if last is None else max(self.now, last + self.pool.pass_interval)
        if self.pass_at is None or self.pass_at[0] != due:
            self.sequence += 1
            self.pass_at = (due, self.sequence)
            self._at(due, PASS, self.sequence)

    def _reconcile(self, probe_free: bool) -> None:
        """Pool._reconcile_locked: list, decide, then delete, create (the first alone) and probe."""
        if (
            self.quiet_until is not None
            and not self.every_pass
            and (self.now < self.quiet_until[0] and self.now <= self.quiet_until[1])
        ):
            self.state.last_pass = self.state.last_reconcile = self.now  # all such a pass would change
            self._schedule_pass()
            return
        seen = Observation(
            servers=self.cloud.list_servers(),
            live_waiters=self._live_waiters(),
            host=SIM_HOST,
            dead_jobs=frozenset() if probe_free else None,
            probe_free=probe_free,
        )
        before = self.state

        def decide(state: PoolState) -> tuple[PoolState, list[Action]]:
            new, actions = plan_reconcile(state, seen, self.config, self.now)
            new.last_pass = self.now
            return new, actions

        actions: list[Action] = self._update(decide)
        decided = [action for action in actions if not isinstance(action, Note)]
        quiet = (
            all(isinstance(action, ProbeSsh) and self._healthy_free(before, action.name) for action in decided)
            and dataclasses.replace(self.state, last_pass=before.last_pass, last_reconcile=before.last_reconcile)
            == before
        )
        for action in decided:
            if isinstance(action, DeleteServer):
                self._delete(action)
        self._create([action for action in decided if isinstance(action, CreateServer)])
        probes = [action for action in decided if isinstance(action, ProbeSsh)]
        if probes:  # SSH always answers; the console's keys are pinned at first contact
            results = [
                ProbeResult(
                    probe.name, True, host_keys=probe.host_keys or ("ssh-ed25519 simulated",), server_id=probe.server_id
                )
                for probe in probes
            ]
            self._update(lambda state: plan_probed(state, results, self.now))
        if quiet:
            self.quiet_until = self._next_change()

    @staticmethod
    def _healthy_free(state: PoolState, name: str) -> bool:
        """Probing it changes nothing but its last_healthy (a Free VM that answered before)."""
        vm = state.vm_named(name)
        return vm is not None and vm.state == FREE and vm.last_healthy is not None

    def _next_change(self) -> tuple[float, float]:
        """When a pass can next decide something the last one did not: from the first pass at or
        after a boot's end or the back-off's; from the first pass after a VM's timeout."""
        pool, inf = self.pool, float("inf")
        at_or_after = [
            self.cloud.next_change() or inf,
            *(health.backoff_until or inf for health in self.state.health.values()),
            *(at + DROPPED_CLEAN_MAX_AGE for at in self.state.dropped_clean.values()),
        ]
        after = [inf]
        for vm in self.state.vms:
            after += [
                vm.since + pool.idle_timeout,
                vm.since + pool.unusable_timeout,
                vm.since + pool.ready_timeout,
                vm.created_at + pool.build_timeout,
                vm.created_at + pool.create_grace,
            ]
            if vm.delete_requested_at is not None:
                after.append(vm.delete_requested_at + pool.delete_timeout)
        return (min(t for t in at_or_after if t > self.now), min(t for t in after if t >= self.now))

    def _delete(self, action: DeleteServer) -> None:
        error: CloudError | None = None
        try:
            self.cloud.delete_server(action.server_id)
            self.trace.append((self.now, "delete", action.name, action.reason))
        except CloudError as caught:
            error = caught
        self._update(
            functools.partial(plan_deleted, name=action.name, error=error, now=self.now, server_id=action.server_id)
        )

    def _create(self, creates: list[CreateServer]) -> None:
        skipped = []
        for action in creates:
            if self.state.health_of(action.vm_class).backing_off(self.now):
                skipped.append(action.name)  # the cloud just refused: Pool._create asks no more
                continue
            server_id: str | None = None
            error: CloudError | None = None
            try:
                server_id = self.cloud.create_server(action.name)
                self.trace.append((self.now, "create", action.name, ""))
                self.peak = max(self.peak, len(self.cloud.servers))
            except CloudError as caught:
                error = caught
            self._update(
                functools.partial(
                    plan_created,
                    name=action.name,
                    server_id=server_id,
                    error=error,
                    pool=self.pool,
                    now=self.now,
                    vm_class=action.vm_class,
                )
            )
        if skipped:
            self._update(functools.partial(_without_result, plan_not_created, names=skipped))


# -- what a replay tells: waits, VM-hours, boots; and the two baselines --


class Outcome:
    """One replay's (or baseline's) figures, in seconds (a plain class: see LoggedJob)."""

    def __init__(
        self,
        name: str,
        waits: list[float],
        acquire_waits: list[float],
        usage: Usage,
        job_seconds: float,
        boots: int,
        failed_boots: int,
        deletes: int,
        peak: int,
    ):
        self.name = name
        self.waits = waits  # submit -> VM claimed, the batch queue's wait for a slot included
        self.acquire_waits = acquire_waits  # the prologue's start -> VM claimed: the pool's part
        self.usage = usage
        self.job_seconds = job_seconds
        self.boots = boots
        self.failed_boots = failed_boots
        self.deletes = deletes
        self.peak = peak

    def summary(self) -> dict[str, Any]:
        waits = sorted(self.waits)
        hours = {key: round(value / 3600, 2) for key, value in self.usage.as_dict().items()}
        return {
            "wait": {
                "mean": round(sum(waits) / len(waits), 1) if waits else 0.0,
                "p50": round(percentile(waits, 50), 1),
                "p95": round(percentile(waits, 95), 1),
                "max": round(waits[-1], 1) if waits else 0.0,
                "waited": sum(1 for wait in waits if wait > 0),
                "in_acquire": round(sum(self.acquire_waits) / max(len(self.acquire_waits), 1), 1),
            },
            "vm_hours": hours["cloud"],
            "busy_hours": hours["busy"],
            "idle_hours": hours["free"],
            "booting_hours": hours["booting"],
            "other_hours": round(max(0.0, hours["cloud"] - hours["busy"] - hours["free"] - hours["booting"]), 2),
            "job_hours": round(self.job_seconds / 3600, 2),
            "boots": self.boots,
            "failed_boots": self.failed_boots,
            "deletes": self.deletes,
            "peak_vms": self.peak,
        }


def percentile(ordered: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of sorted values (0 for none)."""
    import math

    return ordered[max(0, math.ceil(len(ordered) * share / 100) - 1)] if ordered else 0.0


def replay_outcome(replay: Replay) -> Outcome:
    jobs = replay.jobs.values()
    counters = replay.state.counters
    claimed = [job for job in jobs if job.claimed is not None and job.started is not None]
    return Outcome(
        "pool",
        [job.claimed - job.job.submit for job in claimed],  # type: ignore[operator]
        [job.claimed - job.started for job in claimed],  # type: ignore[operator]
        replay.usage,
        sum(replay.prepare_time + job.job.run for job in jobs),
        counters.get("boots", 0),
        counters.get("failed_boots", 0),
        counters.get("deletes", 0),
        replay.peak,
    )


def _slot_starts(jobs: Sequence[LoggedJob], slots: int, holds: Callable[[LoggedJob], float]) -> list[float]:
    """When each job starts on a node of `slots` slots, first come first served (jobs by submit)."""
    import heapq

    ends: list[float] = []
    starts = []
    for job in jobs:
        start = job.submit
        if len(ends) >= slots:
            start = max(start, heapq.heappop(ends))
        starts.append(start)
        heapq.heappush(ends, start + holds(job))
    return starts


def baselines(
    jobs: Sequence[LoggedJob], pool: PoolConfig, cloud: SimCloudSettings, prepare_time: float
) -> list[Outcome]:
    """A fixed pool of max VMs always on, and one VM booted per job and deleted after it (cloud
    bursting without a pool), on the same node of max slots."""
    import heapq

    work = [prepare_time + job.run for job in jobs]
    job_seconds = sum(work)
    fixed = _slot_starts(jobs, pool.max, lambda job: prepare_time + job.run)
    span = max(start + held for start, held in zip(fixed, work, strict=True)) - jobs[0].submit
    outcomes = [
        Outcome(
            f"fixed {pool.max} VMs",
            [start - job.submit for start, job in zip(fixed, jobs, strict=True)],
            [0.0] * len(jobs),
            Usage(cloud=pool.max * span, busy=job_seconds, free=pool.max * span - job_seconds),
            job_seconds,
            pool.max,
            0,
            0,
            pool.max,
        )
    ]
    boot = cloud.boot_time
    fresh = _slot_starts(jobs, pool.max, lambda job: boot + prepare_time + job.run)
    running: list[float] = []
    peak = 0
    for start, held in sorted(zip(fresh, work, strict=True)):
        while running and running[0] <= start:
            heapq.heappop(running)
        heapq.heappush(running, start + boot + held)
        peak = max(peak, len(running))
    waits = [start + boot - job.submit for start, job in zip(fresh, jobs, strict=True)]
    outcomes.append(
        Outcome(
            "one VM per job",
            waits,
            [boot] * len(jobs),
            Usage(cloud=len(jobs) * boot + job_seconds, busy=job_seconds, booting=len(jobs) * boot),
            job_seconds,
            len(jobs),
            0,
            len(jobs),
            peak,
        )
    )
    return outcomes


# -- the command: settings, one replay or a sweep, text, JSON and a plot --

SIMULATE_KEYS = (
    "min",
    "max",
    "min_free",
    "idle_timeout",
    "pass_interval",
    "build_timeout",
    "ready_timeout",
    "unusable_timeout",
    "create_grace",
    "delete_timeout",
    "protect_after_failures",
    "backoff_initial",
    "backoff_max",
)  # the [pool] settings a replay uses


def simulation_pool(path: str, settings: Sequence[str]) -> PoolConfig:
    """The [pool] section of the config (the others are not needed), then --set KEY=VALUE on top."""
    parser, _ = _read_config(path)
    pool: PoolConfig = _build_section(path, parser, "pool", PoolConfig)
    for setting in settings:
        key, _, value = setting.partition("=")
        pool = with_pool_setting(pool, "--set", key.strip(), value.strip())
    return pool


def with_pool_setting(pool: PoolConfig, option: str, key: str, raw: str) -> PoolConfig:
    if key not in SIMULATE_KEYS:
        raise BadInput(f"{option} {key}: not a [pool] setting the replay uses; one of {', '.join(SIMULATE_KEYS)}")
    try:
        changed = dataclasses.replace(pool, **{key: _parse_value(option, "pool", key, raw, getattr(pool, key))})
        _check_pool_limits(option, changed)
    except ConfigError as error:
        raise BadInput(str(error)) from None
    return changed


def sweep_values(sweep: str) -> tuple[str, list[str]]:
    key, sep, values = sweep.partition("=")
    listed = [value.strip() for value in values.split(",") if value.strip()]
    if not sep or not listed:
        raise BadInput(f"--sweep {sweep!r}: expected KEY=VALUE,VALUE,... (e.g. idle_timeout=60,600,1800)")
    return key.strip(), listed


def simulate_report(
    log_path: str,
    log_format: str,
    pool: PoolConfig,
    cloud: SimCloudSettings,
    *,
    prepare_time: float,
    reconcile_every: float,
    sweep: str | None,
    samples: bool = False,
) -> dict[str, Any]:
    """Replay the log (once, or once per swept value) and the baselines: the figures as data."""
    job_log = read_job_log(log_path, log_format)
    jobs = job_log.jobs
    runs: list[tuple[str | None, PoolConfig]] = [(None, pool)]
    key = ""
    if sweep:
        key, values = sweep_values(sweep)
        runs = [(value, with_pool_setting(pool, "--sweep", key, value)) for value in values]
    started = time.monotonic()
    rows, replays = [], []
    for value, settings in runs:
        config = Config(path="", pool=settings, openstack=OpenStackConfig(), ssh=SshConfig())
        replay = Replay(
            jobs, config, cloud, prepare_time=prepare_time, reconcile_every=reconcile_every, samples=samples
        ).run()
        replays.append(replay)
        rows.append({**({"value": value} if sweep else {}), **replay_outcome(replay).summary()})
    elapsed = time.monotonic() - started
    report: dict[str, Any] = {
        "schema": "vmpool-simulate",
        "version": 1,
        "log": log_path,
        "jobs": len(jobs),
        "skipped": job_log.skipped,
        "days": round((max(job.submit + job.run for job in jobs) - jobs[0].submit) / 86400, 2),
        "settings": {name: getattr(pool, name) for name in SIMULATE_KEYS},
        "cloud": {**cloud.as_dict(), "prepare_time": prepare_time, "reconcile_every": reconcile_every},
        "pool": rows[0] if not sweep else None,
        "baselines": {outcome.name: outcome.summary() for outcome in baselines(jobs, pool, cloud, prepare_time)},
        "replayed_in": round(elapsed, 2),
        "jobs_per_second": round(len(jobs) * len(runs) / max(elapsed, 1e-9)),
    }
    if sweep:
        report["sweep"] = {"key": key, "rows": rows}
    if samples:
        report["samples"] = replays[0].samples
    return report


SIMULATE_ROWS = (
    ("wait mean", "wait", "mean"),
    ("wait p50", "wait", "p50"),
    ("wait p95", "wait", "p95"),
    ("wait max", "wait", "max"),
    ("  of it in acquire (mean)", "wait", "in_acquire"),
    ("jobs that waited", "wait", "waited"),
    ("VM-hours", "vm_hours", ""),
    ("  busy (job-hours)", "busy_hours", ""),
    ("  idle", "idle_hours", ""),
    ("  booting", "booting_hours", ""),
    ("  other (deleting)", "other_hours", ""),
    ("boots", "boots", ""),
    ("  failed", "failed_boots", ""),
    ("deletes", "deletes", ""),
    ("most VMs at once", "peak_vms", ""),
)


def _figure(summary: dict[str, Any], key: str, part: str) -> str:
    value = summary[key][part] if part else summary[key]
    if key == "wait" and part != "waited":
        return format_age(value)
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def simulate_text(report: dict[str, Any]) -> str:
    settings, cloud = report["settings"], report["cloud"]
    skipped = f" ({report['skipped']:,} skipped: run time unknown)" if report["skipped"] else ""
    lines = [
        f"replay of {report['log']}: {report['jobs']:,} jobs{skipped} over {report['days']:g} days",
        f"pool: min {settings['min']}, max {settings['max']}, min_free {settings['min_free']}, "
        f"idle_timeout {settings['idle_timeout']:g}s; cloud (simulated): boot {cloud['boot_time']:g}s, "
        f"{cloud['boot_failures']:.0%} of boots fail, quota {cloud['quota'] or 'none'}; "
        f"prepare {cloud['prepare_time']:g}s; reconcile every {cloud['reconcile_every']:g}s",
        "",
    ]
    columns = (
        [(f"{report['sweep']['key']}={row['value']}", row) for row in report["sweep"]["rows"]]
        if "sweep" in report
        else [("pool", report["pool"])]
    ) + list(report["baselines"].items())
    table = [["", *(name for name, _ in columns)]]
    table += [[label, *(_figure(summary, key, part) for _, summary in columns)] for label, key, part in SIMULATE_ROWS]
    widths = [max(len(row[index]) for row in table) for index in range(len(table[0]))]
    lines += [
        "  ".join(
            cell.ljust(widths[0]) if index == 0 else cell.rjust(widths[index]) for index, cell in enumerate(row)
        ).rstrip()
        for row in table
    ]
    lines += ["", f"replayed in {report['replayed_in']:.1f}s ({report['jobs_per_second']:,} jobs/s)"]
    return "\n".join(lines)


def plot_usage(samples: Sequence[tuple[float, int, int, int]], path: str, title: str) -> None:
    """VMs over time (busy, free, booting), stacked: matplotlib (the optional extra vmpool[simulate])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = samples[0][0] if samples else 0.0
    days = [(sample[0] - start) / 86400 for sample in samples]
    figure, axes = plt.subplots(figsize=(12, 4))
    axes.stackplot(
        days,
        [s[1] for s in samples],
        [s[2] for s in samples],
        [s[3] for s in samples],
        labels=("busy", "free", "booting"),
        step="post",
    )
    axes.set_xlabel("days")
    axes.set_ylabel("VMs")
    axes.set_title(title)
    axes.legend(loc="upper right")
    figure.tight_layout()
    try:
        figure.savefig(path)
    except OSError as error:
        raise BadInput(f"{path}: cannot write the plot: {error}") from None
    finally:
        plt.close(figure)


def can_plot() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# --- the CLI ---


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_json(state: PoolState, config: Config, now: float) -> dict[str, Any]:
    """The documented, stable `status --json` schema (version 1)."""
    return {
        "schema": "vmpool-status",
        "version": 1,
        "pool": config.pool.name,
        "now": now,
        "limits": {"min": config.pool.min, "max": config.pool.max, "min_free": config.pool.min_free},
        "counts": {s: state.count(s) for s in (FREE, BUSY, UNUSABLE)},
        "desired": desired_size(state, config.pool),
        "waiting": [
            {"job": r.job, "user": r.user, "since": r.since, "class": r.vm_class or None} for r in state.requests
        ],
        "classes": classes_json(state, config.pool),
        "bigger_vm_may_serve": config.pool.bigger_vm_may_serve,
        "last_reconcile": state.last_reconcile,
        # the pool as one: the classes' worst (each class's own in "classes")
        **dataclasses.asdict(state.worst_health()),
        "waiting_on_quota_since": state.quota_blocked_since if starved(state) else None,
        "paused": None
        if state.paused_since is None
        else {"since": state.paused_since, "by": state.paused_by, "reason": state.paused_reason},
        "last_cloud_error": state.last_cloud_error or None,
        "last_cloud_error_at": state.last_cloud_error_at,
        "vms": [
            {
                "name": vm.name,
                "server_id": vm.server_id,
                "address": vm.address,
                "state": vm.state,
                "reason": vm.reason or None,
                "job": vm.job,
                "user": vm.user,
                "since": vm.since,
                "created_at": vm.created_at,
                "last_healthy": vm.last_healthy,
                "tainted": vm.tainted or None,
                "drained": vm.drained or None,
                "class": vm.vm_class,
            }
            for vm in sorted(state.vms, key=lambda vm: vm.name)
        ],
    }


def classes_json(state: PoolState, pool: PoolConfig) -> list[dict[str, Any]]:
    """Each class: its flavor and size (null until Nova described it), limits, VMs by state, desired."""
    described = []
    for vm_class in pool.vm_classes:
        size = class_size(state, vm_class)
        mine = [vm for vm in state.vms if vm.vm_class == vm_class.name]
        described.append(
            {
                "name": vm_class.name,
                "flavor": vm_class.flavor or None,
                "size": None if size is None else size._asdict(),
                "min": vm_class.min,
                "max": vm_class.max or pool.max,
                "min_free": vm_class.min_free,
                "single_use": vm_class.single_use,
                "counts": {s: sum(1 for vm in mine if vm.state == s) for s in (FREE, BUSY, UNUSABLE)},
                "waiting": sum(1 for request in state.requests if request.vm_class == vm_class.name),
                "oldest_wait_since": min(
                    (request.since for request in state.requests if request.vm_class == vm_class.name), default=None
                ),
                "desired": class_desired(state, pool, vm_class),
                **dataclasses.asdict(state.health_of(vm_class.name)),
                "held_back": state.held_back.get(vm_class.name),
            }
        )
    return described


def classes_text(state: PoolState, pool: PoolConfig) -> list[str]:
    """One line per class for the status table's foot."""
    lines = []
    for entry in classes_json(state, pool):
        size = entry["size"]
        offers = "size not known yet" if size is None else str(Want(**size))
        counts = entry["counts"]
        lines.append(
            f"class {entry['name']} ({offers}{', single-use' if entry['single_use'] else ''}): "
            f"min {entry['min']}, max {entry['max']}, min_free {entry['min_free']}, desired {entry['desired']}; "
            f"free {counts[FREE]}, busy {counts[BUSY]}, unusable {counts[UNUSABLE]}, waiting {entry['waiting']}"
        )
    serve = "may" if pool.bigger_vm_may_serve else "may not"
    lines.append(f"a bigger class's Free VM {serve} serve a smaller job ([pool] bigger_vm_may_serve)")
    return lines


def status_text(state: PoolState, config: Config, now: float) -> str:
    rows = [("NAME", "CLASS", "ADDRESS", "STATE", "REASON", "JOB", "USER", "SINCE", "AGE")]
    for vm in sorted(state.vms, key=lambda vm: vm.name):
        reason = (vm.reason or "-") + (" (drained)" if vm.drained else "")
        rows.append(
            (
                vm.name,
                vm.vm_class,
                vm.address or "-",
                vm.state,
                reason,
                vm.job or "-",
                vm.user or "-",
                fmt_time(vm.since),
                format_age(now - vm.since),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    pool = config.pool
    lines.append("")
    lines.append(
        f"pool {pool.name}: min {pool.min}, max {pool.max}, min_free {pool.min_free}, "
        f"desired {desired_size(state, pool)}; free {state.count(FREE)}, busy {state.count(BUSY)}, "
        f"unusable {state.count(UNUSABLE)}"
    )
    lines += classes_text(state, pool)
    waiting = (
        ", ".join(
            f"{r.job} ({r.user}, {r.vm_class or 'class undecided'}, {format_age(now - r.since)})"
            for r in state.requests
        )
        or "none"
    )
    lines.append(f"waiting: {waiting}")
    last = state.last_reconcile
    lines.append(f"last reconcile: {fmt_time(last)}" + (f" ({format_age(now - last)} ago)" if last else " (never)"))
    if state.paused_since is not None:
        lines.append(
            f"PAUSED since {fmt_time(state.paused_since)} ({format_age(now - state.paused_since)} ago) "
            f"by {state.paused_by}: {state.paused_reason}; no VM is created (resume: vmpool resume)"
        )
    for vm in sorted((vm for vm in state.vms if vm.drained), key=lambda vm: vm.name):
        lines.append(f"{describe_vm(vm)} drained {vm.drained}")
    for name, health in sorted(state.health.items()):
        of_class = _of_class(name)
        if health.protected_since is not None:
            lines.append(
                f"PROTECTED MODE{of_class} since {fmt_time(health.protected_since)}: {health.boot_failures} "
                "failed boots; one canary boot at a time (clear: vmpool reconcile --clear-protection)"
            )
        if health.backing_off(now):
            lines.append(
                f"BACKING OFF creates{of_class} until {fmt_time(health.backoff_until)} "
                f"(delay {health.backoff_delay:.0f}s, doubling per refusal up to {pool.backoff_max:.0f}s)"
            )
    for name, held in sorted(state.held_back.items()):
        lines.append(f"HELD BACK: creates{_of_class(name)} for waiting jobs wait on {held}")
    if starved(state):
        lines.append(
            f"WAITING ON THE PROJECT'S QUOTA since {fmt_time(state.quota_blocked_since)}: the project's "
            "other pools are asked to give way"
        )
    if state.last_cloud_error:
        lines.append(f"last cloud error at {fmt_time(state.last_cloud_error_at)}: {state.last_cloud_error}")
    return "\n".join(lines)


def configured_pool(ctx: click.Context) -> Pool:
    obj = ctx.find_root().obj
    if "pool" not in obj:
        config = load_config(obj["config_path"])
        obj["output_problems"] = setup_outputs(config)
        obj["pool"] = Pool(config)
    pool: Pool = obj["pool"]
    return pool


def setup_logging(verbose: bool) -> None:
    for old in [h for h in log.handlers if getattr(h, "vmpool_stderr", False)]:
        log.removeHandler(old)  # `-v` after the subcommand sets logging up again
    handler = logging.StreamHandler(sys.stderr)
    handler.vmpool_stderr = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s vmpool[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    # paramiko logs a traceback for every SSH failure that it also raises, and vmpool reports
    # those in one line ("no SSH banner within 10s"). Without a handler of its own, Python would
    # print the traceback to stderr, and cron would mail it every minute. With -v it is shown.
    ssh_library = logging.getLogger("paramiko")
    ssh_library.propagate = False
    ssh_library.handlers = [handler if verbose else logging.NullHandler()]
    threading.excepthook = _background_thread_failed


def _background_thread_failed(args: Any) -> None:
    """fabric ends a command that overran command_timeout from a timer thread, whose close of a
    transport that died meanwhile raises EOFError there; the probe itself already reported the
    VM in one line. Python would print that thread's traceback to stderr (cron mail, a job's .e):
    vmpool logs it as a debug line instead (shown with -v)."""
    log.debug(
        f"background thread {getattr(args.thread, 'name', '?')}: {args.exc_type.__name__}: {args.exc_value}",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def setup_outputs(config: Config) -> list[tuple[str, str]]:
    """Open the log file and syslog the config names: (setting, problem) for each that cannot work,
    a missing textfile directory too. Only warnings: nothing that only watches the pool may stop a
    job (the hooks requeue a job whose acquire fails); `verify` fails and `check` warns on them."""
    problems = [setup_file_log(config.pool.log_file), setup_syslog(config.logging), textfile_problem(config.metrics)]
    for setting, problem in (found for found in problems if found):
        log.warning(f"{config.path}: {setting}: {problem}; going on without it")
    return [found for found in problems if found]


def setup_file_log(path: str) -> tuple[str, str] | None:
    if not path:
        return None
    try:
        handler = logging.FileHandler(path)
    except PermissionError:
        if os.geteuid() != 0:
            return None  # root's log: a monitoring user's `check` or `status` logs to stderr only
        return f"[pool] log_file = {path}", "cannot open it: permission denied"
    except OSError as error:
        return f"[pool] log_file = {path}", f"cannot open it: {error.strerror or error}"
    handler.setFormatter(logging.Formatter("%(asctime)s vmpool[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    return None


def setup_syslog(logs: LoggingConfig) -> tuple[str, str] | None:
    """[logging] syslog: the same lines to the local syslog daemon, tagged vmpool[PID]."""
    if not logs.syslog or any(getattr(h, "vmpool_syslog", False) for h in log.handlers):
        return None
    import logging.handlers

    address = logs.syslog_address
    try:
        is_socket = stat.S_ISSOCK(os.stat(address).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        return (
            f"[logging] syslog_address = {address}",
            "not a syslog socket (is rsyslog or systemd-journald "
            "running?): start one, set [logging] syslog_address, or syslog = false",
        )
    facility = logging.handlers.SysLogHandler.facility_names[logs.facility]
    try:
        handler = logging.handlers.SysLogHandler(address=address, facility=facility)
    except OSError as error:
        return f"[logging] syslog_address = {address}", f"cannot connect: {error.strerror or error}"
    handler.vmpool_syslog = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("vmpool[%(process)d]: %(levelname)s %(message)s"))
    log.addHandler(handler)
    return None


def textfile_problem(metrics: MetricsConfig) -> tuple[str, str] | None:
    directory = os.path.dirname(metrics.textfile)
    if not metrics.textfile or os.path.isdir(directory):
        return None
    return (
        f"[metrics] textfile = {metrics.textfile}",
        f"no directory {directory}: create it or point textfile at node_exporter's --collector.textfile.directory",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar="VMPOOL_CONFIG",
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    help="INI config file (env: VMPOOL_CONFIG).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.version_option(__version__, prog_name="vmpool")
@click.pass_context
def cli(ctx: click.Context, config_path: str, verbose: bool) -> None:
    """Keep a pool of OpenStack VMs for Torque jobs.

    Exit codes: 0 ok, 1 internal error, 2 bad input, 3 config error, 4 state error,
    5 cloud error, 6 no VM within the timeout, 7 state lock timeout, 8 the job ended while
    acquire waited.
    """
    setup_logging(verbose)
    ctx.obj = {"config_path": config_path}


def _config_after_subcommand(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_root().obj["config_path"] = value


def _verbose_after_subcommand(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        setup_logging(True)


def common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--config and -v after the subcommand too (`vmpool status --config X`, `vmpool reconcile -v`)."""
    command = click.option(
        "--config",
        "config_after",
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_config_after_subcommand,
        help="INI config file (as before the subcommand).",
    )(command)
    return click.option(
        "-v",
        "--verbose",
        "verbose_after",
        is_flag=True,
        expose_value=False,
        callback=_verbose_after_subcommand,
        help="Log debug detail.",
    )(command)


@cli.command()
@click.argument("job_id")
@click.option(
    "--user",
    default="",
    help="The job's owner (recorded; shown by status). Without it, a VM the job holds is its own whoever owns it.",
)
@click.option("--timeout", type=float, default=None, help="Seconds to wait for a VM [pool acquire_timeout].")
@click.option(
    "--format",
    "output",
    type=click.Choice(["address", "env"]),
    default="address",
    help="address: the VM's address; env: KEY=value lines for the hooks.",
)
@common_options
@click.option(
    "--started",
    type=float,
    default=None,
    metavar="EPOCH",
    help="When this attempt of the job began (the prologue's start, seconds since the epoch); "
    "a release of the job after it ends the wait with exit 8. Default: now.",
)
@click.option("--cores", type=click.IntRange(min=1), default=1, help="The job's cores (on its one node) [1].")
@click.option("--mem", "memory", default="0", metavar="SIZE", help="The job's memory: MiB, or 512M, 6G, 64gb [none].")
@click.option("--gpus", type=click.IntRange(min=0), default=0, help="The job's GPUs [0].")
@click.pass_context
def acquire(
    ctx: click.Context,
    job_id: str,
    user: str,
    timeout: float | None,
    output: str,
    started: float | None,
    cores: int,
    memory: str,
    gpus: int,
) -> None:
    """Get a VM for JOB_ID and print its address (exit 0).

    Idempotent: a job that holds a VM gets the same VM again, and without --user too (a VM
    held under a reused job id by another named user is tainted, never handed out); `--format
    env` then says VMPOOL_ALREADY_HELD=yes. A Free VM (the most recently freed) is claimed at once,
    without asking the cloud. Otherwise the request joins a first-come first-served queue
    and, if the pool is below max and no boot in progress covers it, a server is created
    now; the command waits until a VM is ACTIVE and answers SSH, then claims it.

    The VM is of the smallest class whose flavor has --cores, --mem and --gpus (a bigger class's
    Free VM too if [pool] bigger_vm_may_serve); a job no class fits: exit 2 at once, naming the
    largest class.

    After --timeout seconds without a VM: exit 6 with the reason (pool at max, cloud
    failing, quota back-off, protected mode); the request is withdrawn and a VM booted
    for it stays in the pool. If the job's release (its epilogue) runs after --started,
    while the command waits or before it was called: exit 8, nothing held.
    """
    validate_job_id(job_id)
    if user:
        validate_user_name(user)
    want = Want(cores, job_memory(memory), gpus)
    pool = configured_pool(ctx)
    require_private_key(pool.config)
    timeout = pool.config.pool.acquire_timeout if timeout is None else timeout
    claimed = pool.acquire(job_id, user, timeout, started, want)
    click.echo(claimed.vm.address if output == "address" else hook_env(claimed, pool.config))


def job_memory(text: str) -> int:
    """--mem's SIZE in MiB, or exit 2 naming the forms allowed."""
    try:
        return mebibytes(text)
    except ValueError:
        raise BadInput(f"--mem {text!r}: expected MiB or a size like 512M, 6G, 64gb") from None


def hook_env(claimed: Claimed, config: Config) -> str:
    ssh, vm = config.ssh, claimed.vm
    pairs = [
        ("VMPOOL_VM_NAME", vm.name),
        ("VMPOOL_SERVER_ID", vm.server_id or ""),
        ("VMPOOL_ADDRESS", vm.address or ""),
        ("VMPOOL_SSH_USER", ssh.user),
        ("VMPOOL_SSH_PORT", str(ssh.port)),
        ("VMPOOL_SSH_KEY", ssh.private_key),
        ("VMPOOL_KNOWN_HOSTS", ssh.known_hosts),
        ("VMPOOL_ALREADY_HELD", "yes" if claimed.already_held else "no"),
    ]
    return "\n".join(f"{key}={value}" for key, value in pairs)


@cli.command()
@click.argument("job_id")
@click.option("--unusable", "reason", default="", help="The VM may be dirty: never give it to another job.")
@common_options
@click.pass_context
def release(ctx: click.Context, job_id: str, reason: str) -> None:
    """Give JOB_ID's VM back to the pool: it becomes Free (exit 0).

    With --unusable REASON it becomes Unusable instead (e.g. the epilogue could not clean
    it) and is never handed out again; reconcile deletes it. Releasing a job that holds
    no VM (unknown, or released already) is a warning, exit 0. No cloud call.
    """
    validate_job_id(job_id)
    configured_pool(ctx).release(job_id, reason.strip().replace("\n", " ")[:200])


@cli.command()
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@click.option("--clear-protection", is_flag=True, help="Leave protected mode and forget failed boots.")
@common_options
@click.pass_context
def reconcile(ctx: click.Context, dry_run: bool, clear_protection: bool) -> None:
    """One pass for cron: scale the pool, re-check Unusable VMs, delete the dead.

    One server list per pass. BUILD past build_timeout, ERROR, and VMs unreachable past
    ready_timeout/unusable_timeout are deleted; deletes that do not finish are re-issued
    after delete_timeout; tagged servers the state does not know are adopted when seen on
    two passes; Free VMs above min idle past idle_timeout are deleted; missing VMs are
    created up to min, demand + min_free and max. Another pass already running: exit 0
    with a message. The cloud cannot be listed: the pass does what it can, exit 5.
    """
    pool = configured_pool(ctx)
    require_private_key(pool.config)
    if clear_protection:
        pool.store.update(functools.partial(_without_result, clear_protected_mode))
        log.warning("protected mode cleared by an admin")
    pool.reconcile(dry_run=dry_run)
    if pool.list_error is not None:
        raise CloudError(f"reconcile pass incomplete: {pool.list_error}")
    if pool.create_refused:
        vm_class, refused = next(iter(pool.create_refused.items()))
        raise CloudError(f"reconcile could not create a VM{_of_class(vm_class)}: {refused}")


KERNEL_FILE_SYSTEMS = ("/proc", "/sys", "/dev")


def on_kernel_file_system(path: str) -> str:
    """Why vmpool's own files cannot live at `path` (under /proc, /sys or /dev), or ""."""
    real = os.path.realpath(path)
    for top in KERNEL_FILE_SYSTEMS:
        if real == top or real.startswith(top + "/"):
            return f"under {top}, the kernel's: keep vmpool's files on a disk, e.g. under /var/lib/vmpool"
    return ""


@cli.command()
@common_options
@click.pass_context
def verify(ctx: click.Context) -> None:
    """Check the whole set-up once, as acquire and reconcile will use it (exit 0: all good).

    Reads the config, the state file's directory and the private key; authenticates to the
    cloud; looks up the flavor, image, network and key pair the config names (the key pair must
    hold the private key's public half). One line per check. A wrong value is named by its
    config key: exit 3. The cloud cannot be reached or refuses the credentials: exit 5.
    """
    config = configured_pool(ctx).config  # a config that does not parse: exit 3 here
    problems: list[str] = []

    def report(what: str, problem: str) -> None:
        click.echo(f"{'FAILED' if problem else 'ok':<7} {what}{': ' + problem if problem else ''}")
        if problem:
            problems.append(what)

    report(f"config {config.path}", "")
    existing = os.path.dirname(os.path.abspath(config.pool.state_file))
    while not os.path.exists(existing):  # vmpool makes the missing directories
        existing = os.path.dirname(existing)
    report(
        f"[pool] state_file = {config.pool.state_file}",
        on_kernel_file_system(config.pool.state_file)
        or ("" if os.access(existing, os.W_OK | os.X_OK) else f"{existing} is not writable for this user"),
    )
    for setting, path in (("[ssh] known_hosts", config.ssh.known_hosts), ("[pool] log_file", config.pool.log_file)):
        if path and on_kernel_file_system(path):
            report(f"{setting} = {path}", on_kernel_file_system(path))
    for setting, problem in ctx.find_root().obj["output_problems"]:
        report(setting, problem)
    public_key: str | None = None
    if not os.path.isfile(config.ssh.private_key):
        report(f"[ssh] private_key = {config.ssh.private_key}", "no such file")
    else:
        public_key, problem = public_key_of(config.ssh.private_key)
        report(f"[ssh] private_key = {config.ssh.private_key}", problem)
    cloud, nova = config.openstack, NovaCloud(config)
    source = credentials_source(cloud)
    try:
        findings = nova.check_setup(public_key)
    except CloudError as error:  # credentials refused, no cloud at auth_url: exit 5
        report(source, str(error))
        raise CloudError(f"{config.path}: the cloud cannot be checked: see the FAILED line") from None
    except ConfigError as error:  # no such cloud in clouds.yaml, a clouds.yaml that does not parse
        report(source, str(error))
        raise
    report(f"{source}: authenticated" + ("" if cloud.auth_url else f" at {nova.auth_url}"), "")
    for where, problem in findings:
        report(where, problem)
    if problems:
        raise ConfigError(f"{config.path}: {len(problems)} check(s) failed: {'; '.join(problems)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable (schema vmpool-status, version 1).")
@common_options
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show every VM: state, reason, job and user, since when; and the pool summary.

    Also the waiting requests, protected mode, quota back-off and the last cloud error.
    Reads the state only (no cloud call, no lock wait).
    """
    pool = configured_pool(ctx)
    try:
        state = pool.store.read()
    except StateAccessError:
        raise  # the file may be fine: moving it aside would lose the pool's record
    except StateError as error:
        raise StateError(f'{error}\nTo recover: docs/operating.md, "Backup and restore".') from None
    now = pool.clock()
    click.echo(
        json.dumps(status_json(state, pool.config, now), indent=1) if as_json else status_text(state, pool.config, now)
    )


@cli.command()
@click.option("--reconcile-warning", default=None, metavar="RANGE", help="Seconds since the last pass [check].")
@click.option("--reconcile-critical", default=None, metavar="RANGE", help="Seconds since the last pass [check].")
@click.option("--wait-warning", default=None, metavar="RANGE", help="Oldest waiting job, seconds [check].")
@click.option("--wait-critical", default=None, metavar="RANGE", help="Oldest waiting job, seconds [check].")
@click.option("--unusable-warning", default=None, metavar="RANGE", help="Unusable VMs [check].")
@click.option("--unusable-critical", default=None, metavar="RANGE", help="Unusable VMs [check].")
@click.option("--protected", type=click.Choice(CHECK_LEVELS), default=None, help="Protected mode is [check].")
@click.option("--paused", type=click.Choice(CHECK_LEVELS), default=None, help="Paused is [check].")
@click.option("--timeout", type=float, default=None, help="Plugin timeout, seconds [check].")
@common_options
@click.pass_context
def check(ctx: click.Context, **options: Any) -> None:
    """Nagios/Icinga plugin: one status line and perfdata; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

    Reads the state without its lock (the file is replaced whole), no cloud call. Thresholds
    are Nagios ranges (a number N alerts above N) from [check], overridden by the options.
    """
    try:  # whatever is wrong (config, state), Nagios gets one line on stdout and UNKNOWN
        pool = configured_pool(ctx)
        given = {key: value for key, value in options.items() if value is not None}
        thresholds = dataclasses.replace(pool.config.check, **given)
        _check_operations("options", thresholds, MetricsConfig(), LoggingConfig())
        run_check(pool.store.read, pool.config, pool.clock, thresholds, ctx.find_root().obj["output_problems"])
    except VmpoolError as error:
        click.echo(f"VMPOOL UNKNOWN - {error}")
        ctx.exit(3)


@cli.command()
@common_options
@click.pass_context
def metrics(ctx: click.Context) -> None:
    """Print the Prometheus metrics (what each reconcile pass writes to [metrics] textfile)."""
    pool = configured_pool(ctx)
    click.echo(metrics_text(pool.store.read(), pool.config, pool.clock()), nl=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable (schema vmpool-capacity, version 1).")
@common_options
@click.pass_context
def capacity(ctx: click.Context, as_json: bool) -> None:
    """Print what the pool can hold at once: the batch node's cores, memory (MiB) and GPUs.

    Also its max in VMs and its classes as NAME:CORES:MEMORY_MIB:GPUS (the Torque submit
    filter's CLASSES, the Slurm submit filter's). Flavor sizes: from the state, else from Nova.
    """
    pool = configured_pool(ctx)
    state = copy_state(pool.store.read())
    for flavor in dict.fromkeys(vm_class.flavor for vm_class in pool.config.pool.vm_classes if vm_class.flavor):
        if flavor in state.flavors:
            continue
        try:
            state.flavors[flavor] = pool.cloud.flavor_size(flavor)
        except CloudError as error:
            raise CloudError(
                f"the size of flavor {flavor} is not known yet and Nova cannot tell it ({error}); run"
                " `vmpool capacity` where the cloud is reachable, or after a reconcile pass has learned it"
            ) from None
    held = pool_capacity(state, pool.config.pool) or {}
    if as_json:
        click.echo(json.dumps({"schema": "vmpool-capacity", "version": 1, "pool": pool.config.pool.name, **held}))
    else:
        click.echo("".join(f"{key}={value}\n" for key, value in held.items()), nl=False)


def reason_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--reason",
        default="no reason given",
        show_default=True,
        help="Why: logged with the invoking user, shown by status.",
    )(command)


@cli.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--all", "every", is_flag=True, help="Every VM of the pool now.")
@reason_option
@common_options
@click.pass_context
def drain(ctx: click.Context, names: tuple[str, ...], every: bool, reason: str) -> None:
    """No new job on the VM(s); each is deleted by reconcile once its job ends (at once if not busy).

    Idempotent; no cloud call (the next reconcile pass deletes). Replacements are created as
    demand asks, within max.
    """
    if bool(names) == every:
        raise BadInput("name the VM(s) to drain, or give --all (not both)")
    pool = configured_pool(ctx)
    chosen = [vm.name for vm in pool.store.read().vms] if every else list(names)
    pool.admin(plan_drain, names=chosen, reason=reason)


@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete it even if busy (its job loses the VM; the job is logged).")
@reason_option
@common_options
@click.pass_context
def delete(ctx: click.Context, name: str, force: bool, reason: str) -> None:
    """Delete VM NAME by the next reconcile pass; a busy VM only with --force (exit 2 without)."""
    configured_pool(ctx).admin(plan_admin_delete, name=name, reason=reason, force=force)


@cli.command()
@reason_option
@common_options
@click.pass_context
def pause(ctx: click.Context, reason: str) -> None:
    """Create no VM until `vmpool resume` (Free VMs still serve; deletes and probes go on)."""
    configured_pool(ctx).admin(plan_pause, reason=reason)


@cli.command()
@reason_option
@common_options
@click.pass_context
def resume(ctx: click.Context, reason: str) -> None:
    """Create VMs again after `vmpool pause`."""
    configured_pool(ctx).admin(plan_resume, reason=reason)


@cli.command("clear-backoff")
@reason_option
@common_options
@click.pass_context
def clear_backoff(ctx: click.Context, reason: str) -> None:
    """Forget the create back-off: the next pass creates again (protected mode: reconcile --clear-protection)."""
    configured_pool(ctx).admin(plan_clear_backoff, reason=reason)


@cli.command()
@click.argument("log_file", metavar="LOG")
@click.option(
    "--format",
    "log_format",
    type=click.Choice(["auto", "swf", "csv"]),
    default="auto",
    show_default=True,
    help="The log's format: SWF (Parallel Workloads Archive) or CSV with a header; auto: by its look.",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A [pool] setting for this replay, over the config's (repeatable).",
)
@click.option(
    "--sweep",
    default=None,
    metavar="KEY=V1,V2,...",
    help="Replay once per value of a [pool] setting and print the wait/cost table (e.g. idle_timeout=60,600,1800).",
)
@click.option(
    "--boot-time",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds from create to a VM that answers SSH.",
)
@click.option(
    "--boot-failures",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="The share of boots that end in ERROR.",
)
@click.option("--quota", type=click.IntRange(min=0), default=0, help="Servers the project may hold (0: no limit).")
@click.option(
    "--prepare-time",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds the prologue holds a claimed VM before the job runs.",
)
@click.option(
    "--reconcile-every",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds between cron's reconcile passes.",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Which boots fail (the same seed, the same).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable (schema vmpool-simulate, version 1).")
@click.option(
    "--plot",
    "plot_path",
    default=None,
    metavar="FILE.png",
    help="VMs over time (busy, free, booting); needs matplotlib (pip install 'vmpool[simulate]').",
)
@common_options
@click.pass_context
def simulate(
    ctx: click.Context,
    log_file: str,
    log_format: str,
    settings: tuple[str, ...],
    sweep: str | None,
    boot_time: float,
    boot_failures: float,
    quota: int,
    prepare_time: float,
    reconcile_every: float,
    seed: int,
    as_json: bool,
    plot_path: str | None,
) -> None:
    """Replay a job log (SWF or CSV) through the pool's own decisions and print the waits and VM-hours.

    The [pool] settings come from --config (--config /dev/null: the defaults) and --set; the cloud,
    SSH and the batch system are simulated. Beside the pool: a fixed pool of max VMs, and one VM
    booted per job. Nothing is created, nothing is written but the plot. See docs/simulate.md.
    """
    if plot_path and not can_plot():
        raise BadInput("--plot needs matplotlib: pip install 'vmpool[simulate]' (or matplotlib) in vmpool's venv")
    pool = simulation_pool(ctx.find_root().obj["config_path"], settings)
    report = simulate_report(
        log_file,
        log_format,
        pool,
        SimCloudSettings(boot_time, boot_failures, quota, seed),
        prepare_time=prepare_time,
        reconcile_every=reconcile_every,
        sweep=sweep,
        samples=bool(plot_path),
    )
    if plot_path:
        plot_usage(report.pop("samples"), plot_path, f"{log_file}: VMs of pool {pool.name} over time")
    click.echo(json.dumps(report, indent=1) if as_json else simulate_text(report))


# --- main ---


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every outcome into the documented exit code."""
    # SIGTERM (e.g. a prologue alarm) unwinds like an exception, so a waiting acquire withdraws its request.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        code = cli.main(args=argv, prog_name="vmpool", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vmpool: interrupted", err=True)
        return 1
    except click.ClickException as error:
        error.show()
        return 2
    except VmpoolError as error:
        log.error(str(error)) if log.handlers else click.echo(f"vmpool: {error}", err=True)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except SystemExit as exit_:  # SIGTERM, after the finally blocks withdrew what they had to
        return exit_.code if isinstance(exit_.code, int) else 1
    except Exception:
        log.exception("unexpected internal error (a bug: please report it with this log)")
        return 1
    return code if isinstance(code, int) else 0


def run() -> NoReturn:
    """The `vmpool` command (its console script): main(), then exit with its code."""
    admitted()
    code = main()
    # The process ends here and the OS frees its memory: freezing the objects spares the exit's
    # collection of them all, a visible part of every acquire's and release's time.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
