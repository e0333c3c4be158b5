"""The Nova adapter's reading of what Nova answers, over recorded answers (no HTTP).

What only an exact sequence of pages can show: the listing's paging over the real Nova API is
exercised end to end in test_cloud_listing.py (pages of one server, the bed's api max_limit).
"""

from __future__ import annotations

from typing import Any

import pytest

import vmpool as vp
from tests.policy_builders import config


def raw(server_id: str, status: str, pool: str = "p") -> dict[str, Any]:
    return {
        "id": server_id,
        "name": f"p-{server_id}",
        "status": status,
        "metadata": {vp.METADATA_POOL_KEY: pool, vp.METADATA_VM_KEY: f"p-{server_id}"},
        "addresses": {"net": [{"addr": "127.0.1.7"}]},
    }


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
    nova = RecordedNova(
        [
            {
                "servers": [raw("a", "BUILD"), raw("b", "BUILD")],
                "servers_links": [{"rel": "next", "href": "http://nova.example:8774/v2.1/servers/detail?marker=b"}],
            },
            {"servers": [raw("a", "ACTIVE"), raw("c", "ACTIVE"), raw("x", "ACTIVE", pool="other")]},
        ]
    )
    cloud = vp.NovaCloud(config())
    cloud._nova = nova

    servers = cloud.list_servers()

    assert sorted((s.id, s.status) for s in servers) == [
        ("a", vp.SERVER_ACTIVE),
        ("b", vp.SERVER_BUILDING),
        ("c", vp.SERVER_ACTIVE),
    ]
    assert nova.urls == ["/servers/detail", "/servers/detail?marker=b"]
    assert not servers.complete, "pages after the first leave a down cell's servers out"


def test_one_unfiltered_page_is_complete_and_keeps_a_down_cells_servers() -> None:
    # Nova 2.69+ lists a down cell's servers by id alone, only when a listing has no filter and no paging
    nova = RecordedNova(
        [
            {
                "servers": [
                    {"id": "d", "status": "UNKNOWN", "tenant_id": "t", "links": []},
                    raw("a", "ACTIVE"),
                    raw("x", "ACTIVE", pool="other"),
                ]
            }
        ]
    )
    cloud = vp.NovaCloud(config())
    cloud._nova = nova

    servers = cloud.list_servers()

    assert nova.urls == ["/servers/detail"], "a name filter would leave the down cell's servers out"
    assert sorted((s.id, s.status) for s in servers) == [("a", vp.SERVER_ACTIVE), ("d", vp.SERVER_UNKNOWN)]
    assert servers.complete


class Answering:
    """A NovaCloud whose create meets one answer of Nova's, as novaclient raises it."""

    auth_url = "http://127.0.0.1:5000/v3"

    def __init__(self, error: Exception, retry_after: str | None = None):
        self.error = error
        self.retry_after = retry_after

    def last_retry_after(self) -> str | None:
        return self.retry_after

    @vp.translate_cloud_errors
    def create_server(self) -> str:
        raise self.error


def nova_answer(code: int, message: str) -> Exception:
    from novaclient import exceptions as nova_exc

    error: Exception = nova_exc.from_response(
        type("Response", (), {"status_code": code, "headers": {}})(),
        {"fault": {"message": message}},
        "/servers",
        "POST",
    )
    return error


# What Nova 34's create answers (nova/api/openstack/compute/servers.py, nova/exception.py), and proxies before it
@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        (403, "Quota exceeded for instances: Requested 1, but already used 10 of 10 instances", vp.QuotaExceeded),
        (403, "Maximum number of ports exceeded", vp.QuotaExceeded),  # Neutron's port quota
        (403, "The number of defined ports: 12 is over the limit: 10", vp.QuotaExceeded),
        (403, "Quota exceeded for cores: Requested 4, but already used 96 of 100 cores", vp.QuotaExceeded),
        (413, "Request Entity Too Large", vp.QuotaExceeded),  # the older Nova's over-quota answer
        (429, "Rate limit exceeded", vp.QuotaExceeded),  # a rate limiter before the API
        (403, "Policy doesn't allow os_compute_api:servers:create to be performed.", vp.CloudRefused),
        (403, "Only volume-backed servers are allowed for flavors with zero disk.", vp.CloudRefused),
        (400, "Can not find requested image", vp.CloudRefused),
        (400, "Flavor's disk is too small for requested image.", vp.CloudRefused),
        (401, "The request you have made requires authentication.", vp.CloudRefused),
        (500, "Unexpected API Error.", vp.CloudError),  # may have created the server: a failed boot
        (503, "Service Unavailable", vp.CloudError),
    ],
)
def test_novas_refusals_are_told_apart_by_what_nova_answers(code: int, message: str, kind: type) -> None:
    with pytest.raises(vp.CloudError) as raised:
        Answering(nova_answer(code, message)).create_server()
    assert type(raised.value) is kind and message in str(raised.value)


def test_a_limit_refusal_carries_its_retry_after_in_seconds_or_as_an_http_date() -> None:
    import email.utils
    import time

    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    for header, low, high in (("30", 30, 30), (in_a_minute, 55, 60), (None, 0, 0), ("soon", 0, 0)):
        with pytest.raises(vp.QuotaExceeded) as raised:
            Answering(nova_answer(429, "Rate limit exceeded"), header).create_server()
        assert low <= raised.value.retry_after <= high, header
    assert vp.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", time.time()) == 0  # past: no wait
