"""`vmpool simulate`: a job log replayed through the pool's own decisions (the plan_* functions)
with a simulated clock, cloud and batch system; checked against answers worked out by hand, against
itself with every pass run, and against the real commands on the local cloud."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import vmpool as vp
from tests.conftest import VMPOOL, PoolHandle
from tests.joblog import generate_swf

DATA = Path(__file__).resolve().parent / "data"


def swf_line(number: int, submit: int, run: int, processors: int = 1, memory_kb: int = -1, user: int = 1) -> str:
    return f"{number} {submit} -1 {run} {processors} -1 -1 {processors} -1 {memory_kb} 1 {user} 1 -1 1 -1 -1 -1"


def write_log(path: Path, lines: list[str]) -> str:
    path.write_text("; a hand-made log\n" + "\n".join(lines) + "\n")
    return str(path)


def replay(log: str, cloud: vp.SimCloudSettings | None = None, every_pass: bool = False, **pool: Any) -> vp.Replay:
    settings = vp.PoolConfig(name="sim", **{"min": 0, "max": 2, "min_free": 0, "idle_timeout": 600, **pool})
    config = vp.Config(path="", pool=settings, openstack=vp.OpenStackConfig(), ssh=vp.SshConfig())
    return vp.Replay(
        vp.read_job_log(log).jobs, config, cloud or vp.SimCloudSettings(boot_time=60), every_pass=every_pass
    ).run()


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VMPOOL, "--config", "/dev/null", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_three_jobs_wait_and_vm_hours_as_worked_out_by_hand(tmp_path: Path) -> None:
    # j1 at 0 boots sim-0001 (ready at 60) and runs to 160; j2 at 200 takes it Free (no wait) and
    # runs to 250; idle since 250, it is trimmed by cron's pass at 900 (650 s > idle_timeout 600);
    # j3 at 1000 boots sim-0002 (ready at 1060), runs to 1160.
    log = write_log(tmp_path / "three.swf", [swf_line(1, 0, 100), swf_line(2, 200, 50), swf_line(3, 1000, 100)])
    replayed = replay(log)
    assert replayed.trace == [
        (0, "acquire", "", "1"),
        (0, "create", "sim-0001", ""),
        (60, "claim", "sim-0001", "1"),
        (160, "release", "sim-0001", "1"),
        (200, "acquire", "", "2"),
        (200, "claim", "sim-0001", "2"),
        (250, "release", "sim-0001", "2"),
        (900, "delete", "sim-0001", "idle for more than 600s"),
        (1000, "acquire", "", "3"),
        (1000, "create", "sim-0002", ""),
        (1060, "claim", "sim-0002", "3"),
        (1160, "release", "sim-0002", "3"),
    ]
    outcome = vp.replay_outcome(replayed)
    summary = outcome.summary()
    assert summary["wait"] == {"mean": 40.0, "p50": 60.0, "p95": 60.0, "max": 60.0, "waited": 2, "in_acquire": 40.0}
    # sim-0001 lived 0-900, sim-0002 1000-1160; busy 100+50+100; booting 60+60; idle 160-200, 250-900
    assert (outcome.usage, outcome.job_seconds) == (vp.Usage(cloud=1060, busy=250, free=690, booting=120), 250)
    assert (summary["boots"], summary["deletes"], summary["peak_vms"]) == (2, 1, 1)
    fixed, per_job = vp.baselines(replayed_jobs(log), replayed.pool, vp.SimCloudSettings(boot_time=60), 0.0)
    assert fixed.summary()["wait"]["max"] == 0 and round(fixed.usage.cloud) == 2 * 1100  # j3 ends at 1100 there
    assert per_job.summary()["wait"]["mean"] == 60 and round(per_job.usage.cloud) == 3 * 60 + 250


def replayed_jobs(log: str) -> list[vp.LoggedJob]:
    return vp.read_job_log(log).jobs


def test_more_jobs_than_max_wait_for_a_slot_and_are_handed_the_freed_vm(tmp_path: Path) -> None:
    # max 1: j2 (at 10) waits in the batch system's queue until j1 ends at 160, then takes its VM
    log = write_log(tmp_path / "queue.swf", [swf_line(1, 0, 100), swf_line(2, 10, 100)])
    replayed = replay(log, max=1)
    assert [(job.claimed, job.vm) for job in replayed.jobs.values()] == [(60, "sim-0001"), (160, "sim-0001")]
    wait = vp.replay_outcome(replayed).summary()["wait"]
    assert (wait["max"], wait["in_acquire"]) == (150, 30)  # j1 waits 60 s for its boot, j2 none for its VM


@pytest.mark.parametrize(
    "pool, cloud",
    [
        ({"max": 8, "min_free": 1, "idle_timeout": 300}, vp.SimCloudSettings()),
        (
            {"max": 6, "min": 1, "min_free": 2, "idle_timeout": 120, "backoff_initial": 30},
            vp.SimCloudSettings(boot_time=45, boot_failures=0.2, quota=5, seed=3),
        ),
    ],
)
def test_skipping_passes_that_find_nothing_changes_no_decision(
    tmp_path: Path, pool: dict[str, Any], cloud: vp.SimCloudSettings
) -> None:
    log = tmp_path / "generated.swf"
    log.write_text(generate_swf(150, 2, seed=7))
    quick, every = (replay(str(log), cloud, every_pass=flag, **pool) for flag in (False, True))
    assert quick.trace == every.trace and len(quick.trace) > 150
    assert vp.replay_outcome(quick).summary() == vp.replay_outcome(every).summary()
    if cloud.boot_failures:
        assert quick.state.counters.get("failed_boots", 0) > 0


def test_swf_and_csv_give_the_same_jobs_with_their_cores_and_memory(tmp_path: Path) -> None:
    swf = vp.read_job_log(
        write_log(tmp_path / "two.swf", [swf_line(7, 30, 3600, 4, 1048576, 12), swf_line(8, 90, 61, 1, -1, 3)])
    )
    csv = tmp_path / "two.csv"
    csv.write_text(
        "JobID|Submit|Elapsed|AllocCPUS|ReqMem|User\n7|1970-01-01T00:00:30|01:00:00|4|1Gc|u12\n8|90|61|1||u3\n"
    )
    assert vp.read_job_log(str(csv)).jobs == swf.jobs
    assert (swf.jobs[0].cores, swf.jobs[0].memory) == (4, 4096.0)


def test_unknown_run_times_are_skipped_and_counted(tmp_path: Path) -> None:
    log = vp.read_job_log(write_log(tmp_path / "x.swf", [swf_line(1, 0, 10), swf_line(2, 5, -1)]))
    assert [job.job for job in log.jobs] == ["1"] and log.skipped == 1


@pytest.mark.parametrize(
    "name, lines, message",
    [
        ("short.swf", [swf_line(1, 0, 10), "2 5 -1 10 1"], "short.swf:3: 5 fields, an SWF line has 18"),
        (
            "word.swf",
            [swf_line(1, 0, 10), swf_line(2, 5, 10).replace(" 10 ", " ten ", 1)],
            "word.swf:3: field 4 (run time) = 'ten': not a number",
        ),
        ("twice.swf", [swf_line(1, 0, 10), swf_line(1, 5, 10)], "job 1 appears twice"),
        ("bad.csv", ["submit,run,cores", "0,10,1", "5,1:xx,1"], "bad.csv:3: run = '1:xx': expected seconds or"),
        ("nohead.csv", ["when,run", "0,10"], "nohead.csv:1: the header names no submit column"),
    ],
)
def test_a_malformed_log_is_refused_naming_the_line_and_field(
    tmp_path: Path, name: str, lines: list[str], message: str
) -> None:
    path = tmp_path / name
    path.write_text(("; header\n" if name.endswith(".swf") else "") + "\n".join(lines) + "\n")
    result = simulate(str(path))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert str(path) in result.stderr


def test_simulate_prints_the_pool_and_both_baselines_as_text_and_json() -> None:
    text = simulate(str(DATA / "sample.swf"), "--set", "max=8", "--set", "min_free=1")
    assert text.returncode == 0, text.stderr
    assert "fixed 8 VMs" in text.stdout and "one VM per job" in text.stdout and "wait p95" in text.stdout
    report = json.loads(simulate(str(DATA / "sample.swf"), "--set", "max=8", "--json").stdout)
    assert report["schema"] == "vmpool-simulate" and report["jobs"] == 300
    pool = report["pool"]
    assert pool["busy_hours"] == pool["job_hours"] == report["baselines"]["fixed 8 VMs"]["job_hours"]
    assert pool["vm_hours"] < report["baselines"]["fixed 8 VMs"]["vm_hours"]


def test_a_sweep_replays_once_per_value_and_longer_idle_keeps_more_vms() -> None:
    result = simulate(str(DATA / "sample.swf"), "--set", "max=8", "--sweep", "idle_timeout=60,3600", "--json")
    assert result.returncode == 0, result.stderr
    short, long_ = json.loads(result.stdout)["sweep"]["rows"]
    assert (short["value"], long_["value"]) == ("60", "3600")
    assert short["boots"] > long_["boots"] and short["idle_hours"] < long_["idle_hours"]
    assert short["wait"]["mean"] >= long_["wait"]["mean"]
    bad = simulate(str(DATA / "sample.swf"), "--sweep", "flavor=a,b")
    assert bad.returncode == 2 and "not a [pool] setting the replay uses" in bad.stderr


def test_a_plot_is_drawn_with_matplotlib_or_refused_without_it(tmp_path: Path) -> None:
    png = tmp_path / "vms.png"
    result = simulate(str(DATA / "sample.swf"), "--plot", str(png))
    if vp.can_plot():
        assert result.returncode == 0 and png.read_bytes().startswith(b"\x89PNG")
    else:
        assert result.returncode == 2 and "--plot needs matplotlib" in result.stderr and not png.exists()


def test_the_replay_agrees_with_the_real_commands_on_the_local_cloud(pool: PoolHandle, tmp_path: Path) -> None:
    """The same jobs, as the simulator orders them, run by `vmpool acquire/release` on the bed: the
    same VMs booted, each job on the same VM."""
    pool.write_config(pool={"max": 2, "min_free": 0, "idle_timeout": 600})
    # j1 boots a VM; j2 comes while j1 runs and boots a second; j3 waits for a slot (max 2 jobs at
    # once) and takes the VM j2 freed; j4 waits for a slot too, and takes the VM freed last
    log = write_log(
        tmp_path / "four.swf", [swf_line(1, 0, 300), swf_line(2, 100, 100), swf_line(3, 250, 100), swf_line(4, 260, 50)]
    )
    settings = vp.simulation_pool(pool.config_path, [])
    config = vp.Config(path="", pool=settings, openstack=vp.OpenStackConfig(), ssh=vp.SshConfig())
    replayed = vp.Replay(vp.read_job_log(log).jobs, config, vp.SimCloudSettings(boot_time=60)).run()
    steps = [(what, job) for _, what, _, job in replayed.trace if what in ("acquire", "release", "claim")]
    # each acquire's claim comes before the next call: the real run, one call at a time, cannot race
    assert all(steps[index + 1] == ("claim", job) for index, (what, job) in enumerate(steps) if what == "acquire")
    real: dict[str, str] = {}
    for what, job in steps:
        if what == "acquire":
            address = pool.run("acquire", job, "--user", "u1", "--timeout", "90").stdout.strip()
            real[job] = next(vm["name"] for vm in pool.vms() if vm["address"] == address)
        elif what == "release":
            pool.run("release", job)
    assert real == {name: job.vm for name, job in replayed.jobs.items()}
    assert sorted(real.values()) == [f"{pool.prefix}0001"] * 2 + [f"{pool.prefix}0002"] * 2
    booted = [vm for _, what, vm, _ in replayed.trace if what == "create"]
    assert sorted(server.name for server in pool.servers()) == booted
