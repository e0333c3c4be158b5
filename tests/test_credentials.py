"""Cloud credentials the OpenStack way, end to end over the bed's Keystone and Nova: a clouds.yaml
entry (with its password in secure.yaml, or an application credential), and an openrc's OS_*
variables, each read by OpenStack's own loader (openstacksdk's openstack.config)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PoolHandle, wait_until

IDENTITY = ("auth_url", "username", "password", "user_domain_name", "project_name", "project_domain_name")


def without_credentials(pool: PoolHandle) -> None:
    """The pool's config with no credentials of its own (the bed's sections come with a password)."""
    for key in IDENTITY:
        pool.settings["openstack"].pop(key, None)
    pool.settings["openstack"].pop("region_name", None)
    pool.settings["openstack"].pop("interface", None)
    pool.write_config()


def clean_env() -> dict[str, str]:
    """This process's environment without OS_* (the tests' own must not leak in)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("OS_")}


def write_clouds(directory: Path, clouds: dict[str, Any], secure: dict[str, Any] | None = None) -> None:
    # JSON is YAML: clouds.yaml and secure.yaml as the loader finds them in the working directory
    (directory / "clouds.yaml").write_text(json.dumps({"clouds": clouds}))
    if secure is not None:
        (directory / "secure.yaml").write_text(json.dumps({"clouds": secure}))


def password_auth(info: dict[str, Any], with_password: bool = True) -> dict[str, Any]:
    auth = {
        "auth_url": info["auth_url"],
        "username": info["username"],
        "project_name": info["project_name"],
        "user_domain_name": info["user_domain_name"],
        "project_domain_name": info["project_domain_name"],
    }
    return {**auth, "password": info["password"]} if with_password else auth


def test_a_clouds_yaml_entry_with_its_password_in_secure_yaml_runs_the_pool(pool: PoolHandle, tmp_path: Path) -> None:
    info = pool.bed.info
    write_clouds(
        tmp_path,
        {
            "site": {
                "auth": password_auth(info, with_password=False),
                "region_name": info["region_name"],
                "interface": "public",
            }
        },
        secure={"site": {"auth": {"password": info["password"]}}},
    )
    without_credentials(pool)
    pool.write_config(openstack={"cloud": "site"})

    checked = pool.run("verify", cwd=tmp_path, env=clean_env())
    assert f"ok      [openstack] cloud = site (clouds.yaml): authenticated at {info['auth_url']}" in checked.stdout

    address = pool.run("acquire", "51", "--user", "alice", cwd=tmp_path, env=clean_env()).stdout.strip()
    assert pool.vms("busy")[0]["address"] == address and len(pool.servers()) == 1


def test_a_clouds_yaml_entry_with_an_application_credential(pool: PoolHandle, tmp_path: Path) -> None:
    info = pool.bed.info
    write_clouds(
        tmp_path,
        {
            "appcred": {
                "auth_type": "v3applicationcredential",
                "region_name": info["region_name"],
                "auth": {
                    "auth_url": info["auth_url"],
                    "application_credential_id": info["application_credential_id"],
                    "application_credential_secret": info["application_credential_secret"],
                },
            }
        },
    )
    without_credentials(pool)
    pool.write_config(pool={"min": 1}, openstack={"cloud": "appcred"})
    env = {**clean_env(), "OS_CLIENT_CONFIG_FILE": str(tmp_path / "clouds.yaml")}  # another place it may be

    def booted() -> Any:
        pool.run("reconcile", env=env)
        return pool.vms("free")

    wait_until(booted, 120, "a Free VM booted with the application credential", interval=0.3)

    assert pool.run("verify", env=env).returncode == 0
    assert len(pool.servers()) == 1


def test_an_openrcs_os_variables_serve_when_the_config_names_no_credentials(pool: PoolHandle) -> None:
    info = pool.bed.info
    without_credentials(pool)
    openrc = {
        "OS_AUTH_URL": info["auth_url"],
        "OS_USERNAME": info["username"],
        "OS_PASSWORD": info["password"],
        "OS_PROJECT_NAME": info["project_name"],
        "OS_USER_DOMAIN_NAME": info["user_domain_name"],
        "OS_PROJECT_DOMAIN_NAME": info["project_domain_name"],
        "OS_REGION_NAME": info["region_name"],
        "OS_IDENTITY_API_VERSION": "3",
    }

    checked = pool.run("verify", env={**clean_env(), **openrc})
    assert f"the OS_* environment (OS_AUTH_URL={info['auth_url']}): authenticated" in checked.stdout

    refused = pool.run("verify", check=False, env={**clean_env(), **openrc, "OS_PASSWORD": "not-it"})
    assert refused.returncode == 5 and "check OS_USERNAME, OS_PASSWORD" in refused.stdout

    bare = pool.run("status", check=False, env=clean_env())
    assert bare.returncode == 3 and "no cloud credentials: set cloud = NAME" in bare.stderr


@pytest.mark.parametrize(
    ("clouds_yaml", "cloud", "message"),
    [
        ({"site": {"auth": {"auth_url": "http://127.0.0.1:9/v3"}}}, "elsewhere", "Cloud elsewhere was not found"),
        ("clouds: [site: {auth", "site", "Skipping config file"),  # and why: the YAML error's words
    ],
)
def test_a_wrong_cloud_name_or_a_broken_clouds_yaml_is_one_sentence_exit_3(
    pool: PoolHandle, tmp_path: Path, clouds_yaml: Any, cloud: str, message: str
) -> None:
    if isinstance(clouds_yaml, dict):
        write_clouds(tmp_path, clouds_yaml)
    else:
        (tmp_path / "clouds.yaml").write_text(clouds_yaml)
    without_credentials(pool)
    pool.write_config(openstack={"cloud": cloud})
    for command in (["reconcile"], ["verify"]):
        result = pool.run(*command, check=False, cwd=tmp_path, env=clean_env())
        assert result.returncode == 3, (command, result.stderr)
        assert message in result.stderr and f"[openstack] cloud = {cloud}" in result.stderr
        assert len([line for line in result.stderr.splitlines() if "ERROR" in line]) == 1, result.stderr


def test_a_cloud_name_with_a_typo_is_told_the_clouds_that_exist(pool: PoolHandle, tmp_path: Path) -> None:
    write_clouds(tmp_path, {"site": {"auth": password_auth(pool.bed.info)}, "test": {}})
    without_credentials(pool)
    pool.write_config(openstack={"cloud": "stie"})
    env = {**clean_env(), "OS_CLIENT_CONFIG_FILE": str(tmp_path / "clouds.yaml")}
    for command in (["reconcile"], ["acquire", "52"], ["verify"]):
        result = pool.run(*command, check=False, env=env)
        assert result.returncode == 3, (command, result.stderr)
        assert f"Cloud stie was not found.; {tmp_path}/clouds.yaml has cloud(s) site, test" in result.stderr


def test_a_cloud_and_credentials_of_the_config_at_once_are_refused(pool: PoolHandle) -> None:
    pool.write_config(openstack={"cloud": "site"})  # the bed's username and password are still there
    result = pool.run("status", check=False)
    assert result.returncode == 3
    assert "cloud = 'site' takes the credentials from clouds.yaml; leave auth_url, username, password" in result.stderr
