"""Access control and TLS with the programs users run: Docker Engine and skopeo over HTTPS.

The mirror serves HTTPS with a test CA, users come from an htpasswd file, and its upstream is the real
distribution registry with token auth (the mirror keeps its own upstream credentials).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.auth_helpers import hashed
from tests.support import skopeo
from tests.support.distribution import DistributionRegistry
from tests.support.dockerd import DockerDaemon
from tests.support.fixtures import DockerDaemonFactory, MirrorFactory
from tests.support.images import BuiltImage
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import CommandFailed, free_port
from tests.support.slow_link import SlowLink
from tests.support.tls import PrivateCA, make_client_cert, make_private_ca
from tests.support.token_server import Creds, TokenServer

pytestmark = [pytest.mark.real, pytest.mark.slow]

USERS = {"alice": "alice-secret", "ops": "ops-secret"}
CERTS_D = Path("/etc/docker/certs.d")


@dataclass
class Secured:
    mirror: MirrorProcess
    ca: PrivateCA
    cert_dir: Path  # containers/image's --cert-dir: the CA as ca.crt
    mirrored_repo: str  # an image in the upstream, pulled through the mirror as docker.io/<repo>


def secured_mirror(
    mirror_factory: MirrorFactory, tmp_path: Path, upstream: DistributionRegistry, upstream_creds: Creds,
    challenge: str = "bearer", token_ttl: str = "5m", mutual: bool = False, leeway: str = "0s",
) -> Secured:
    ca = make_private_ca(tmp_path / "tls")
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    shutil.copy(ca.ca_file, cert_dir / "ca.crt")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{user}:{hashed(pw)}\n" for user, pw in USERS.items()))
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "storage": {"path": str(tmp_path / "data")},
        "upstreams": [{"name": "docker.io", "url": upstream.url, "timeout": "10s",
                       "username": upstream_creds[0], "password": upstream_creds[1]}],
        "local": {"repositories": ["team/**", "private/**", "other/**"]},
        "tls": {"cert": str(ca.cert_file), "key": str(ca.key_file),
                **({"client_ca": str(ca.ca_file)} if mutual else {})},
        "auth": {
            "htpasswd": str(htpasswd),
            "challenge": challenge,
            "groups": {"ci": ["alice"]},
            "token": {"ttl": token_ttl, "leeway": leeway},
            "access": [
                {"repository": "docker.io/**", "anonymous": ["pull"]},
                {"repository": "team/**", "groups": {"ci": ["pull", "push"]}, "users": {"ops": ["*"]}},
                {"repository": "private/**", "users": {"ops": ["*"]}},
            ],
        },
    }
    # containers/image reads client.cert/client.key from its cert dir; the readiness check presents them too.
    client_cert = make_client_cert(ca, cert_dir) if mutual else None
    mirror = mirror_factory(config, tls_ca=ca.ca_file, client_cert=client_cert)
    return Secured(mirror, ca, cert_dir, "")


def push_upstream(upstream: DistributionRegistry, creds: Creds, image: BuiltImage, repo: str) -> None:
    skopeo.copy(image.ref, f"docker://{upstream.host}/{repo}:1", dest_creds=creds)


def skopeo_tls_copy(src: str, dst: str, cert_dir: Path, *, src_creds: str | None = None,
                    dest_creds: str | None = None) -> None:
    """skopeo copy that verifies the mirror's certificate against the test CA (no --tls-verify=false)."""
    args = ["copy", "--quiet", "--all", "--preserve-digests"]
    if src.startswith("docker://"):
        args += ["--src-cert-dir", str(cert_dir), "--src-tls-verify=true"]
        args += ["--src-creds", src_creds] if src_creds else ["--src-no-creds"]
    if dst.startswith("docker://"):
        args += ["--dest-cert-dir", str(cert_dir), "--dest-tls-verify=true"]
        args += ["--dest-creds", dest_creds] if dest_creds else ["--dest-no-creds"]
    skopeo._skopeo([*args, src, dst], timeout=180, what="skopeo copy")


@pytest.fixture
def certs_d_cleanup() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def trust_in_certs_d(daemon: DockerDaemon, secured: Secured, made: list[Path]) -> None:
    """Docker Engine trusts a registry's CA from certs.d/<host:port>/ca.crt."""
    directory = CERTS_D / secured.mirror.host
    directory.mkdir(parents=True, exist_ok=True)
    made.append(directory)
    shutil.copy(secured.ca.ca_file, directory / "ca.crt")


def token_posts(secured: Secured) -> float:
    context = ssl.create_default_context(cafile=str(secured.ca.ca_file))
    with urllib.request.urlopen(f"{secured.mirror.url}/metrics", context=context, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mirror_http_requests_total" and sample.labels.get("endpoint") == "token"
        and sample.labels.get("method") == "POST" and sample.labels.get("status") == "200"
    )


def docker_fails(daemon: DockerDaemon, *args: str, input: bytes | None = None) -> str:
    with pytest.raises(CommandFailed) as failure:
        daemon.docker(*args, input=input)
    return str(failure.value)


@pytest.mark.needs_tools("dockerd", "docker", "skopeo", "docker-registry")
@pytest.mark.parametrize("challenge", ["bearer", "basic"])
def test_docker_login_push_deny_anonymous_pull_logout_over_tls(
    challenge: str, mirror_factory: MirrorFactory, tmp_path: Path, upstream_registry: DistributionRegistry,
    upstream_creds: Creds, busybox_image: BuiltImage, docker_daemon_factory: DockerDaemonFactory,
    unique_repo: Any, certs_d_cleanup: list[Path],
) -> None:
    secured = secured_mirror(mirror_factory, tmp_path, upstream_registry, upstream_creds, challenge)
    host = secured.mirror.host
    mirrored = unique_repo("library/pub")
    push_upstream(upstream_registry, upstream_creds, busybox_image, mirrored)
    skopeo_tls_copy(busybox_image.ref, f"docker://{host}/private/app:1", secured.cert_dir,
                    dest_creds=f"ops:{USERS['ops']}")
    daemon = docker_daemon_factory()
    trust_in_certs_d(daemon, secured, certs_d_cleanup)

    # docker login: Basic directly, or the token flow (a refresh token kept as Docker's identity token).
    out = daemon.docker("login", host, "-u", "alice", "--password-stdin", input=USERS["alice"].encode())
    assert b"Login Succeeded" in out.stdout
    auths = json.loads((Path(daemon.client_env()["DOCKER_CONFIG"]) / "config.json").read_text())["auths"][host]
    assert ("identitytoken" in auths) == (challenge == "bearer")
    failed = docker_fails(daemon, "login", host, "-u", "alice", "--password-stdin", input=b"wrong")
    assert "401" in failed or "unauthorized" in failed.lower()
    daemon.docker("login", host, "-u", "alice", "--password-stdin", input=USERS["alice"].encode())

    daemon.load(busybox_image, f"{host}/team/app:1")
    daemon.docker("push", f"{host}/team/app:1")
    if challenge == "bearer":
        # After login Docker gets every access token with its refresh token (the OAuth2 POST), not the
        # password. (Token lifetimes under 60 s cannot be shown with Docker: it keeps any token for 60 s.)
        assert token_posts(secured) > 0

    daemon.docker("tag", f"{host}/team/app:1", f"{host}/other/app:1")
    denied = docker_fails(daemon, "push", f"{host}/other/app:1")
    assert "denied" in denied.lower(), denied
    if challenge == "basic":  # with Basic the mirror's own message reaches the user
        assert "alice may not push other/app" in denied, denied

    daemon.docker("logout", host)
    if challenge == "bearer":
        # Anonymous pull of a mirrored image. (After a Basic challenge Docker refuses to go on without
        # credentials, "no basic auth credentials": anonymous Docker pulls need the token flow.)
        daemon.docker("pull", f"{host}/docker.io/{mirrored}:1")
        assert "hello-from-mirror" in daemon.run_image(f"{host}/docker.io/{mirrored}:1")
    refused = docker_fails(daemon, "pull", f"{host}/private/app:1")
    if challenge == "bearer":  # with Basic, Docker gives up at the /v2/ challenge already (see above)
        assert any(w in refused.lower() for w in ("denied", "unauthorized", "authentication required")), refused
    log = secured.mirror.log_text(tail=None)
    assert '"action": "push", "repository": "other/app"' in log and '"result": "denied"' in log
    assert "Traceback" not in log


@pytest.mark.needs_tools("skopeo", "docker-registry")
def test_skopeo_with_creds_over_verified_tls(
    mirror_factory: MirrorFactory, tmp_path: Path, upstream_registry: DistributionRegistry,
    upstream_creds: Creds, busybox_image: BuiltImage, fresh_token_server: TokenServer, unique_repo: Any,
) -> None:
    secured = secured_mirror(mirror_factory, tmp_path, upstream_registry, upstream_creds)
    host = secured.mirror.host
    ref = f"docker://{host}/team/sk:1"
    skopeo_tls_copy(busybox_image.ref, ref, secured.cert_dir, dest_creds=f"alice:{USERS['alice']}")
    out = tmp_path / "pulled"
    skopeo_tls_copy(ref, f"oci:{out}:1", secured.cert_dir, src_creds=f"alice:{USERS['alice']}")
    assert json.loads((out / "index.json").read_text())["manifests"][0]["digest"] == busybox_image.digest
    with pytest.raises(skopeo.SkopeoError) as wrong:
        skopeo_tls_copy(ref, f"oci:{tmp_path / 'x'}:1", secured.cert_dir, src_creds="alice:wrong")
    assert "401" in str(wrong.value) or "unauthorized" in str(wrong.value).lower()
    with pytest.raises(skopeo.SkopeoError) as anonymous:
        skopeo_tls_copy(busybox_image.ref, f"docker://{host}/team/anon:1", secured.cert_dir)
    assert "unauthorized" in str(anonymous.value).lower() or "401" in str(anonymous.value)
    # A client's credentials never travel upstream: the mirror asks the upstream's token server as itself.
    mirrored = unique_repo("library/sk")
    push_upstream(upstream_registry, upstream_creds, busybox_image, mirrored)
    fresh_token_server.reset()
    skopeo_tls_copy(f"docker://{host}/docker.io/{mirrored}:1", f"oci:{tmp_path / 'm'}:1", secured.cert_dir,
                    src_creds=f"alice:{USERS['alice']}")
    seen = fresh_token_server.requests
    assert seen and {r.user for r in seen} == {upstream_creds[0]}, [(r.user, r.scopes) for r in seen]
    # The certificate really is checked: without the CA, skopeo refuses the connection.
    with pytest.raises(skopeo.SkopeoError) as untrusted:
        skopeo._skopeo(["inspect", "--raw", "--creds", f"alice:{USERS['alice']}", ref], timeout=60, what="inspect")
    assert "certificate" in str(untrusted.value).lower() or "x509" in str(untrusted.value).lower()


def _https(host: str, port: int, ca: Path) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(host, port, context=ssl.create_default_context(cafile=str(ca)), timeout=10)


@pytest.mark.needs_tools("docker-registry")
def test_sighup_reloads_the_certificate_without_dropping_connections(
    mirror_factory: MirrorFactory, tmp_path: Path, upstream_registry: DistributionRegistry, upstream_creds: Creds,
) -> None:
    secured = secured_mirror(mirror_factory, tmp_path, upstream_registry, upstream_creds)
    port = secured.mirror.port
    kept = _https("127.0.0.1", port, secured.ca.ca_file)
    kept.request("GET", "/v2/")
    first = kept.getresponse()
    first.read()
    assert first.status == 401
    renewed = make_private_ca(tmp_path / "tls2")  # a new CA and leaf: what a renewal swaps in
    shutil.copy(renewed.cert_file, secured.ca.cert_file)
    shutil.copy(renewed.key_file, secured.ca.key_file)
    os.kill(secured.mirror.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        try:
            fresh = _https("127.0.0.1", port, renewed.ca_file)
            fresh.request("GET", "/v2/")
            assert fresh.getresponse().status == 401
            break
        except ssl.SSLError:
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.2)
    kept.request("GET", "/v2/")  # the connection opened before the reload is still served
    assert kept.getresponse().status == 401
    with pytest.raises(ssl.SSLError):
        _https("127.0.0.1", port, secured.ca.ca_file).request("GET", "/v2/")
    # One scheme per listener: plain HTTP on the HTTPS port gets no registry answer.
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        plain.request("GET", "/v2/")
        assert plain.getresponse().status == 400
    except (ConnectionError, http.client.HTTPException):
        pass
    assert secured.mirror.running


@pytest.mark.needs_tools("skopeo", "docker-registry")
def test_client_certificates_are_required_with_a_client_ca(
    mirror_factory: MirrorFactory, tmp_path: Path, upstream_registry: DistributionRegistry, upstream_creds: Creds,
    busybox_image: BuiltImage,
) -> None:
    secured = secured_mirror(mirror_factory, tmp_path, upstream_registry, upstream_creds, mutual=True)
    mirror = secured.mirror
    context = ssl.create_default_context(cafile=str(secured.ca.ca_file))
    context.load_cert_chain(secured.cert_dir / "client.cert", secured.cert_dir / "client.key")
    with_cert = http.client.HTTPSConnection("127.0.0.1", mirror.port, context=context, timeout=5)
    with_cert.request("GET", "/v2/")
    assert with_cert.getresponse().status == 401  # through TLS to the registry, which asks for a login
    with pytest.raises((ssl.SSLError, ConnectionError)):
        without = _https("127.0.0.1", mirror.port, secured.ca.ca_file)
        without.request("GET", "/v2/")
        without.getresponse()
    skopeo_tls_copy(busybox_image.ref, f"docker://{mirror.host}/team/m:1", secured.cert_dir,
                    dest_creds=f"alice:{USERS['alice']}")



def token_requests(mirror: MirrorProcess) -> list[tuple[float, str]]:
    """(seconds since the first, method) of every answered token request in the mirror's access log."""
    stamps = []
    for line in mirror.log_text(tail=None).splitlines():
        if "mirror.access:" in line and " /auth/token " in line and "status=200" in line:
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            stamps.append((stamp, line.split("mirror.access: ", 1)[1].split(" ", 1)[0]))
    return [(stamp - stamps[0][0], method) for stamp, method in stamps] if stamps else []


@pytest.mark.needs_tools("dockerd", "docker", "skopeo", "docker-registry")
def test_docker_renews_an_expired_token_in_the_middle_of_a_pull(
    mirror_factory: MirrorFactory, tmp_path: Path, upstream_registry: DistributionRegistry, upstream_creds: Creds,
    image_factory: Any, docker_daemon_factory: DockerDaemonFactory, certs_d_cleanup: list[Path],
) -> None:
    """A token expires while Docker is still pulling; Docker gets a new one and the pull succeeds.

    The token lives 60 s (what Docker, skopeo and containerd honour: they treat a shorter `expires_in` as
    60 s). Over a link of 16 KiB/s per connection the first three layers (1 MiB each, Docker pulls three
    at a time) take about 64 s, so the last layers are asked for after the token issued at the start of
    the pull has expired. Docker notices by its own clock (`issued_at` + `expires_in`, both from the
    mirror), asks the token endpoint again with the refresh token `docker login` stored, and the pull
    completes; no request is refused for an expired token. This is the only renewal these clients make:
    a 401 with `error="invalid_token"` in the middle of a pull is not retried with a new token by
    Docker 20.10 (the pull fails, "unauthorized: authentication required") nor by containerd 1.6 (it
    resends the same token once, then fails "server message: invalid_token"), which is why the token
    must outlive what the client believes and why `leeway` (10 s here) covers a request sent just before
    the client's deadline and checked just after it.
    """
    secured = secured_mirror(mirror_factory, tmp_path, upstream_registry, upstream_creds, token_ttl="60s",
                             leeway="10s")
    host = secured.mirror.host
    image = image_factory.busybox(extra_layers=(1 << 20, 1 << 20, 1000, 2000, 3000))
    skopeo_tls_copy(image.ref, f"docker://{host}/team/slow:1", secured.cert_dir,
                    dest_creds=f"alice:{USERS['alice']}")
    daemon = docker_daemon_factory()
    with SlowLink(secured.mirror.port, 16 << 10) as link:
        slow_host = f"127.0.0.1:{link.port}"
        directory = CERTS_D / slow_host
        directory.mkdir(parents=True, exist_ok=True)
        certs_d_cleanup.append(directory)
        shutil.copy(secured.ca.ca_file, directory / "ca.crt")
        daemon.docker("login", slow_host, "-u", "alice", "--password-stdin", input=USERS["alice"].encode())
        logged_in = len(token_requests(secured.mirror))
        started = time.monotonic()
        daemon.docker("pull", f"{slow_host}/team/slow:1", timeout=300)
        took = time.monotonic() - started
    assert took > 64, f"the pull took {took:.0f}s: too fast to outlast the token"
    during_pull = token_requests(secured.mirror)[logged_in:]
    assert len(during_pull) >= 2, during_pull
    first, last = during_pull[0][0], during_pull[-1][0]
    assert last - first >= 60, during_pull  # a new token once the first one had expired, not before
    assert {method for _, method in during_pull} == {"POST"}  # with the refresh token, not the password
    log = secured.mirror.log_text(tail=None)
    assert "token expired" not in log
    assert "hello-from-mirror" in daemon.run_image(f"{slow_host}/team/slow:1")
    assert "Traceback" not in log
