"""An upstream served over TLS, like every real registry: the blob bodies (read in threads over blocking
connections) and everything else (aiohttp) trust the same CAs, a private CA is configured with
`ca_file`, an untrusted certificate is refused rather than ignored, and stopping mid-download over TLS
is as prompt as over plain TCP; a redirect from https to http on the same host never carries credentials."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.fake_upstream import FakeUpstream, Fault, upstream_config
from tests.proxy_helpers import assert_stopping_mid_download_is_prompt, fills_settled, metric_value, metrics_text
from tests.support.fixtures import MirrorFactory
from tests.support.mux import ProtocolMux
from tests.support.tls import PrivateCA, make_private_ca

MiB = 1 << 20


@pytest.fixture
def private_ca(tmp_path: Path) -> PrivateCA:
    return make_private_ca(tmp_path / "ca")


async def _tls_upstream(aiohttp_server, fake: FakeUpstream, ca: PrivateCA) -> str:
    server = await aiohttp_server(fake.app(), ssl=ca.server_context())
    url = f"https://127.0.0.1:{server.port}"
    fake.realm = f"{url}/token"
    return url


async def test_pull_through_a_tls_upstream_with_a_private_ca_and_token_auth(
    aiohttp_server, make_registry, private_ca: PrivateCA
) -> None:
    fake = FakeUpstream(require_token=True)
    layers = [os.urandom(3 * MiB), os.urandom(5 * MiB)]
    _, manifest = fake.add_image("library/app", "1", layers)
    url = await _tls_upstream(aiohttp_server, fake, private_ca)
    client = await make_registry(
        upstreams=[upstream_config(url, library_prefix=True, ca_file=str(private_ca.ca_file))]
    )

    async with client.get("/v2/app/manifests/1") as response:
        assert response.status == 200
        assert await response.read() == manifest
    for layer in layers:
        digest = fake.add_blob(layer)
        async with client.get(f"/v2/app/blobs/{digest}") as response:
            assert response.status == 200
            assert await response.read() == layer
        # The second pull of the same layer is a cache hit: one upstream GET per blob.
        async with client.get(f"/v2/app/blobs/{digest}") as response:
            assert await response.read() == layer
        assert fake.count("GET", digest) == 1
    await fills_settled(client)
    assert metric_value(await metrics_text(client), "mirror_fills_total", result="ok") == 2


async def test_an_untrusted_upstream_certificate_is_refused(aiohttp_server, make_registry, private_ca) -> None:
    fake = FakeUpstream()
    layer = os.urandom(64 << 10)
    digest = fake.add_blob(layer)
    fake.add_image("library/app", "1", [layer])
    url = await _tls_upstream(aiohttp_server, fake, private_ca)
    client = await make_registry(upstreams=[upstream_config(url, library_prefix=True)])  # no ca_file

    for path in ("/v2/app/manifests/1", f"/v2/app/blobs/{digest}"):
        async with client.get(path) as response:
            assert response.status == 503, path
            assert "UNAVAILABLE" in await response.text()
    assert fake.count("GET", digest) == 0  # the handshake failed: no request ever reached it


async def test_stopping_mid_download_over_tls_is_prompt(aiohttp_server, make_registry, private_ca) -> None:
    fake = FakeUpstream()
    layer = os.urandom(4 * MiB)
    digest = fake.add_blob(layer)
    fake.faults[digest] = Fault("stall", delay=60)
    url = await _tls_upstream(aiohttp_server, fake, private_ca)
    client = await make_registry(
        upstreams=[upstream_config(url, library_prefix=True, timeout=60, ca_file=str(private_ca.ca_file))]
    )
    response = await client.get(f"/v2/library/app/blobs/{digest}")
    assert response.status == 200
    await assert_stopping_mid_download_is_prompt(client, fake, digest, len(layer))


# -- https -> http on the same host ------------------------------------------------------------------
MuxFactory = Callable[[int, int], Awaitable[int]]


@pytest.fixture
async def protocol_mux() -> AsyncIterator[MuxFactory]:
    """Start a ProtocolMux (one port, TLS to one server, plain HTTP to another); stopped after the test."""
    started: list[ProtocolMux] = []

    async def start(tls_port: int, plain_port: int) -> int:
        mux = ProtocolMux(tls_port, plain_port)
        started.append(mux)
        return await mux.start()

    yield start
    for mux in started:
        await mux.close()


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
async def test_a_same_host_redirect_from_https_to_http_carries_no_credentials(
    aiohttp_server, make_registry, private_ca: PrivateCA, protocol_mux: MuxFactory, scheme: str
) -> None:
    """`https://host/...` answering `307 http://host/...` (a TLS proxy in front of a registry that does not
    know it is behind one): same host and port as written, but anyone on the path reads plain http.
    Manifests (aiohttp) and blobs (blocking connections) alike follow it without Authorization."""
    user, password = "mirror-bot", "s3cret"
    fake = FakeUpstream(require_token=scheme == "bearer", require_basic=scheme == "basic",
                        username=user, password=password)
    layers = [os.urandom(200_000), os.urandom(70_000)]
    _, manifest = fake.add_image("team/app", "1", layers)
    tls_server = await aiohttp_server(fake.app(), ssl=private_ca.server_context())
    plain_server = await aiohttp_server(fake.cdn_app())  # plain http: manifests by path, blobs under /cdn/
    port = await protocol_mux(tls_server.port, plain_server.port)
    fake.realm = f"https://127.0.0.1:{port}/token"
    fake.redirect_blobs_to = fake.redirect_manifests_to = f"http://127.0.0.1:{port}"
    client = await make_registry(upstreams=[upstream_config(
        f"https://127.0.0.1:{port}", ca_file=str(private_ca.ca_file), username=user, password=password)])

    async with client.get("/v2/team/app/manifests/1") as response:
        assert response.status == 200, await response.text()
        assert await response.read() == manifest
    for layer in layers:
        async with client.get(f"/v2/team/app/blobs/{fake.add_blob(layer)}") as response:
            assert response.status == 200
            assert await response.read() == layer

    # Everything was served over http on the same host:port, and none of it saw the credentials.
    assert len(fake.cdn_requests) == 1 + 2  # the manifest and the two layers
    assert [headers.get("Authorization") for headers in fake.cdn_requests] == [None] * 3
    # Over https they were sent, as the upstream asked: a token, or the configured user's password.
    sent = {auth for _, path, auth in fake.authorizations if path.startswith("/v2/team/app/") and auth}
    if scheme == "bearer":
        assert sent and all(auth.startswith("Bearer ") for auth in sent)
    else:
        assert sent == {"Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_an_upstream_without_ca_file_is_trusted_through_the_system_cas_by_both_transports(
    aiohttp_server, mirror_factory: MirrorFactory, private_ca: PrivateCA, tmp_path: Path
) -> None:
    # No TLS context is made at start-up for such an upstream (aiohttp's default one serves requests, the
    # blob transport makes its own at its first https connection): both must still trust what the
    # system trusts, here the private CA through SSL_CERT_FILE, as a container's CA bundle would.
    fake = FakeUpstream(require_token=True)
    layer = os.urandom(2 * MiB)
    _, manifest = fake.add_image("library/app", "1", [layer])
    digest = fake.add_blob(layer)
    url = await _tls_upstream(aiohttp_server, fake, private_ca)
    mirror = mirror_factory(
        {"storage": {"path": str(tmp_path / "data")}, "upstreams": [upstream_config(url, library_prefix=True)]},
        env={**os.environ, "SSL_CERT_FILE": str(private_ca.ca_file)},
    )
    async with aiohttp.ClientSession(base_url=mirror.url) as session:
        async with session.get("/v2/app/manifests/1") as response:
            assert response.status == 200
            assert await response.read() == manifest
        async with session.get(f"/v2/app/blobs/{digest}") as response:
            assert response.status == 200
            assert await response.read() == layer
    assert fake.count("GET", digest) == 1
