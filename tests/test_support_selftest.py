"""Proves the real-client harness in tests/support/ is real.

Images built in pure Python round-trip through the real distribution registry
with digests intact; the token server enforces Docker Hub's anonymous/private
split and records who sent credentials; dockerd runs the image; dockerd and
containerd pull through a registry mirror (a distribution proxy stands in for
the mirror here). Tests that need binaries skip without them, or fail under
MIRROR_REQUIRE_REAL_CLIENTS=1.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support import skopeo
from tests.support.distribution import DistributionRegistry
from tests.support.dockerd import DockerDaemon, write_hosts_dir
from tests.support.fixtures import DockerDaemonFactory, MirrorFactory, RegistryFactory
from tests.support.images import (
    MEDIA_TYPES,
    BuiltImage,
    build_busybox_image,
    build_multiarch_image,
    host_arch,
    layout_digests,
    top_manifest,
    verify_layout,
)
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import (
    CommandFailed,
    ManagedProcess,
    ProcessDied,
    free_port,
    http_status,
    require_tool,
    wait_http,
)
from tests.support.token_server import TokenRequest, TokenServer, parse_scope

pytest_plugins = ["tests.support.fixtures"]

REGISTRY_TOOLS = ("skopeo", "docker-registry")


# -- pure Python: images, token server, process plumbing ---------------------------


def test_images_are_deterministic_and_valid(tmp_path: Path) -> None:
    a = build_busybox_image(tmp_path / "a", seed=7, extra_layers=[1000, 5000])
    b = build_busybox_image(tmp_path / "b", seed=7, extra_layers=[1000, 5000])
    c = build_busybox_image(tmp_path / "c", seed=8, extra_layers=[1000, 5000])
    assert a.all_digests == b.all_digests
    assert a.digest != c.digest
    # The busybox layer is shared across seeds; the random layers are not.
    assert a.layer_digests[0] == c.layer_digests[0]
    assert set(a.layer_digests[1:]).isdisjoint(c.layer_digests[1:])
    for image in (a, c):
        verify_layout(image.layout)
        assert layout_digests(image.layout, image.tag) == image.all_digests
        assert image.host_manifest.runnable and len(image.host_manifest.layers) == 3


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_multiarch_image_shape(tmp_path: Path, media: str) -> None:
    image = build_multiarch_image(tmp_path / "m", media=media)  # type: ignore[arg-type]
    types = MEDIA_TYPES[media]
    assert image.is_index and image.media_type == types.index
    assert {m.platform for m in image.manifests} == {"linux/amd64", "linux/arm64"}
    assert image.manifest_for(f"linux/{host_arch()}").runnable
    digest, raw = top_manifest(image.layout, image.tag)
    assert digest == image.index_digest
    index = json.loads(raw)
    assert index["mediaType"] == types.index
    assert [d["digest"] for d in index["manifests"]] == list(image.manifest_digests)
    verify_layout(image.layout)
    assert layout_digests(image.layout, image.tag) == image.all_digests
    assert image.ref.startswith("oci:" if media == "oci" else "dir:")


def _get_token(
    server: TokenServer, scope: str, creds: tuple[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    url = f"{server.realm}?service={server.service}&scope={scope}"
    request = urllib.request.Request(url)
    if creds is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(creds).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {}


def test_token_server_policy_and_record() -> None:
    with TokenServer() as server:
        status, body = _get_token(server, "repository:library/alpine:pull,push")
        assert status == 200 and body["token"] == body["access_token"] and body["expires_in"] == 300
        cert = x509.load_pem_x509_certificate(server.cert_path.read_bytes())
        header = jwt.get_unverified_header(body["token"])
        assert header["alg"] == "ES256" and header["x5c"] and header["kid"]
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        claims = jwt.decode(body["token"], public_key, algorithms=["ES256"], audience=server.service)
        assert claims["iss"] == server.issuer
        assert claims["access"] == [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}]

        status, body = _get_token(server, "repository:private/secret:pull")
        claims = jwt.decode(body["token"], options={"verify_signature": False})
        assert status == 200 and claims["access"][0]["actions"] == []

        status, body = _get_token(server, "repository:private/secret:pull,push", server.creds)
        claims = jwt.decode(body["token"], options={"verify_signature": False})
        assert claims["access"][0]["actions"] == ["pull", "push"] and claims["sub"] == server.username

        assert _get_token(server, "repository:x/y:pull", (server.username, "wrong"))[0] == 401

        record = server.requests
        assert [r.status for r in record] == [200, 200, 200, 401]
        assert [r.basic for r in record] == [False, False, True, True]
        server.reset()
        assert server.count == 0
    access = parse_scope("repository:127.0.0.1:5000/a/b:pull")
    assert access is not None and access.name == "127.0.0.1:5000/a/b" and access.actions == ("pull",)


def test_process_wrapper_and_tool_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    server = ManagedProcess(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], name="http", log_dir=tmp_path
    )
    with server:
        assert wait_http(f"http://127.0.0.1:{port}/", 10, proc=server) == 200
        pid = server.pid
    assert not server.running and server.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    dying = ManagedProcess([sys.executable, "-c", "raise SystemExit(3)"], name="dying", log_dir=tmp_path).start()
    with pytest.raises(ProcessDied):
        wait_http(f"http://127.0.0.1:{free_port()}/", 10, proc=dying)

    monkeypatch.delenv("MIRROR_REQUIRE_REAL_CLIENTS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool("no-such-binary-for-mirror-tests")
    monkeypatch.setenv("MIRROR_REQUIRE_REAL_CLIENTS", "1")
    with pytest.raises(pytest.fail.Exception):
        require_tool("no-such-binary-for-mirror-tests")


FAKE_MIRROR = """\
import http.server, sys, yaml
config = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
host, port = config["listen"].rsplit(":", 1)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(401 if self.path == "/v2/" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer((host, int(port)), Handler).serve_forever()
"""


def test_mirror_process_wrapper_against_a_stand_in(tmp_path: Path, mirror_factory: MirrorFactory) -> None:
    """start/restart/kill by pid, same config and port; the real mirror is tested elsewhere."""
    with pytest.raises(ValueError):
        MirrorProcess({"listen": "0.0.0.0:5000"})
    # A fake interpreter that ignores "-m mirror" and serves /v2/ with 401 like an auth-enabled mirror.
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_MIRROR}")
    fake.chmod(0o755)
    mirror = mirror_factory({"storage": {"root": str(tmp_path / "data")}}, python=str(fake))
    first_pid, port = mirror.pid, mirror.port
    assert http_status(f"{mirror.url}/v2/") == 401
    assert "storage" in mirror.config_path.read_text()
    mirror.restart()
    assert mirror.pid != first_pid and mirror.port == port and http_status(f"{mirror.url}/v2/") == 401
    mirror.kill()
    assert not mirror.running
    mirror.start()
    assert mirror.running


# -- the real distribution registry and skopeo -------------------------------------


@dataclass(frozen=True)
class Seeded:
    registry: DistributionRegistry
    public: BuiltImage  # at library/busybox:1
    private: BuiltImage  # at private/secret:1
    push_requests: list[TokenRequest]


@pytest.fixture(scope="module")
def seeded(
    upstream_registry: DistributionRegistry, token_server: TokenServer, busybox_image: BuiltImage,
    multiarch_image: BuiltImage,
) -> Seeded:
    """The token-auth upstream with busybox at library/busybox:1 and the multi-arch image at private/secret:1."""
    require_tool("skopeo")
    token_server.reset()
    upstream_registry.push(busybox_image, "library/busybox:1", creds=token_server.creds)
    upstream_registry.push(multiarch_image, "private/secret:1", creds=token_server.creds)
    return Seeded(upstream_registry, busybox_image, multiarch_image, token_server.requests)


@pytest.mark.real
@pytest.mark.needs_tools(*REGISTRY_TOOLS)
def test_push_with_credentials(seeded: Seeded) -> None:
    assert seeded.push_requests, "pushing to a token-auth registry must ask the token server"
    assert all(r.basic and r.user == "mirror-test" and r.status == 200 for r in seeded.push_requests)
    assert any("push" in a.actions for r in seeded.push_requests for a in r.granted)
    raw = skopeo.inspect_raw(seeded.registry.ref("library/busybox:1"))
    assert skopeo.sha256_of(raw) == seeded.public.digest


@pytest.mark.real
@pytest.mark.needs_tools(*REGISTRY_TOOLS)
def test_anonymous_pull_of_public_image_keeps_digests(
    seeded: Seeded, fresh_token_server: TokenServer, tmp_path: Path
) -> None:
    seeded.registry.pull_layout("library/busybox:1", tmp_path / "pulled")
    verify_layout(tmp_path / "pulled")
    assert layout_digests(tmp_path / "pulled", "1") == seeded.public.all_digests
    record = fresh_token_server.requests
    assert record and all(r.authorization is None and r.user is None for r in record)


@pytest.mark.real
@pytest.mark.needs_tools(*REGISTRY_TOOLS)
def test_private_image_needs_credentials(seeded: Seeded, fresh_token_server: TokenServer, tmp_path: Path) -> None:
    ref = seeded.registry.ref("private/secret:1")
    with pytest.raises(skopeo.SkopeoError, match="(?i)denied|unauthorized|authentication required"):
        skopeo.inspect_raw(ref)
    anonymous = fresh_token_server.requests
    assert anonymous and not any(r.had_credentials for r in anonymous)
    assert all(a.actions == () for r in anonymous for a in r.granted)

    fresh_token_server.reset()
    creds = fresh_token_server.creds
    assert skopeo.sha256_of(skopeo.inspect_raw(ref, creds)) == seeded.private.index_digest
    seeded.registry.pull_layout("private/secret:1", tmp_path / "pulled", creds=creds)
    assert layout_digests(tmp_path / "pulled", "1") == seeded.private.all_digests
    with_creds = fresh_token_server.requests
    assert with_creds and all(r.basic and r.status == 200 for r in with_creds)


@pytest.mark.real
@pytest.mark.needs_tools(*REGISTRY_TOOLS)
def test_docker_media_types_round_trip(open_registry: DistributionRegistry, tmp_path: Path) -> None:
    image = build_multiarch_image(tmp_path / "docker-multi", media="docker", seed=3, extra_layers=[2048])
    open_registry.push(image, "team/docker-multi:1")
    raw = skopeo.inspect_raw(open_registry.ref("team/docker-multi:1"))
    assert json.loads(raw)["mediaType"] == MEDIA_TYPES["docker"].index
    assert skopeo.sha256_of(raw) == image.digest
    # An OCI layout can't hold Docker manifests without conversion; dir: can.
    skopeo.copy(open_registry.ref("team/docker-multi:1"), f"dir:{tmp_path / 'pulled'}")
    assert layout_digests(tmp_path / "pulled") == image.all_digests


@pytest.mark.real
@pytest.mark.needs_tools(*REGISTRY_TOOLS)
def test_proxy_mode_registry_pulls_private_upstream_with_credentials(
    seeded: Seeded, fresh_token_server: TokenServer, registry_factory: RegistryFactory
) -> None:
    proxy = registry_factory.proxy_of(seeded.registry.url, *fresh_token_server.creds)
    raw = skopeo.inspect_raw(proxy.ref("private/secret:1"))  # anonymous towards the proxy
    assert skopeo.sha256_of(raw) == seeded.private.index_digest
    assert fresh_token_server.requests and all(r.basic for r in fresh_token_server.requests)


# -- dockerd and containerd ---------------------------------------------------------


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.needs_tools("dockerd", "docker", "skopeo")
def test_dockerd_loads_and_runs_busybox(docker_daemon: DockerDaemon, busybox_image: BuiltImage) -> None:
    name = docker_daemon.load(busybox_image, "selftest/busybox:1")
    assert busybox_image.marker in docker_daemon.run_image(name)
    assert docker_daemon.run_image(name, "/bin/busybox", "echo", "hi").strip() == "hi"


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.needs_tools("dockerd", "docker", "ctr", *REGISTRY_TOOLS)
def test_docker_and_containerd_pull_through_a_mirror(
    seeded: Seeded,
    fresh_token_server: TokenServer,
    registry_factory: RegistryFactory,
    docker_daemon_factory: DockerDaemonFactory,
    tmp_path: Path,
) -> None:
    # A distribution proxy of the token-auth upstream stands in for the mirror.
    mirror = registry_factory.proxy_of(seeded.registry.url, *fresh_token_server.creds)
    daemon = docker_daemon_factory(mirror_url=mirror.url)

    daemon.docker("pull", "busybox:1")  # docker.io/library/busybox:1, only reachable via the mirror
    repo_digests = daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}", "busybox:1").stdout
    assert f"busybox@{seeded.public.digest}" in repo_digests.decode()
    assert seeded.public.marker in daemon.run_image("busybox:1")

    hosts = write_hosts_dir(tmp_path / "hosts", mirror.url, "docker.io")
    daemon.ctr_pull("docker.io/private/secret:1", hosts)
    listing = daemon.ctr("images", "ls").stdout.decode()
    assert "docker.io/private/secret:1" in listing and seeded.private.digest in listing


@pytest.mark.real
@pytest.mark.needs_tools("dockerd", "docker", "ctr")
def test_fallback_to_docker_hub_is_blackholed(docker_daemon: DockerDaemon, tmp_path: Path) -> None:
    """A pull the mirror can't serve must fail here at once, never reach the internet."""
    result = docker_daemon.docker("pull", "alpine:3.20", check=False, timeout=30)
    assert result.returncode != 0 and b"127.0.0.1:1" in result.stderr
    hosts = write_hosts_dir(tmp_path / "hosts", f"http://127.0.0.1:{free_port()}", "docker.io")
    with pytest.raises(CommandFailed, match="127.0.0.1:1"):
        docker_daemon.ctr_pull("docker.io/library/alpine:3.20", hosts, timeout=30)
