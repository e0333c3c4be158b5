"""The Nova adapter's reading of what Nova answers, over recorded answers (no HTTP).

What only an exact sequence of pages can show: the listing's paging over the real Nova API is
exercised end to end in test_promises.py (pages of one server, the bed's api max_limit).
"""

from __future__ import annotations

from typing import Any

import vmpool as vp
from tests.test_policy import config


def raw(server_id: str, status: str, pool: str = "p") -> dict[str, Any]:
    return {"id": server_id, "name": f"p-{server_id}", "status": status,
            "metadata": {vp.METADATA_POOL_KEY: pool, vp.METADATA_VM_KEY: f"p-{server_id}"},
            "addresses": {"net": [{"addr": "127.0.1.7"}]}}


class RecordedNova:
    """novaclient's raw client as NovaCloud uses it: get(url) -> (response, body), one page per call."""

    def __init__(self, pages: list[dict[str, Any]]):
        self.pages = pages
        self.urls: list[str] = []
        self.client = self

    def get(self, url: str) -> tuple[None, dict[str, Any]]:
        self.urls.append(url)
        return None, self.pages[len(self.urls) - 1]


def test_a_server_listed_on_two_pages_counts_once_as_the_later_page_shows_it() -> None:
    # Nova lists a server still being scheduled from its build request; with such a request as the
    # marker, the next page holds every instance, this server included once it reached its cell.
    nova = RecordedNova([
        {"servers": [raw("a", "BUILD"), raw("b", "BUILD")],
         "servers_links": [{"rel": "next", "href": "http://nova.example:8774/v2.1/servers/detail?marker=b"}]},
        {"servers": [raw("a", "ACTIVE"), raw("c", "ACTIVE"), raw("x", "ACTIVE", pool="other")]},
    ])
    cloud = vp.NovaCloud(config())
    cloud._nova = nova

    servers = cloud.list_servers()

    assert sorted((s.id, s.status) for s in servers) == [
        ("a", vp.SERVER_ACTIVE), ("b", vp.SERVER_BUILDING), ("c", vp.SERVER_ACTIVE)]
    assert [url.split("?")[1] for url in nova.urls] == ["name=%5Ep%5C-", "marker=b&name=%5Ep%5C-"]
