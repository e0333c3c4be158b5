"""What a fake of the Cloud protocol answers when it plays one pool alone in its project, with
flavors of one size and no quota in sight (tests/test_pool.py's FakeCloud, bench_reconcile_scale's
ListedCloud): the parts of the protocol those fakes have no use for."""

from __future__ import annotations


class AlonePoolProject:
    def pools_wanting(self) -> frozenset[str]:
        return frozenset()

    def flavor_size(self, flavor: str) -> dict[str, int]:
        return {"vcpus": 1, "ram": 256, "gpus": 0}

    def absolute_limits(self) -> dict[str, int]:
        return {}

    def signal_wanting(self, pool: str, wanting: bool) -> None:
        pass
