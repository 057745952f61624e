"""Issue #3, with real clients: the mirror as a pull-through cache.

Docker Engine (``registry-mirrors``), containerd (``hosts.toml``, ``?ns=``) and skopeo (path prefixes) pull
through a mirror process whose upstreams are CNCF distribution registries: one plays Docker Hub (token
auth, anonymous pull except ``private/``), another plays GHCR. Nothing here is mocked; the harness
blackholes any fallback to the real Docker Hub, so a successful pull proves the mirror served it.

What is counted comes from two independent witnesses: the mirror's own ``/metrics``
(``mirror_upstream_requests_total``) and the upstream registry's access log.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import skopeo
from tests.support.distribution import DistributionRegistry
from tests.support.dockerd import DockerDaemon, write_hosts_dir
from tests.support.fixtures import DockerDaemonFactory, ImageFactory, MirrorFactory, RegistryFactory
from tests.support.images import BuiltImage, layout_digests, verify_layout
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import CommandFailed
from tests.support.token_server import TokenServer

pytestmark = [pytest.mark.real]

SKOPEO_TOOLS = ("skopeo", "docker-registry")
DOCKER_TOOLS = ("dockerd", "docker")
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


# -- helpers ------------------------------------------------------------------------------------


def upstream_entry(registry: DistributionRegistry, name: str = "docker.io", **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "url": registry.url, "timeout": "10s"}
    entry.update(extra)
    return entry


def start_mirror(
    mirror_factory: MirrorFactory, tmp_path: Path, upstreams: list[dict[str, Any]], label: str = "m"
) -> MirrorProcess:
    """A mirror process with its storage under tmp_path (never the checkout's ./data)."""
    return mirror_factory(
        {
            "storage": {"path": str(tmp_path / f"{label}-data")},
            "upstreams": upstreams,
            "local": {"repositories": ["team/**"]},
        }
    )


def mirror_ref(mirror: MirrorProcess, repo_tag: str) -> str:
    return f"docker://{mirror.host}/{repo_tag}"


def metric_samples(mirror: MirrorProcess, sample_name: str) -> list[tuple[dict[str, str], float]]:
    with urllib.request.urlopen(f"{mirror.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [
        (dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name
    ]


def upstream_requests(mirror: MirrorProcess, upstream: str = "docker.io") -> Counter[tuple[str, str]]:
    """``mirror_upstream_requests_total`` of one upstream as {(method, status): count}."""
    counts: Counter[tuple[str, str]] = Counter()
    for labels, value in metric_samples(mirror, "mirror_upstream_requests_total"):
        if labels.get("upstream") == upstream:
            if labels["kind"] != "token":  # token requests go to the realm, not the registry's access log
                counts[(labels["method"], labels["status"])] += int(value)
    return counts


def cache_lookups(mirror: MirrorProcess, upstream: str = "docker.io") -> Counter[tuple[str, str]]:
    """``mirror_cache_lookups_total`` of one upstream as {(kind, result): count}."""
    counts: Counter[tuple[str, str]] = Counter()
    for labels, value in metric_samples(mirror, "mirror_cache_lookups_total"):
        if labels.get("upstream") == upstream:
            counts[(labels["kind"], labels["result"])] += int(value)
    return counts


# distribution's access log: 127.0.0.1 - - [date] "GET /v2/library/x/blobs/sha256:... HTTP/1.1" 200 123 "" "ua"
_ACCESS_LINE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (/v2/[^ ?"]*)[^ "]* HTTP/[0-9.]+" (\d{3})')


def registry_requests(registry: DistributionRegistry, repo: str) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request the registry logged for ``repo``."""
    prefix = f"/v2/{repo}/"
    return [
        (m.group(1), m.group(2), int(m.group(3)))
        for m in _ACCESS_LINE.finditer(registry.log_text(tail=None))
        if m.group(2).startswith(prefix)
    ]


def registry_blob_gets(registry: DistributionRegistry, repo: str) -> Counter[str]:
    """How many successful blob GETs the registry answered for ``repo``, by digest."""
    return Counter(
        path.rsplit("/", 1)[1]
        for method, path, status in registry_requests(registry, repo)
        if method == "GET" and "/blobs/sha256:" in path and status in (200, 206)
    )


def get_manifest(mirror: MirrorProcess, repo_ref: str) -> tuple[int, bytes, dict[str, str]]:
    """A plain HTTP GET of ``/v2/<repo>/manifests/<ref>`` on the mirror: (status, body, headers)."""
    repo, at, ref = repo_ref.partition("@")
    if not at:
        repo, _, ref = repo_ref.rpartition(":")
    request = urllib.request.Request(
        f"{mirror.url}/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def repo_digests(daemon: DockerDaemon, image: str) -> str:
    return daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}", image).stdout.decode()


def pull_layout_via(mirror: MirrorProcess, repo_tag: str, dest: Path, creds: tuple[str, str] | None = None) -> Path:
    skopeo.copy(mirror_ref(mirror, repo_tag), f"oci:{dest}:pulled", src_creds=creds)
    verify_layout(dest)
    return dest


# -- 1. Docker Engine with registry-mirrors ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.needs_tools(*DOCKER_TOOLS, *SKOPEO_TOOLS)
def test_docker_engine_pulls_through_mirror_and_then_from_cache_alone(
    token_server: TokenServer,
    registry_factory: RegistryFactory,
    mirror_factory: MirrorFactory,
    docker_daemon_factory: DockerDaemonFactory,
    busybox_image: BuiltImage,
    multiarch_image: BuiltImage,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    upstream = registry_factory.token_auth(token_server)  # ours alone: it is stopped below
    single, multi = unique_repo("library/bb"), unique_repo("library/multi")
    upstream.push(busybox_image, f"{single}:1")
    upstream.push(multiarch_image, f"{multi}:1")
    # A short tag_ttl, so the pulls after the upstream is gone really try it and fall back to the cache.
    mirror = start_mirror(mirror_factory, tmp_path, [upstream_entry(upstream, default=True, tag_ttl="1s")])
    daemon = docker_daemon_factory(mirror.url)
    # One-component names, as `docker pull alpine:3.20`: Docker asks the mirror for library/<name>.
    single_name, multi_name = single.split("/", 1)[1] + ":1", multi.split("/", 1)[1] + ":1"

    def pull_and_check() -> None:
        daemon.docker("pull", single_name)
        daemon.docker("pull", multi_name)
        assert f"@{busybox_image.digest}" in repo_digests(daemon, single_name)
        assert f"@{multiarch_image.digest}" in repo_digests(daemon, multi_name)
        assert busybox_image.marker in daemon.run_image(single_name)
        assert multiarch_image.marker in daemon.run_image(multi_name)

    pull_and_check()
    assert sum(n for (kind, result), n in cache_lookups(mirror).items() if kind == "blob" and result == "miss") > 0

    upstream.stop()
    daemon.docker("rmi", single_name, multi_name)
    assert daemon.docker("images", "-q").stdout.strip() == b""
    time.sleep(1.1)  # past tag_ttl: the mirror has to try the (dead) upstream, then serve its copy
    before = cache_lookups(mirror)
    pull_and_check()  # Docker Hub is blackholed and the upstream is down: only the mirror can answer
    after = cache_lookups(mirror)
    assert after[("tag", "stale")] - before[("tag", "stale")] >= 2, after
    assert after[("blob", "hit")] > before[("blob", "hit")], after
    assert after[("blob", "miss")] == before[("blob", "miss")], after


@pytest.mark.slow
@pytest.mark.needs_tools(*DOCKER_TOOLS, *SKOPEO_TOOLS)
def test_docker_engine_pulls_an_image_whose_shared_layer_it_skipped_with_the_upstream_gone(
    token_server: TokenServer,
    registry_factory: RegistryFactory,
    mirror_factory: MirrorFactory,
    docker_daemon_factory: DockerDaemonFactory,
    image_factory: ImageFactory,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Issue 9, item 2: A, then B sharing A's base layer (Docker never asks for it under B); upstream
    stopped, both removed, B pulled again: the shared layer is read through B from what B's manifest
    (a child of B's cached index) names."""
    upstream = registry_factory.token_auth(token_server)  # ours alone: it is stopped below
    image_a = image_factory.busybox(seed=91, marker="image-a")
    image_b = image_factory.multiarch(seed=92, extra_layers=[1 << 20], marker="image-b")
    shared = image_a.host_manifest.layer_digests[0]
    assert image_b.host_manifest.layer_digests[0] == shared  # the same busybox base layer
    repo_a, repo_b = unique_repo("library/shared-a"), unique_repo("library/shared-b")
    upstream.push(image_a, f"{repo_a}:1")
    upstream.push(image_b, f"{repo_b}:1")
    pushed = len(registry_requests(upstream, repo_b))  # the push's own HEADs of every blob come first
    mirror = start_mirror(mirror_factory, tmp_path, [upstream_entry(upstream, default=True, tag_ttl="1s")])
    daemon = docker_daemon_factory(mirror.url)
    name_a, name_b = repo_a.split("/", 1)[1] + ":1", repo_b.split("/", 1)[1] + ":1"

    daemon.docker("pull", name_a)
    daemon.docker("pull", name_b)
    assert f"@{image_b.digest}" in repo_digests(daemon, name_b)
    # Docker had the base layer from A: neither it nor the mirror asked for it under B.
    pulled = registry_requests(upstream, repo_b)[pushed:]
    assert pulled and not [path for _method, path, _status in pulled if shared in path], pulled

    upstream.stop()
    daemon.docker("rmi", name_a, name_b)
    assert daemon.docker("images", "-q").stdout.strip() == b""
    time.sleep(1.1)  # past tag_ttl: the mirror tries the (dead) upstream for the tag, then serves its copy
    daemon.docker("pull", name_b)  # Docker Hub is blackholed and the upstream is down: only the mirror answers
    assert f"@{image_b.digest}" in repo_digests(daemon, name_b)
    assert image_b.marker in daemon.run_image(name_b)
    lookups = cache_lookups(mirror)
    assert lookups[("blob", "hit")] >= len(image_b.host_manifest.blob_digests), lookups


# -- 2. containerd with hosts.toml (?ns=) --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.needs_tools(*DOCKER_TOOLS, "ctr", *SKOPEO_TOOLS)
def test_containerd_pulls_through_mirror_with_ns(
    upstream_registry: DistributionRegistry,
    open_registry: DistributionRegistry,
    mirror_factory: MirrorFactory,
    docker_daemon: DockerDaemon,
    busybox_image: BuiltImage,
    multiarch_image: BuiltImage,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    single, multi = unique_repo("library/ctr"), unique_repo("owner/ctr")
    upstream_registry.push(busybox_image, f"{single}:1")
    open_registry.push(multiarch_image, f"{multi}:1")
    # No default upstream: without ?ns= these names would be local (and unknown), so success proves
    # containerd's ns parameter chose the upstream.
    mirror = start_mirror(
        mirror_factory, tmp_path, [upstream_entry(upstream_registry), upstream_entry(open_registry, "ghcr.io")]
    )
    assert get_manifest(mirror, f"{single}:1")[0] == 404
    hosts = write_hosts_dir(tmp_path / "hosts", mirror.url, "docker.io")
    write_hosts_dir(hosts, mirror.url, "ghcr.io")
    namespace = "t" + single.rsplit("-", 1)[1]  # our own containerd namespace in the shared daemon

    daemon = docker_daemon
    daemon.ctr_pull(f"docker.io/{single}:1", hosts, namespace=namespace)
    daemon.ctr_pull(f"ghcr.io/{multi}:1", hosts, namespace=namespace)
    listing = daemon.ctr("images", "ls", namespace=namespace).stdout.decode()
    assert re.search(rf"docker\.io/{re.escape(single)}:1\s+\S+\s+{busybox_image.digest}", listing), listing
    assert re.search(rf"ghcr\.io/{re.escape(multi)}:1\s+\S+\s+{multiarch_image.digest}", listing), listing
    # Every layer really arrived (ctr unpacks nothing by default, so check content is complete).
    content = daemon.ctr("content", "ls", "--quiet", namespace=namespace).stdout.decode().split()
    assert set(busybox_image.host_manifest.blob_digests) <= set(content)
    assert set(multiarch_image.host_manifest.blob_digests) <= set(content)
    daemon.ctr("images", "rm", f"docker.io/{single}:1", f"ghcr.io/{multi}:1", namespace=namespace)

    requests = upstream_requests(mirror, "docker.io") + upstream_requests(mirror, "ghcr.io")
    assert requests[("GET", "200")] > 0


# -- 3. skopeo through path prefixes -------------------------------------------------------------


@pytest.mark.needs_tools(*SKOPEO_TOOLS)
def test_skopeo_pulls_through_path_prefixes(
    upstream_registry: DistributionRegistry,
    registry_factory: RegistryFactory,
    token_server: TokenServer,
    mirror_factory: MirrorFactory,
    busybox_image: BuiltImage,
    multiarch_image: BuiltImage,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    ghcr = registry_factory.token_auth(token_server)  # GHCR also answers anonymous pulls with tokens
    hub_repo, ghcr_repo = unique_repo("library/sk"), unique_repo("owner/sk")
    upstream_registry.push(multiarch_image, f"{hub_repo}:1")
    ghcr.push(busybox_image, f"{ghcr_repo}:1")
    ghcr.push(multiarch_image, f"{ghcr_repo}:multi")
    mirror = start_mirror(
        mirror_factory, tmp_path,
        [upstream_entry(upstream_registry, default=True), upstream_entry(ghcr, "ghcr.io")],
    )

    cases = [
        (f"docker.io/{hub_repo}:1", multiarch_image),
        (f"ghcr.io/{ghcr_repo}:1", busybox_image),
        (f"ghcr.io/{ghcr_repo}:multi", multiarch_image),
    ]
    for n, (repo_tag, image) in enumerate(cases):
        raw = skopeo.inspect_raw(mirror_ref(mirror, repo_tag))
        assert skopeo.sha256_of(raw) == image.digest, repo_tag
        dest = pull_layout_via(mirror, repo_tag, tmp_path / f"pulled-{n}")
        assert layout_digests(dest, "pulled") == image.all_digests, repo_tag

    # Every route to the same upstream repository is the same cached repository.
    short = hub_repo.split("/", 1)[1]
    for alias in (f"docker.io/{short}:1", f"{hub_repo}:1", f"{short}:1"):
        assert skopeo.sha256_of(skopeo.inspect_raw(mirror_ref(mirror, alias))) == multiarch_image.digest, alias
    # A prefix chooses its registry: GHCR's repository is not Docker Hub's.
    status, body, _ = get_manifest(mirror, f"docker.io/{ghcr_repo}:1")
    assert status == 404 and b"MANIFEST_UNKNOWN" in body
    assert upstream_requests(mirror, "ghcr.io")[("GET", "200")] > 0


# -- 4. private images and credentials -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.needs_tools(*SKOPEO_TOOLS, *DOCKER_TOOLS)
def test_private_image_needs_the_configured_credentials(
    upstream_registry: DistributionRegistry,
    fresh_token_server: TokenServer,
    mirror_factory: MirrorFactory,
    docker_daemon: DockerDaemon,
    multiarch_image: BuiltImage,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    token_server = fresh_token_server
    user, password = token_server.creds
    repo = unique_repo("private/app")
    upstream_registry.push(multiarch_image, f"{repo}:1")

    # Without credentials: the mirror answers an error, and real clients fail.
    anonymous = start_mirror(mirror_factory, tmp_path, [upstream_entry(upstream_registry, default=True)], "anon")
    token_server.reset()
    for reference in (f"{repo}:1", f"{repo}@{multiarch_image.digest}"):
        status, body, _ = get_manifest(anonymous, reference)
        # 404 (Docker and containerd move on to their next endpoint), and the message says why.
        assert status == 404 and b"MANIFEST_UNKNOWN" in body and b"denied access" in body, (status, body)
    with pytest.raises(skopeo.SkopeoError, match="denied access"):
        skopeo.inspect_raw(mirror_ref(anonymous, f"{repo}:1"))
    with pytest.raises(CommandFailed, match="denied access"):
        docker_daemon.docker("pull", f"{anonymous.host}/{repo}:1", timeout=60)
    assert token_server.requests and not any(r.had_credentials for r in token_server.requests)

    # With credentials in the upstream config: clients pull anonymously from the mirror.
    authed = start_mirror(
        mirror_factory, tmp_path,
        [upstream_entry(upstream_registry, default=True, username=user, password=password)], "authed",
    )
    token_server.reset()
    assert skopeo.sha256_of(skopeo.inspect_raw(mirror_ref(authed, f"{repo}:1"))) == multiarch_image.digest
    dest = pull_layout_via(authed, f"{repo}:1", tmp_path / "pulled")
    assert layout_digests(dest, "pulled") == multiarch_image.all_digests
    docker_daemon.docker("pull", f"{authed.host}/{repo}:1")
    assert f"@{multiarch_image.digest}" in repo_digests(docker_daemon, f"{authed.host}/{repo}:1")
    docker_daemon.docker("rmi", f"{authed.host}/{repo}:1")

    # The credentials went to the token endpoint (on the upstream's host) and were accepted there.
    record = token_server.requests
    assert record and all(r.path == "/token" and r.basic and r.user == user and r.status == 200 for r in record)
    assert all(r.service == token_server.service for r in record)
    assert any(a.name == repo and "pull" in a.actions for r in record for a in r.granted)
    # Tokens are cached per scope: one private repository takes one token, not one per request.
    assert len(record) == 1, record


@pytest.mark.needs_tools(*SKOPEO_TOOLS)
def test_credentials_go_only_to_realms_on_the_upstream_host_or_auth_hosts(
    upstream_registry: DistributionRegistry,
    fresh_token_server: TokenServer,
    mirror_factory: MirrorFactory,
    busybox_image: BuiltImage,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    """The upstream is addressed as ``localhost`` while its realm is ``127.0.0.1``: another host."""
    token_server = fresh_token_server
    user, password = token_server.creds
    repo = unique_repo("private/realm")
    upstream_registry.push(busybox_image, f"{repo}:1")
    by_name = {"url": f"http://localhost:{upstream_registry.port}", "username": user, "password": password}

    # Not the upstream's host name, not listed, and a loopback address: never contacted at all.
    refused = start_mirror(
        mirror_factory, tmp_path, [upstream_entry(upstream_registry, default=True, **by_name)], "refused"
    )
    token_server.reset()
    status, _, _ = get_manifest(refused, f"{repo}:1")
    assert 400 <= status < 500
    assert token_server.requests == []

    # Listed in auth_hosts: the credentials may go there.
    listed = start_mirror(
        mirror_factory, tmp_path,
        [upstream_entry(upstream_registry, default=True, auth_hosts=["127.0.0.1"], **by_name)], "listed",
    )
    token_server.reset()
    raw = skopeo.inspect_raw(mirror_ref(listed, f"{repo}:1"))
    assert skopeo.sha256_of(raw) == busybox_image.digest
    record = token_server.requests
    assert record and all(r.basic and r.user == user and r.status == 200 for r in record)


# -- 5. one upstream fetch per blob ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.needs_tools(*SKOPEO_TOOLS, *DOCKER_TOOLS)
def test_concurrent_clients_cause_one_upstream_fetch_per_blob(
    token_server: TokenServer,
    registry_factory: RegistryFactory,
    mirror_factory: MirrorFactory,
    docker_daemon: DockerDaemon,
    image_factory: ImageFactory,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    upstream = registry_factory.token_auth(token_server)  # ours alone: its log holds only this test
    image = image_factory.busybox(seed=51, extra_layers=[12 << 20, 6 << 20, 1 << 20])
    repo = unique_repo("library/fanout")
    upstream.push(image, f"{repo}:1")
    mirror = start_mirror(mirror_factory, tmp_path, [upstream_entry(upstream, default=True)])
    before = upstream_requests(mirror)
    assert registry_blob_gets(upstream, repo) == Counter()  # the push GETs no blob

    copies = 4
    barrier = threading.Barrier(copies + 1)

    def skopeo_client(n: int) -> frozenset[str]:
        barrier.wait(timeout=30)
        dest = pull_layout_via(mirror, f"{repo}:1", tmp_path / f"client-{n}")
        return layout_digests(dest, "pulled")

    def docker_client() -> str:
        barrier.wait(timeout=30)
        docker_daemon.docker("pull", f"{mirror.host}/{repo}:1")
        return repo_digests(docker_daemon, f"{mirror.host}/{repo}:1")

    with ThreadPoolExecutor(copies + 1) as pool:
        pulls = [pool.submit(skopeo_client, n) for n in range(copies)]
        docker_pull = pool.submit(docker_client)
        results = [f.result(timeout=150) for f in pulls]
        docker_digests = docker_pull.result(timeout=150)
    assert all(result == image.all_digests for result in results)
    assert f"@{image.digest}" in docker_digests
    assert image.marker in docker_daemon.run_image(f"{mirror.host}/{repo}:1")
    docker_daemon.docker("rmi", f"{mirror.host}/{repo}:1")

    blobs = image.host_manifest.blob_digests  # config + 4 layers
    # The upstream's own access log: every blob was GET exactly once, whatever the clients did.
    assert registry_blob_gets(upstream, repo) == Counter({d: 1 for d in blobs})
    manifest_gets = [
        p for m, p, s in registry_requests(upstream, repo) if m == "GET" and "/manifests/" in p and s == 200
    ]
    assert len(manifest_gets) == 1, manifest_gets
    # The mirror's metrics agree: one GET per blob plus the one manifest, all 200.
    sent = upstream_requests(mirror) - before
    assert sent[("GET", "200")] == len(blobs) + 1, sent
    assert not [key for key in sent if key[0] in ("GET", "HEAD") and key[1] != "200"], sent


# -- 6. tag_ttl ------------------------------------------------------------------------------------


@pytest.mark.needs_tools(*SKOPEO_TOOLS)
def test_tags_are_trusted_for_tag_ttl_then_follow_the_upstream(
    upstream_registry: DistributionRegistry,
    mirror_factory: MirrorFactory,
    image_factory: ImageFactory,
    unique_repo: Callable[..., str],
    tmp_path: Path,
) -> None:
    ttl = 6.0
    first = image_factory.busybox(seed=61, marker="first-image")
    second = image_factory.busybox(seed=62, marker="second-image")
    moving, steady = unique_repo("library/moving"), unique_repo("library/steady")
    upstream_registry.push(first, f"{moving}:1")
    upstream_registry.push(first, f"{steady}:1")
    mirror = start_mirror(
        mirror_factory, tmp_path, [upstream_entry(upstream_registry, default=True, tag_ttl=f"{ttl}s")]
    )

    validated = time.monotonic()
    for repo in (moving, steady):
        assert skopeo.sha256_of(skopeo.inspect_raw(mirror_ref(mirror, f"{repo}:1"))) == first.digest

    upstream_registry.push(second, f"{moving}:1")  # the upstream tag moves
    sent_before, log_before = upstream_requests(mirror), len(registry_requests(upstream_registry, moving))
    # Within tag_ttl: the cached digest, and not one request to the upstream.
    for repo in (moving, steady):
        assert skopeo.sha256_of(skopeo.inspect_raw(mirror_ref(mirror, f"{repo}:1"))) == first.digest
    assert time.monotonic() - validated < ttl, "the machine was too slow to check within tag_ttl"
    assert upstream_requests(mirror) == sent_before
    assert len(registry_requests(upstream_registry, moving)) == log_before
    assert cache_lookups(mirror)[("tag", "hit")] >= 2

    time.sleep(max(0.0, validated + ttl + 0.5 - time.monotonic()))
    # After tag_ttl: a HEAD per tag; only the moved one is fetched again.
    assert skopeo.sha256_of(skopeo.inspect_raw(mirror_ref(mirror, f"{moving}:1"))) == second.digest
    assert skopeo.sha256_of(skopeo.inspect_raw(mirror_ref(mirror, f"{steady}:1"))) == first.digest
    sent = upstream_requests(mirror) - sent_before
    assert sent == Counter({("HEAD", "200"): 2, ("GET", "200"): 1}), sent
    lookups = cache_lookups(mirror)
    assert lookups[("tag", "revalidated")] == 1 and lookups[("tag", "miss")] >= 3, lookups

    dest = pull_layout_via(mirror, f"{moving}:1", tmp_path / "moved")
    assert layout_digests(dest, "pulled") == second.all_digests
