"""`make install` as a site runs it (README, "Install on a site"), into a scratch PREFIX, BINDIR and
SYSCONFDIR: a venv with the tested dependency versions, the command on PATH, the config example
kept private, completion, and the cron.d file a site copies into place."""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, VMPOOL, PoolHandle
from tests.torque_node import Mom
from tests.vm_classes import use_classes

# one worker: every install builds in the repository's build/ directory
pytestmark = pytest.mark.xdist_group("install")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("site")
    dirs = {"PREFIX": base / "opt" / "vmpool", "BINDIR": base / "bin", "SYSCONFDIR": base / "etc"}
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install", *(f"{k}={v}" for k, v in dirs.items())],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return dirs


def test_the_command_is_on_path_and_runs_as_a_module_too(site: dict[str, Path]) -> None:
    import vmpool

    on_path = subprocess.run([str(site["BINDIR"] / "vmpool"), "--version"], capture_output=True, text=True)
    as_module = subprocess.run(
        [str(site["PREFIX"] / "bin" / "python"), "-m", "vmpool", "--version"], capture_output=True, text=True
    )
    assert on_path.stdout == as_module.stdout == f"vmpool, version {vmpool.__version__}\n"


def test_the_venv_holds_the_dependency_versions_the_tests_ran_with(site: dict[str, Path]) -> None:
    pinned = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    frozen = subprocess.run(
        [str(site["PREFIX"] / "bin" / "pip"), "freeze"], capture_output=True, text=True, check=True
    ).stdout
    installed = dict(line.split("==") for line in frozen.splitlines() if "==" in line)
    for name in ("click", "filelock", "python-novaclient", "keystoneauth1", "fabric", "paramiko"):
        assert installed[name] == pinned[name], name


def test_the_config_example_lands_private_and_an_existing_config_is_kept(site: dict[str, Path]) -> None:
    config = site["SYSCONFDIR"] / "vmpool" / "vmpool.conf"
    assert config.read_text() == (ROOT / "vmpool.conf.example").read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    config.write_text(config.read_text() + "\n# the site's own edit\n")
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install", *(f"{k}={v}" for k, v in site.items())],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert config.read_text().endswith("# the site's own edit\n"), "a second install overwrote the config"


def test_bash_completion_completes_subcommands(site: dict[str, Path]) -> None:
    script = site["SYSCONFDIR"] / "bash_completion.d" / "vmpool"
    # what bash does on TAB once the script is sourced: calls its function (with the command
    # name) and COMP_WORDS set
    probe = (
        f"source {script}; COMP_WORDS=(vmpool rec); COMP_CWORD=1; PATH={site['BINDIR']}:$PATH; "
        "_vmpool_completion vmpool; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    completed = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert completed.stdout.split() == ["reconcile"]


def test_the_cron_d_line_runs_reconcile_as_root_every_minute_with_the_installed_config(site: dict[str, Path]) -> None:
    lines = [
        line
        for line in (site["PREFIX"] / "share" / "vmpool" / "cron.d" / "vmpool").read_text().splitlines()
        if line and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert len(lines) == 1
    fields = lines[0].split(None, 6)
    assert fields[:6] == ["*", "*", "*", "*", "*", "root"]
    config = site["SYSCONFDIR"] / "vmpool" / "vmpool.conf"
    assert fields[6].startswith(f"{site['BINDIR']}/vmpool --config {config} reconcile ")
    assert not (site["PREFIX"] / "share" / "vmpool" / "systemd").exists(), "one way to schedule reconcile: cron.d"


def test_the_command_on_path_reads_the_installed_config_unless_told_otherwise(
    site: dict[str, Path], tmp_path: Path
) -> None:
    config = site["SYSCONFDIR"] / "vmpool" / "vmpool.conf"
    env = {"PATH": "/usr/bin:/bin"}
    default = subprocess.run([str(site["BINDIR"] / "vmpool"), "status"], capture_output=True, text=True, env=env)
    assert default.returncode == 3 and f" ERROR {config}: " in default.stderr, default.stderr
    other = tmp_path / "other.conf"
    for how in ({"VMPOOL_CONFIG": str(other)}, {}):
        args = [] if how else ["--config", str(other)]
        chosen = subprocess.run(
            [str(site["BINDIR"] / "vmpool"), *args, "status"], capture_output=True, text=True, env={**env, **how}
        )
        assert chosen.returncode == 3 and f" ERROR {other}: no such config file" in chosen.stderr, chosen.stderr
    assert "make install" in (site["BINDIR"] / "vmpool").read_text()


# --- the Torque hooks' installer: the node's np from what the pool holds at once ---


def torque_install(pool: PoolHandle) -> str:
    """What `make install-hooks` prints, as a site runs it for this pool (pbs_mom's home in /tmp)."""
    root = Path(tempfile.mkdtemp(prefix="vmpool-install-", dir="/tmp"))
    root.chmod(0o755)
    try:
        return Mom(root, pool).install.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_torque_install_prints_the_node_s_np_and_classes_from_vmpool_capacity(
    pool: PoolHandle, flavors: dict[str, Any]
) -> None:
    assert "<the node> np=3\n" in torque_install(pool), "one class of 1-vCPU VMs: np = [pool] max, as before"

    use_classes(
        pool, small={"flavor": "cls-1c2g"}, medium={"flavor": "cls-4c8g", "max": 1}, gpu={"flavor": "cls-gpu", "max": 1}
    )
    printed = torque_install(pool)

    assert "('vmpool capacity': 13 cores in 3 VMs)" in printed, printed
    assert "\n<the node> np=13 gpus=1\n" in printed, printed
    assert "--set CLASSES=small:1:2048:0+medium:4:8192:0+gpu:8:32768:1\n" in printed, printed
    assert "np = the pool's max" not in printed


def test_without_a_cloud_the_torque_install_says_how_to_get_the_node_s_np(pool: PoolHandle) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        pool.write_config(openstack={"auth_url": f"http://127.0.0.1:{probe.getsockname()[1]}/v3"})

    printed = torque_install(pool)

    assert "vmpool cannot\ntell them now (" in printed, printed
    assert f"run '{VMPOOL} --config {pool.config_path} capacity' where the cloud is\nreachable" in printed
    assert "np=" not in printed
