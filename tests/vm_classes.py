"""VM classes on the bed, for the test modules that use them (test_classes, test_slurm): four
flavors of different sizes made on the bed's real Nova, and a pool's config naming classes of them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import PoolHandle

# flavor ID -> vCPUs, RAM (MiB), extra specs: made once per bed, as an admin would
FLAVORS = {
    "cls-1c2g": (1, 2048, {}),
    "cls-4c8g": (4, 8192, {}),
    "cls-8c32g": (8, 32768, {}),
    "cls-gpu": (8, 32768, {"resources:VGPU": "1"}),
}


@pytest.fixture(scope="session")
def flavors(bed: Any) -> dict[str, Any]:
    nova = bed.admin_nova()
    have = {flavor.id for flavor in nova.flavors.list(is_public=None)}
    for flavor_id, (vcpus, ram, specs) in FLAVORS.items():
        if flavor_id not in have:
            made = nova.flavors.create(flavor_id, ram, vcpus, 1, flavorid=flavor_id)
            if specs:
                made.set_keys(specs)
    return FLAVORS


def use_classes(pool: PoolHandle, **classes: dict[str, Any]) -> None:
    """Name the pool's classes ([pool] min and min_free move into them)."""
    for key in ("min", "min_free"):
        pool.settings["pool"].pop(key, None)
    for section in [name for name in pool.settings if name.startswith("class ")]:
        del pool.settings[section]
    for name, values in classes.items():
        pool.settings[f"class {name}"] = values
    pool.write_config()


SIZES = {
    "small": {"flavor": "cls-1c2g"},
    "medium": {"flavor": "cls-4c8g"},
    "big": {"flavor": "cls-8c32g"},
    "gpu": {"flavor": "cls-gpu"},
}


def flavor_of(pool: PoolHandle, server_id: str) -> str:
    return str(pool.bed.admin_nova().servers.get(server_id).flavor["original_name"])
