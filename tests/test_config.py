"""Configuration: every error names the file, the key and what is allowed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vmpool as vp

GOOD = """
[pool]
name = p
min = 1
max = 3
state_file = /var/lib/vmpool/state.json

[openstack]
auth_url = http://127.0.0.1:5000/v3
username = u
password = secret
project_name = p
image = img
flavor = 1
network = net
metadata = site=x, owner=hpc

[ssh]
private_key = /etc/vmpool/key
"""


def write(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "vmpool.conf"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    config = vp.load_config(write(tmp_path, GOOD))
    assert (config.pool.min, config.pool.max, config.pool.min_free) == (1, 3, 1)
    assert config.openstack.metadata == (("site", "x"), ("owner", "hpc"))
    assert config.server_prefix == "p-" and config.ssh.port == 22


def test_the_example_needs_only_cloud_set_to_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site sets `cloud =` (or auth_url and a credential): nothing in the example stands in its way."""
    for variable in ("OS_CLOUD", "OS_AUTH_URL"):
        monkeypatch.delenv(variable, raising=False)
    example = (Path(__file__).parent.parent / "vmpool.conf.example").read_text()
    with pytest.raises(vp.ConfigError, match=r"\[openstack\] no cloud credentials: set cloud = NAME"):
        vp.load_config(write(tmp_path, example))
    config = vp.load_config(write(tmp_path, example.replace("\ncloud =\n", "\ncloud = site\n", 1)))
    assert config.pool.name == "vmpool" and vp.credentials_source(config.openstack).endswith("(clouds.yaml)")
    uncommented = example.replace(
        "\n#auth_url = https://keystone.example.org:5000/v3\n#username = vmpool\n#password =\n#project_name = vmpool\n",
        "\nauth_url = https://keystone.example."
        "org:5000/v3\nusername = vmpool\npassword = s3cret\nproject_name = vmpool\n",
        1,
    )
    assert vp.load_config(write(tmp_path, uncommented)).openstack.password == "s3cret"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("min = 1", "min = 5"), r"\[pool\] min = 5: must be <= max \(3\)"),
        (("max = 3", "max = three"), r"\[pool\] max = 'three': expected a whole number"),
        (("[pool]", "[pool]\nbuild_timeout = -1"), r"build_timeout = -1.0: must be > 0"),
        (("[pool]", "[pool]\ncolour = blue"), r"\[pool\] unknown key 'colour'"),
        (("image = img\n", ""), r"\[openstack\] image is required"),
        (("[ssh]", "[sshd]"), r"unknown section"),
        (("username = u\n", "username = u\napplication_credential_id = x\n"), "exactly one"),
        (("state_file = /var/lib/vmpool/state.json", "state_file = state.json"), "absolute path"),
        (("metadata = site=x, owner=hpc", "metadata = nonsense"), "key=value"),
        (("name = p", "name = p;rm"), r"\[pool\] name = 'p;rm'"),
        (("[pool]", "[pool]\njob_gone_exit_codes = 153, 0"), r"job_gone_exit_codes = \(153, 0\): exit codes 1-255"),
        (("[pool]", "[pool]\njob_gone_grace = -5"), r"job_gone_grace = -5.0: must be >= 0"),
        (("[pool]", "[pool]\nbackoff_initial = 0"), r"backoff_initial = 0.0: must be > 0"),
        (
            ("[pool]", "[pool]\nbackoff_initial = 100\nbackoff_max = 50"),
            r"backoff_max = 50.0: must be >= backoff_initial",
        ),
        (("network = net", "network = net\napi_timeout = 0"), r"\[openstack\] api_timeout = 0.0: must be > 0"),
        (("[ssh]", "[ssh]\nprobe_parallelism = 0"), r"\[ssh\] probe_parallelism = 0: must be >= 1"),
    ],
)
def test_invalid_config_names_file_key_and_allowed(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(vp.ConfigError, match=message) as caught:
        vp.load_config(path)
    assert str(caught.value).startswith(path) and caught.value.exit_code == 3


def test_world_readable_password_is_refused(tmp_path: Path) -> None:
    with pytest.raises(vp.ConfigError, match="chmod 600"):
        vp.load_config(write(tmp_path, GOOD, mode=0o644))


def test_missing_and_garbage_config(tmp_path: Path) -> None:
    with pytest.raises(vp.ConfigError, match="no such config file"):
        vp.load_config(str(tmp_path / "absent.conf"))
    with pytest.raises(vp.ConfigError, match="not a valid INI"):
        vp.load_config(write(tmp_path, "just words\n"))
    with pytest.raises(vp.ConfigError, match=r"cannot read config: .*Is a directory"):
        vp.load_config(str(tmp_path))
    binary = tmp_path / "binary.conf"
    binary.write_bytes(b"[pool]\nname = \xff\n")
    with pytest.raises(vp.ConfigError, match=r"cannot read config: .*utf-8"):
        vp.load_config(str(binary))


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("not really a key")
    key.chmod(0o644)
    path = write(tmp_path, GOOD.replace("private_key = /etc/vmpool/key", f"private_key = {key}"))
    with pytest.raises(vp.ConfigError, match=r"private_key .* accessible by group/others \(mode 0644\)"):
        vp.load_config(path)
    key.chmod(0o600)
    assert vp.load_config(path).ssh.private_key == str(key)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("[check]\nwait_critical = ten", r"\[check\] wait_critical = 'ten': expected a Nagios range"),
        ("[check]\nprotected = loud", r"\[check\] protected = 'loud': one of ok, warning, critical"),
        ("[metrics]\ntextfile = /tmp/vmpool.txt", r"\[metrics\] textfile = .*ending in \.prom"),
        ("[logging]\nfacility = kernel", r"\[logging\] facility = 'kernel': one of auth"),
        ("[logging]\nsyslog = maybe", r"\[logging\] syslog = 'maybe': expected true or false"),
    ],
)
def test_operations_sections_are_validated(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(vp.ConfigError, match=message):
        vp.load_config(write(tmp_path, GOOD + "\n" + section + "\n"))


def test_operations_sections_load(tmp_path: Path) -> None:
    # a textfile in a missing directory loads: every command warns of it, `verify` fails on it
    text = (
        GOOD + "\n[check]\nwait_critical = @10:20\n[metrics]\ntextfile = /nonexistent-dir/v.prom\n"
        "[logging]\nsyslog = yes\n"
    )
    config = vp.load_config(write(tmp_path, text))
    assert (config.check.wait_critical, config.metrics.textfile, config.logging.syslog) == (
        "@10:20",
        "/nonexistent-dir/v.prom",
        True,
    )


# --- a config, and the programs it names, that are not root's alone: root runs what they say ---
# The clouds.yaml set-up: no secret in vmpool.conf, so a file others may read (mode 0664).
NO_SECRET = GOOD.replace(
    "auth_url = http://127.0.0.1:5000/v3\nusername = u\npassword = secret\nproject_name = p\n", "cloud = site\n"
)


def test_a_config_others_can_change_is_refused_naming_the_path_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path, NO_SECRET, mode=0o664)
    with pytest.raises(
        vp.ConfigError,
        match=rf"others can change {path} \(owner uid 0, mode 0664\).*"
        rf"run: chown root:root {path}; chmod go-w {path}$",
    ):
        vp.load_config(path)
    os.chmod(path, 0o644)
    os.chown(path, 1000, 1000)
    with pytest.raises(vp.ConfigError, match=rf"others can change {path} \(owner uid 1000, mode 0644\)"):
        vp.load_config(path)
    os.chown(path, 0, 0)
    for mode in (0o775, 0o757):  # a directory above it others can write: they can swap the file
        tmp_path.chmod(mode)
        with pytest.raises(vp.ConfigError, match=rf"others can change {tmp_path} \(owner uid 0, mode 0{mode:o}\)"):
            vp.load_config(path)
    tmp_path.chmod(0o1777)  # sticky, as /tmp: no one else can replace root's file in it
    assert vp.load_config(path).openstack.cloud == "site"


def test_a_config_reached_through_a_symlink_is_checked_where_it_lives(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    link = tmp_path / "vmpool.conf"
    link.symlink_to(write(shared, NO_SECRET, mode=0o644))
    with pytest.raises(vp.ConfigError, match=rf"others can change {shared} \(owner uid 0, mode 0777\)"):
        vp.load_config(str(link))


@pytest.mark.parametrize("setting", ["[pool]\njob_alive_command = {program} {{jobid}}", "[batch]\ncommand = {program}"])
def test_a_program_the_config_makes_root_run_must_be_roots_alone(tmp_path: Path, setting: str) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    program = tools / "alive"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    section, line = setting.format(program=program).split("\n")
    path = write(
        tmp_path, GOOD.replace(section, f"{section}\n{line}") if section in GOOD else f"{GOOD}\n{section}\n{line}\n"
    )
    assert vp.load_config(path)
    program.chmod(0o757)
    with pytest.raises(
        vp.ConfigError,
        match=rf"root runs .*{program}.*others can change {program} \(owner uid 0, "
        rf"mode 0757\).*chmod go-w {program}$",
    ):
        vp.load_config(path)
    program.chmod(0o755)
    os.chown(tools, 1000, 1000)
    with pytest.raises(vp.ConfigError, match=rf"others can change {tools} \(owner uid 1000, mode 0755\)"):
        vp.load_config(path)


def test_a_job_alive_command_on_path_is_checked_where_path_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD.replace("[pool]", "[pool]\njob_alive_command = test -e /x/{jobid}", 1))
    assert vp.load_config(path).pool.job_alive_command  # /usr/bin/test: root's
    shared = tmp_path / "bin"
    shared.mkdir()
    (shared / "test").write_text("#!/bin/sh\n")
    (shared / "test").chmod(0o777)
    monkeypatch.setenv("PATH", f"{shared}:/usr/bin:/bin")
    with pytest.raises(vp.ConfigError, match=rf"job_alive_command \({shared}/test\).*mode 0777"):
        vp.load_config(path)
