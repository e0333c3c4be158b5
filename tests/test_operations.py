"""Site operations over the real parts (the vmpool CLI against the local OpenStack test bed):
admin actions, the Nagios/Icinga plugin, Prometheus metrics and syslog."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import PoolHandle


def log_text(pool: PoolHandle) -> str:
    return Path(pool.settings["pool"]["log_file"]).read_text()


def as_admin(name: str) -> dict[str, str]:
    return {**os.environ, "SUDO_USER": name}


# --- admin actions ---

def test_drain_keeps_a_busy_vm_for_its_job_then_reconcile_deletes_it(pool: PoolHandle) -> None:
    pool.write_config(pool={"min": 1, "max": 2})
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
    assert pool.run("acquire", "2", "--user", "bob", "--timeout", "1", check=False).returncode == 6
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
