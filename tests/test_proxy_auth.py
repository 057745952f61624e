"""Upstream authentication: Docker's Bearer token flow, Basic challenges, where credentials may travel
(realm policy, CVE-2026-33540) and redirects to a CDN that must never see the Authorization header.
"""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from mirror.upstream.auth import RealmPolicy, RealmRefused, parse_challenge, same_origin
from mirror.upstream.client import TOKEN_BODY_LIMIT
from tests.fake_upstream import FakeUpstream, Fault, upstream_config
from tests.proxy_helpers import base_url, metric_value, metrics_text, start_mirror

USER, PASSWORD = "mirror-bot", "s3cret"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


async def _pull_image(client, repo: str, tag: str, fake: FakeUpstream) -> None:
    """Manifest by tag, then every blob it references, as a client pulling an image would."""
    async with client.get(f"/v2/{repo}/manifests/{tag}") as response:
        assert response.status == 200, await response.text()
        manifest = await response.json(content_type=None)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        async with client.get(f"/v2/{repo}/blobs/{descriptor['digest']}") as response:
            assert response.status == 200
            assert await response.read() == fake.blobs[descriptor["digest"]]


async def test_anonymous_bearer_flow_and_token_cached_per_scope(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True)
    fake.add_image("library/alpine", "3.20", [os.urandom(5000), os.urandom(7000)])
    fake.add_image("library/busybox", "1", [os.urandom(3000)])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=0.1)

    await _pull_image(client, "library/alpine", "3.20", fake)
    assert len(fake.token_requests) == 1  # one token for manifest, config and both layers
    assert "Authorization" not in fake.token_requests[0]  # anonymous: nothing configured, nothing sent
    assert all(auth and auth.startswith("Bearer ") for _, _, auth in fake.authorizations[1:])

    # A second pull (past the tag TTL, so the upstream is asked again) reuses the cached token.
    await asyncio.sleep(0.15)
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 200
    assert fake.count("HEAD", "/manifests/3.20") == 1
    assert len(fake.token_requests) == 1

    # Another repository is another scope: its own token.
    await _pull_image(client, "library/busybox", "1", fake)
    assert len(fake.token_requests) == 2


async def test_concurrent_requests_share_one_token_request(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True)
    layers = [os.urandom(2000 + i) for i in range(6)]
    fake.add_image("library/alpine", "3.20", layers)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    digests = [fake.add_blob(layer) for layer in layers]

    async def get(digest: str) -> bytes:
        async with client.get(f"/v2/library/alpine/blobs/{digest}") as response:
            return await response.read()

    assert await asyncio.gather(*(get(d) for d in digests)) == layers
    assert len(fake.token_requests) == 1


async def test_token_expiring_mid_pull_is_refreshed_once(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True)
    layer = os.urandom(9000)
    fake.add_image("library/alpine", "3.20", [layer])
    layer_digest = fake.add_blob(layer)
    fake.faults[f"/blobs/{layer_digest}"] = Fault("expire-tokens", times=1)
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    await _pull_image(client, "library/alpine", "3.20", fake)
    assert len(fake.token_requests) == 2
    assert fake.count("GET", layer_digest) == 2  # the 401 and the retry with the fresh token


async def test_refused_token_is_an_error_not_a_loop(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True)
    fake.add_image("library/alpine", "3.20", [b"layer"])
    fake.faults["/token"] = Fault("refuse-token")
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 404
    assert len(fake.token_requests) == 1
    assert fake.count("GET", "/manifests/3.20") == 1


async def test_credentials_go_to_a_realm_on_the_upstreams_own_host(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True, username=USER, password=PASSWORD)
    fake.add_image("team/private-app", "v1", [b"secret layer"])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, username=USER, password=PASSWORD)
    await _pull_image(client, "team/private-app", "v1", fake)
    assert fake.token_requests[0].get("Authorization") == BASIC
    # The registry itself only ever sees the token, never the password.
    assert all(auth != BASIC for _, _, auth in fake.authorizations)


async def test_loopback_realm_on_another_host_name_is_refused(aiohttp_server, make_registry):
    """`localhost` is not `127.0.0.1`: an unconfigured loopback realm is never contacted."""
    fake = FakeUpstream(require_token=True, username=USER, password=PASSWORD)
    fake.add_image("team/private-app", "v1", [b"secret layer"])
    server = await aiohttp_server(fake.app())
    fake.realm = f"{base_url(server, 'localhost')}/token"
    client = await make_registry(
        upstreams=[upstream_config(base_url(server), username=USER, password=PASSWORD)]
    )
    async with client.get("/v2/team/private-app/manifests/v1") as response:
        assert response.status == 404
    assert fake.token_requests == []
    assert fake.count("GET", "/manifests/v1") == 1  # no pointless second try without credentials
    text = await metrics_text(client)
    assert metric_value(text, "mirror_upstream_errors_total", reason="realm_refused") == 1


async def test_realm_listed_in_auth_hosts_gets_credentials(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True, username=USER, password=PASSWORD)
    fake.add_image("team/private-app", "v1", [b"secret layer"])
    server = await aiohttp_server(fake.app())
    fake.realm = f"{base_url(server, 'localhost')}/token"
    client = await make_registry(
        upstreams=[
            upstream_config(
                base_url(server), username=USER, password=PASSWORD, auth_hosts=[f"localhost:{server.port}"]
            )
        ]
    )
    await _pull_image(client, "team/private-app", "v1", fake)
    assert [r.get("Authorization") for r in fake.token_requests] == [BASIC]


async def test_basic_challenge(aiohttp_server, make_registry):
    fake = FakeUpstream(require_basic=True, username=USER, password=PASSWORD)
    fake.add_image("library/alpine", "3.20", [os.urandom(4000), os.urandom(4000)])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, username=USER, password=PASSWORD)
    await _pull_image(client, "library/alpine", "3.20", fake)
    assert fake.token_requests == []
    sent = [auth for _, _, auth in fake.authorizations]
    # One challenge, then the credentials go along with every request to that upstream.
    assert sent[0] is None
    assert sent[1:] == [BASIC] * (len(sent) - 1)
    assert sent.count(None) == 1


async def test_basic_challenge_without_credentials_is_not_found(aiohttp_server, make_registry):
    fake = FakeUpstream(require_basic=True, username=USER, password=PASSWORD)
    fake.add_image("library/alpine", "3.20", [b"layer"])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 404
    assert fake.count("GET", "/manifests/3.20") == 1


async def test_blob_redirect_to_another_host_is_followed_without_authorization(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True)
    layer = os.urandom(300_000)
    fake.add_image("library/alpine", "3.20", [layer])
    layer_digest = fake.add_blob(layer)
    cdn = await aiohttp_server(fake.cdn_app())
    fake.redirect_blobs_to = base_url(cdn, "localhost")
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    await _pull_image(client, "library/alpine", "3.20", fake)
    assert fake.count("GET", f"/blobs/{layer_digest}") == 1
    assert len(fake.cdn_requests) == 2  # config and layer
    assert all("Authorization" not in headers for headers in fake.cdn_requests)
    blob_gets = [auth for method, path, auth in fake.authorizations if method == "GET" and "/blobs/" in path]
    assert blob_gets and all(auth and auth.startswith("Bearer ") for auth in blob_gets)


# -- the realm policy on its own (no network) --------------------------------------------------------
@pytest.mark.parametrize(
    ("upstream", "auth_hosts", "realm", "expected"),
    [
        ("https://registry-1.docker.io", (), "https://auth.docker.io/token", False),  # contacted, no credentials
        ("https://registry-1.docker.io", ("auth.docker.io",), "https://auth.docker.io/token", True),
        ("https://ghcr.io", (), "https://ghcr.io/token", True),
        ("https://ghcr.io", (), "http://ghcr.io/token", RealmRefused),  # https -> http downgrade
        ("https://ghcr.io", (), "http://127.0.0.1:8080/token", RealmRefused),
        ("https://ghcr.io", (), "http://169.254.169.254/latest/meta-data", RealmRefused),
        ("https://ghcr.io", (), "https://[::1]/token", RealmRefused),
        ("http://127.0.0.1:5000", (), "http://localhost:5000/token", RealmRefused),
        ("http://127.0.0.1:5000", ("localhost:5000",), "http://localhost:5000/token", True),
        ("http://127.0.0.1:5000", (), "http://127.0.0.1:9999/token", True),
        ("https://ghcr.io", (), "file:///etc/passwd", RealmRefused),
    ],
)
def test_realm_policy(upstream: str, auth_hosts: tuple[str, ...], realm: str, expected: object) -> None:
    policy = RealmPolicy(upstream, auth_hosts)
    if expected is RealmRefused:
        with pytest.raises(RealmRefused):
            policy.check(realm)
    else:
        assert policy.check(realm) is expected


def test_parse_challenge() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert challenge is not None
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.params["scope"] == "repository:library/alpine:pull"
    basic = parse_challenge('Basic realm="fake"')
    assert basic is not None and basic.scheme == "basic"
    assert parse_challenge("") is None


async def test_token_service_outage_serves_cached_tags_as_stale(aiohttp_server, make_registry):
    """auth.docker.io down is Docker Hub down: the cached copy beats a 404 that sends clients away."""
    fake = FakeUpstream(require_token=True)
    fake.add_image("library/alpine", "3.20", [b"layer"])
    client, _ = await start_mirror(aiohttp_server, make_registry, fake, tag_ttl=0.1)
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        manifest = await response.read()
    fake.tokens.clear()  # every token the mirror holds is now refused
    fake.faults["/token"] = Fault("503")
    await asyncio.sleep(0.15)
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 200
        assert await response.read() == manifest
    async with client.get("/v2/library/busybox/manifests/latest") as response:
        assert response.status == 503  # not cached: "unavailable", not "unknown"
    text = await metrics_text(client)
    assert metric_value(text, "mirror_cache_lookups_total", kind="tag", result="stale") == 1


async def test_rate_limited_token_service_is_429(aiohttp_server, make_registry):
    fake = FakeUpstream(require_token=True)
    fake.add_image("library/alpine", "3.20", [b"layer"])
    fake.faults["/token"] = Fault("429", retry_after="12")
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)
    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "12"


@pytest.mark.parametrize(
    ("upstream", "auth_hosts", "target", "refused"),
    [
        ("https://registry-1.docker.io", (), "https://production.cloudflare.docker.com/blob", False),
        ("https://registry-1.docker.io", (), "http://169.254.169.254/latest/meta-data", True),
        ("https://registry-1.docker.io", (), "http://127.0.0.1:5000/v2/", True),
        ("https://registry-1.docker.io", (), "http://[fe80::1]/x", True),
        ("https://registry-1.docker.io", ("127.0.0.1:9000",), "http://127.0.0.1:9000/blob", False),
        ("https://registry-1.docker.io", (), "file:///etc/passwd", True),
        ("http://127.0.0.1:5000", (), "http://localhost:9000/cdn/x", False),  # an internal upstream may
    ],
)
def test_redirect_policy(upstream: str, auth_hosts: tuple[str, ...], target: str, refused: bool) -> None:
    policy = RealmPolicy(upstream, auth_hosts)
    if refused:
        with pytest.raises(RealmRefused):
            policy.check_redirect(target)
    else:
        policy.check_redirect(target)


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("https://registry.example/v2/a", "https://registry.example:443/v2/b?x=1", True),
        ("https://Registry.Example/v2/", "https://registry.example/v2/", True),
        ("http://registry.example/v2/", "http://registry.example:80/x", True),
        ("https://registry.example/v2/", "http://registry.example/v2/", False),  # same host:port as written
        ("https://registry.example/v2/", "https://registry.example:8443/v2/", False),
        ("https://registry.example/v2/", "https://cdn.registry.example/v2/", False),
        ("https://registry.example/v2/", "https://registry.example:bad/v2/", False),
    ],
)
def test_credentials_travel_only_within_one_origin(first: str, second: str, same: bool) -> None:
    assert same_origin(first, second) is same


@pytest.mark.parametrize("pieces", [None, 64 << 10], ids=["with-length", "chunked"])
async def test_a_token_answer_larger_than_the_cap_is_refused_clearly(aiohttp_server, make_registry, pieces):
    fake = FakeUpstream(require_token=True, json_piece_bytes=pieces)
    fake.add_image("library/alpine", "3.20", [b"layer"])
    fake.faults["/token"] = Fault("pad", size=TOKEN_BODY_LIMIT)  # a valid token, buried in 1 MiB of spaces
    client, _ = await start_mirror(aiohttp_server, make_registry, fake)

    async with client.get("/v2/library/alpine/manifests/3.20") as response:
        assert response.status == 502
        error = (await response.json())["errors"][0]
    assert error["code"] == "UPSTREAM_INVALID"
    assert "token endpoint's answer is larger than 1 MiB" in error["message"]
    assert len(fake.token_requests) == 1  # not retried: the same answer would come again
    assert fake.count("GET", "/manifests/") == 1  # only the request that was challenged
