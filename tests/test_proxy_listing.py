"""Tags lists and referrers read from the upstream (issue 9, item 3): whole bodies however they arrive,
the upstream's `Link` pages followed to the end but never without bounds, and an answer too large to hold
refused clearly (or replaced by what is cached).
"""

from __future__ import annotations

import os

import pytest

from mirror.upstream.client import JSON_BODY_LIMIT, LIST_MAX_PAGES, next_link
from tests.fake_upstream import OCI_MANIFEST, FakeUpstream, Fault
from tests.proxy_helpers import base_url, metric_value, metrics_text, start_mirror
from tests.registry_helpers import error_codes

BIG_PAGES = {"limits": {"page_size_max": 100_000}}  # the mirror's own pages: all of it in one answer


def many_tags(count: int) -> list[str]:
    return [f"1.{i // 1000}.{i % 1000}-build{i:06d}" for i in range(count)]


async def tags_through(client, repo: str = "library/app") -> list[str]:
    async with client.get(f"/v2/{repo}/tags/list?n=100000") as response:
        assert response.status == 200, await response.text()
        return (await response.json())["tags"]


async def test_a_tags_list_sent_in_small_pieces_arrives_whole(aiohttp_server, make_registry):
    fake = FakeUpstream(json_piece_bytes=16 << 10, tags_ignore_n=True)
    fake.tags["library/app"] = many_tags(20_000)  # ~0.5 MB of JSON: 30-odd pieces, each read on its own
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, config=BIG_PAGES)

    assert await tags_through(client) == sorted(fake.tags["library/app"])
    assert fake.count("GET", "/tags/list") == 1


@pytest.mark.parametrize("absolute", [False, True], ids=["relative-link", "absolute-link"])
async def test_a_paginated_tags_list_is_followed_to_its_last_page(aiohttp_server, make_registry, absolute):
    fake = FakeUpstream(absolute_links=absolute)
    fake.tags["library/app"] = many_tags(25_000)  # the mirror asks for 10,000 a page: three pages
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, config=BIG_PAGES)

    assert await tags_through(client) == sorted(fake.tags["library/app"])
    assert fake.count("GET", "/tags/list") == 3


async def test_paginated_referrers_are_gathered_from_every_page(aiohttp_server, make_registry):
    fake = FakeUpstream(referrers_page_size=2)
    subject = "sha256:" + "ab" * 32
    descriptors = [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + f"{i:02x}" * 32, "size": 100 + i,
         "artifactType": "application/vnd.example.sbom" if i % 2 else "application/vnd.example.sig"}
        for i in range(5)
    ]
    fake.referrers[("library/app", subject)] = descriptors
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    async with client.get(f"/v2/library/app/referrers/{subject}") as response:
        assert response.status == 200
        listed = (await response.json(content_type=None))["manifests"]
    assert [d["digest"] for d in listed] == [d["digest"] for d in descriptors]
    assert fake.count("GET", "/referrers/") == 3


@pytest.mark.parametrize("pieces", [None, 256 << 10], ids=["with-length", "chunked"])
async def test_a_tags_list_larger_than_the_cap_is_refused_or_served_stale(aiohttp_server, make_registry, pieces):
    fake = FakeUpstream(json_piece_bytes=pieces)
    fake.add_image("library/app", "1.0", [os.urandom(100)])
    fake.faults["/tags/list"] = Fault("pad", size=JSON_BODY_LIMIT)  # valid JSON, only too big
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    async with client.get("/v2/library/app/tags/list") as response:
        assert response.status == 502
        body = await response.json()
    assert body["errors"][0]["code"] == "UPSTREAM_INVALID"
    assert "larger than 8 MiB" in body["errors"][0]["message"]

    async with client.get("/v2/library/app/manifests/1.0") as response:  # now one tag is cached
        assert response.status == 200
    async with client.get("/v2/library/app/tags/list") as response:
        assert response.status == 200
        assert (await response.json())["tags"] == ["1.0"]
    text = await metrics_text(client)
    assert metric_value(text, "mirror_cache_lookups_total", kind="tags", result="stale") == 1
    assert metric_value(text, "mirror_upstream_errors_total", reason="too_large") == 2


async def test_next_links_that_loop_or_never_end_are_followed_a_bounded_number_of_times(aiohttp_server, make_registry):
    fake = FakeUpstream()
    fake.add_image("library/app", "1.0", [b"a"])
    fake.add_image("library/endless", "1.0", [b"b"])
    # library/app: page one links to page two, which links back to page one.
    # library/endless: every page links to a page never seen before.

    def next_page(query: str) -> str:
        if "page=" not in query:
            return "/v2/library/app/tags/list?page=2"
        return "/v2/library/app/tags/list?n=10000"

    fake.tags_next = next_page
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    assert await tags_through(client) == ["1.0"]
    assert fake.count("GET", "/v2/library/app/tags/list") == 2  # the loop was noticed, not walked again

    fake.tags_next = lambda query: f"/v2/library/endless/tags/list?page={int(query.rpartition('=')[2] or 0) + 1}"
    assert await tags_through(client, "library/endless") == ["1.0"]
    assert fake.count("GET", "/v2/library/endless/tags/list") == LIST_MAX_PAGES
    text = await metrics_text(client)
    assert metric_value(text, "mirror_upstream_errors_total", reason="link_loop") == 1


async def test_a_next_link_to_another_origin_is_not_followed(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True)
    fake.tags["library/app"] = ["1.0", "2.0"]
    elsewhere = FakeUpstream()
    elsewhere.tags["library/app"] = ["evil"]
    other = await aiohttp_server(elsewhere.app())
    # A host name other than the upstream's: the mirror's token must not go there, nor its requests.
    fake.tags_next = lambda query: f"{base_url(other, 'localhost')}/v2/library/app/tags/list?n=10000&last=2.0"
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    assert await tags_through(client) == ["1.0", "2.0"]
    assert sum(elsewhere.requests.values()) == 0
    assert metric_value(await metrics_text(client), "mirror_upstream_errors_total", reason="link_refused") == 1


async def test_tags_that_are_not_tags_never_reach_clients(aiohttp_server, make_registry):
    fake = FakeUpstream()
    fake.tags["library/app"] = ["1.0", "x" * 129, "../../etc", "-bad", "1.1"]
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    assert await tags_through(client) == ["1.0", "1.1"]


async def test_an_upstream_that_breaks_mid_listing_is_unavailable(aiohttp_server, make_registry):
    fake = FakeUpstream()
    fake.tags["library/app"] = many_tags(100)
    fake.tags_next = lambda query: "/v2/library/app-page-2/tags/list" if "n=" in query else None
    fake.faults["app-page-2"] = Fault("503")  # the second page never comes
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, timeout=2)
    async with client.get("/v2/library/app/tags/list") as response:
        assert response.status == 503  # not the first page passed off as the whole list
        assert await error_codes(response) == ["UNAVAILABLE"]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (['</v2/a/tags/list?n=2&last=b>; rel="next"'], "/v2/a/tags/list?n=2&last=b"),
        (["<https://r.example/v2/a/tags/list?last=b>;rel=next"], "https://r.example/v2/a/tags/list?last=b"),
        (['</first>; rel="first", </next?x=1>; rel="prev next"'], "/next?x=1"),
        (['</p>; rel="prev"', '</n>; title="a"; rel="next"'], "/n"),
        (['</p>; rel="prev"'], None),
        ([], None),
        (["garbage"], None),
    ],
)
def test_next_link_parsing(values: list[str], expected: str | None) -> None:
    assert next_link(values) == expected
