"""Site operations over the real parts (the vmpool CLI against the local OpenStack test bed):
admin actions, the Nagios/Icinga plugin, Prometheus metrics and syslog."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import vmpool as vp
from tests.conftest import ROOT, TRACEBACK, PoolHandle, wait_until


def log_text(pool: PoolHandle) -> str:
    return Path(pool.settings["pool"]["log_file"]).read_text()


def configure(pool: PoolHandle, **sections: dict[str, object]) -> None:
    """write_config, also for the sections the fixture does not write ([check], [metrics], [logging])."""
    for section in sections:
        pool.settings.setdefault(section, {})
    pool.write_config(**sections)


def as_admin(name: str) -> dict[str, str]:
    return {**os.environ, "SUDO_USER": name}


# --- admin actions ---


def test_drain_keeps_a_busy_vm_for_its_job_then_reconcile_deletes_it(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1, "max": 1})  # at max: a new job can only get the drained VM, or none
    pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free VM")
    pool.run("acquire", "1", "--user", "alice")
    name = pool.vms("busy")[0]["name"]
    refused = pool.run("delete", name, check=False)
    assert refused.returncode == 2 and "busy with job 1 of alice" in refused.stderr
    pool.run("drain", name, "--reason", "kernel update", env=as_admin("carol"))
    assert pool.run("drain", name, env=as_admin("dave")).returncode == 0  # idempotent
    assert pool.vms("busy")[0]["drained"].endswith("by carol: kernel update")
    assert "(drained)" in pool.run("status").stdout
    pool.run("reconcile")
    assert pool.vms("busy")[0]["name"] == name, "the job keeps its drained VM"
    refused = pool.run("acquire", "2", "--user", "bob", "--timeout", "1", check=False)
    assert refused.returncode == 6 and "pool at max" in refused.stderr, refused.stderr
    pool.run("release", "1")
    pool.reconcile_until(lambda: name not in {s.name for s in pool.servers()}, 60, "the drained VM deleted")
    assert f"{name} " in log_text(pool) and "drained by carol: kernel update; deleted once job 1 ends" in log_text(pool)


def test_delete_force_takes_a_busy_vm_and_names_its_job(pool: PoolHandle) -> None:
    pool.write_config(pool={"max": 1})
    pool.run("acquire", "5", "--user", "alice")
    vm = pool.vms("busy")[0]
    pool.run("delete", vm["name"], "--force", "--reason", "disk broken", env=as_admin("carol"))
    assert "deleted by carol while busy with job 5 of alice: disk broken" in log_text(pool)
    pool.reconcile_until(lambda: not pool.servers(), 60, "the VM deleted")
    assert "nothing to release" in pool.run("release", "5").stderr


def test_an_unknown_vm_name_is_one_sentence_and_exit_2(pool: PoolHandle) -> None:
    for command in (["drain", "nosuchvm"], ["delete", "nosuchvm"]):
        result = pool.run(*command, check=False)
        assert result.returncode == 2 and "no VM named 'nosuchvm'" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert pool.run("drain", check=False).returncode == 2


def test_pause_creates_nothing_until_resume_and_status_says_who_and_why(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1})
    pool.run("pause", "--reason", "cloud maintenance", env=as_admin("carol"))
    pool.run("pause", "--reason", "again", env=as_admin("dave"))  # idempotent: the first word stays
    text = pool.run("status").stdout
    assert "PAUSED since" in text and "by carol: cloud maintenance" in text
    assert pool.status()["paused"]["by"] == "carol"
    pool.run("reconcile")
    assert not pool.servers() and "not creating 1 VM(s): paused" in log_text(pool)
    pool.run("resume", "--reason", "done", env=as_admin("carol"))
    assert pool.status()["paused"] is None and "resumed by carol" in log_text(pool)
    pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free VM after resume")


def test_clear_backoff_after_a_quota_refusal_creates_at_the_next_pass(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1, "backoff_initial": 600, "backoff_max": 600})
    # the pass reads the project's limits first and would wait rather than be refused: play a quota
    # taken between that look and the create (another pool, another user) by hiding the limits
    pool.bed.add_fault("nova", "GET", r"/limits$", "status", status=503)
    pool.bed.set_quota(instances=0)
    try:
        pool.run("reconcile", check=False)
        assert pool.status()["backoff_until"] is not None
    finally:
        pool.bed.set_quota(instances=100)
    pool.run("reconcile", check=False)
    assert not pool.servers(), "backing off"
    pool.run("clear-backoff", "--reason", "quota raised", env=as_admin("carol"))
    assert "cleared by carol: quota raised" in log_text(pool)
    assert "no back-off to clear" in pool.run("clear-backoff").stderr
    pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free VM after clear-backoff")


# --- the Nagios/Icinga plugin ---

PERFDATA = {"free", "busy", "unusable", "waiting", "oldest_wait", "since_reconcile", "backoff", "protected", "paused"}


def set_state(pool: PoolHandle, **fields: Any) -> None:
    """Play a pool in trouble: change the state file as vmpool would (under its lock)."""
    import dataclasses

    import vmpool as vp

    store = vp.StateStore(pool.state_file, pool.name, 10)
    store.update(lambda state: (dataclasses.replace(state, **fields), None))


def plugin_output(result: subprocess.CompletedProcess[str]) -> tuple[str, dict[str, str]]:
    """The status line and its perfdata (label -> value with its unit)."""
    status, _, perfdata = result.stdout.strip().partition(" | ")
    return status, dict(item.split(";")[0].split("=", 1) for item in perfdata.split())


def test_check_is_a_monitoring_plugin_over_the_pools_state(pool: PoolHandle) -> None:
    first = pool.run("check", check=False)
    assert first.returncode == 2 and first.stdout.startswith("VMPOOL CRITICAL - no reconcile pass has seen the cloud")
    pool.write_config(pool={"min": 1})
    pool.reconcile_until(lambda: pool.vms("free"), 90, "a Free VM")
    ok = pool.run("check")
    status, perfdata = plugin_output(ok)
    assert status.startswith("VMPOOL OK - 1 free, 0 busy, 0 unusable, 0 waiting; last reconcile")
    assert set(perfdata) == PERFDATA
    assert perfdata["free"] == "1" and perfdata["protected"] == "0"
    pool.run("pause", "--reason", "maintenance")
    paused = pool.run("check", check=False)
    assert paused.returncode == 1 and "VMPOOL WARNING - paused by an admin" in paused.stdout
    assert pool.run("check", "--paused", "ok").returncode == 0
    configure(pool, check={"paused": "critical"})
    assert pool.run("check", check=False).returncode == 2
    pool.run("resume")
    set_state(pool, last_reconcile=time.time() - 1000)
    stale = pool.run("check", check=False)
    assert stale.returncode == 2 and "no reconcile pass for 10" in stale.stdout and "threshold" in stale.stdout
    assert pool.run("check", "--reconcile-critical", "2000", "--reconcile-warning", "2000").returncode == 0
    pool.run("reconcile")
    set_state(pool, health={vp.DEFAULT_CLASS: vp.ClassHealth(protected_since=time.time())})
    protected = pool.run("check", check=False)
    assert protected.returncode == 2 and "protected mode" in protected.stdout
    assert plugin_output(protected)[1]["protected"] == "1"


def test_check_reports_a_long_wait_and_never_waits_for_the_state_lock(pool: PoolHandle) -> None:
    import filelock

    pool.write_config(pool={"max": 1})
    pool.run("reconcile")
    pool.run("pause", "--reason", "test")
    waiter = pool.spawn("acquire", "9", "--user", "bob", "--timeout", "120")
    wait_until(lambda: pool.status()["waiting"], 30, "job 9 to wait")
    long_wait = wait_until(
        lambda: (r := pool.run("check", "--paused", "ok", "--wait-critical", "1", check=False)).returncode == 2 and r,
        60,
        "a wait longer than 1s to be critical",
    )
    assert "a job has waited" in long_wait.stdout and int(plugin_output(long_wait)[1]["waiting"]) == 1
    waiter.kill()
    waiter.communicate()
    with filelock.FileLock(pool.state_file + ".lock", timeout=5):  # another vmpool holds the lock
        held = pool.run("check", "--paused", "ok", "--wait-critical", "", "--wait-warning", "", check=False)
    assert held.returncode == 0, held.stdout + held.stderr


def test_check_with_a_bad_threshold_or_config_is_unknown(pool: PoolHandle) -> None:
    bad = pool.run("check", "--wait-critical", "ten", check=False)
    assert bad.returncode == 3 and bad.stdout.startswith("VMPOOL UNKNOWN - ") and "wait_critical" in bad.stdout
    configure(pool, check={"protected": "loud"})
    assert pool.run("check", check=False).returncode == 3
    configure(pool, check={"protected": "critical"})
    Path(pool.state_file).parent.mkdir(parents=True, exist_ok=True)
    Path(pool.state_file).write_text("garbage")
    os.chmod(pool.state_file, 0o600)
    corrupt = pool.run("check", check=False)
    os.unlink(pool.state_file)
    os.mkfifo(pool.state_file, 0o600)  # a state file whose read never ends: the plugin timeout ends it
    stuck = pool.run("check", "--timeout", "1", check=False)
    assert stuck.returncode == 3 and stuck.stdout.startswith("VMPOOL UNKNOWN - no answer within the plugin timeout")
    assert corrupt.returncode == 3 and corrupt.stdout.startswith("VMPOOL UNKNOWN - ")
    assert "corrupt state" in corrupt.stdout


def as_user(user: str, *command: str) -> subprocess.CompletedProcess[str]:
    """A command as `user` (no supplementary groups), as Nagios's NRPE runs a plugin."""
    import pwd

    account = pwd.getpwnam(user)
    return subprocess.run(
        ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", *command],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
    )


def test_check_status_and_metrics_work_for_a_user_who_reads_the_state_but_not_the_key(pool: PoolHandle) -> None:
    """Nagios runs `check` without root: it reads the config and the state, never the SSH key (root's,
    in a root-only directory), nor root's log file."""
    import pwd
    import shutil
    import tempfile

    pool.run("reconcile")
    user = "nobody"
    monitor = Path(tempfile.mkdtemp(prefix="vmpool-monitor-", dir="/tmp"))
    try:
        (monitor / "state").mkdir()
        shutil.copy(pool.state_file, monitor / "state" / "state.json")
        config = monitor / "vmpool.conf"
        config.write_text(
            Path(pool.config_path).read_text().replace(pool.state_file, str(monitor / "state" / "state.json"))
        )
        for path in (monitor, monitor / "state", monitor / "state" / "state.json", config):
            os.chown(path, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        config.chmod(0o600)
        for private in (pool.key, pool.settings["pool"]["log_file"]):  # out of the user's reach
            assert "Permission denied" in as_user(user, "stat", private).stderr
        for args in (["check"], ["status"], ["metrics"]):
            result = as_user(user, sys.executable, "-m", "vmpool", "--config", str(config), *args)
            assert result.returncode == 0, f"vmpool {args[0]} as {user}: {result.stdout}{result.stderr}"
            assert TRACEBACK not in result.stderr and "WARNING" not in result.stderr, result.stderr
        assert (
            result.stdout.startswith("# HELP")
            and "VMPOOL OK - " in as_user(user, sys.executable, "-m", "vmpool", "--config", str(config), "check").stdout
        )
    finally:
        shutil.rmtree(monitor)


# --- Prometheus ---


def test_reconcile_writes_the_metrics_file_that_parses_and_counts_the_pools_life(pool: PoolHandle) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    textfile = pool.dir / "textfile" / "vmpool.prom"
    textfile.parent.mkdir()
    configure(pool, metrics={"textfile": str(textfile)})
    pool.run("acquire", "3", "--user", "alice")
    pool.run("release", "3")
    pool.run("reconcile")

    def samples(text: str) -> dict[str, float]:
        return {
            s.name + ("" if "le" not in s.labels else f"[{s.labels['le']}]"): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    written = samples(textfile.read_text())
    assert written["vmpool_acquires_total"] == 1 and written["vmpool_releases_total"] == 1
    assert written["vmpool_boots_total"] >= 1 and written["vmpool_acquire_wait_seconds_count"] == 1
    assert written["vmpool_acquire_wait_seconds_bucket[+Inf]"] == 1 and written["vmpool_paused"] == 0
    assert written["vmpool_last_reconcile_timestamp_seconds"] > 0
    printed = samples(pool.run("metrics").stdout)
    assert set(printed) == set(written) and printed["vmpool_acquires_total"] == 1
    assert not [name for name in os.listdir(textfile.parent) if name != "vmpool.prom"], "no temp file left"


def test_acquire_and_release_never_import_the_monitoring_libraries(pool: PoolHandle) -> None:
    textfile = pool.dir / "vmpool.prom"
    configure(pool, metrics={"textfile": str(textfile)})
    heavy = "('prometheus_client', 'nagiosplugin')"
    for args in (["acquire", "4", "--user", "alice", "--timeout", "90"], ["release", "4"]):
        # the acquire waits for a boot: its own reconcile passes run, without the metrics step
        code = (
            f"import sys, vmpool; rc = vmpool.main(['--config', sys.argv[1], *sys.argv[2:]]); "
            f"print('IMPORTED', sorted(m for m in {heavy} if m in sys.modules)); sys.exit(rc)"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, pool.config_path, *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "IMPORTED []" in result.stdout
    assert not textfile.exists(), "only cron's passes write the metrics"


def test_every_query_of_the_grafana_dashboard_names_a_metric_vmpool_exports() -> None:
    import vmpool as vp

    dashboard = json.loads((ROOT / "contrib" / "grafana-vmpool.json").read_text())
    exported = set(vp.METRIC_NAMES) | {f"vmpool_acquire_wait_seconds_{suffix}" for suffix in ("bucket", "sum", "count")}
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    named = {name for query in queries for name in re.findall(r"\bvmpool_[a-z_]+", query)}
    assert queries and named <= exported, named - exported
    assert {name for name in exported if not name.startswith("vmpool_acquire_wait_seconds")} <= named | {
        "vmpool_acquire_wait_seconds"
    }, "every exported metric has a panel"


# --- syslog ---


def test_syslog_gets_the_same_lines_as_the_log_file_with_the_facility(pool: PoolHandle) -> None:
    import socket

    address = str(pool.dir / "log.sock")  # a stand-in for /dev/log: a datagram socket, as rsyslog makes
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(30)
    try:
        configure(pool, logging={"syslog": "true", "facility": "local3", "syslog_address": address})
        pool.run("pause", "--reason", "syslog test", env=as_admin("carol"))
        line = receiver.recv(65536).decode()
    finally:
        receiver.close()
    message = f"pool {pool.name} paused by carol: syslog test"
    assert line.startswith(f"<{19 * 8 + 4}>vmpool[") and line.rstrip("\x00").endswith(
        message + "; no VM is created until `vmpool resume`"
    )
    assert message in log_text(pool)


def test_a_broken_log_syslog_or_metrics_output_warns_and_never_stops_a_job(pool: PoolHandle) -> None:
    """The hooks requeue a job whose acquire fails: what only watches the pool is a warning on every
    command's path, a FAILED line of `verify` and a WARNING of `check`."""
    pool.settings["pool"]["log_file"] = str(pool.dir / "no-such-dir" / "vmpool.log")
    configure(
        pool,
        logging={"syslog": "true", "syslog_address": str(pool.dir / "no-such-socket")},
        metrics={"textfile": str(pool.dir / "nowhere" / "vmpool.prom")},
    )
    broken = {
        "[pool] log_file": "cannot open it",
        "[logging] syslog_address": "not a syslog socket",
        "[metrics] textfile": "no directory",
    }
    acquired = pool.run("acquire", "7", "--user", "alice")
    assert acquired.stdout.strip() == pool.vms("busy")[0]["address"]
    for result in (acquired, pool.run("release", "7"), pool.run("reconcile")):
        for setting, problem in broken.items():
            assert re.search(
                rf"WARNING .*{re.escape(setting)} = .*: {problem}.*; going on without it", result.stderr
            ), result.stderr
    verified = pool.run("verify", check=False)
    assert verified.returncode == 3, verified.stdout + verified.stderr
    for setting, problem in broken.items():
        assert re.search(rf"^FAILED +{re.escape(setting)} = .*: {problem}", verified.stdout, re.MULTILINE)
    checked = pool.run("check", check=False)
    assert checked.returncode == 1 and checked.stdout.startswith("VMPOOL WARNING - "), checked.stdout
    assert all(f"{setting} = " in checked.stdout for setting in ("[logging] syslog_address", "[metrics] textfile"))
    assert set(plugin_output(checked)[1]) == PERFDATA, "the perfdata stay as they are"
