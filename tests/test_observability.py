"""Issue #11: the dashboard, the alert rules and the status page, checked against a real Prometheus and a
real browser after real traffic.

One mirror process pulls through a distribution registry with token auth (docker.io) and a fake upstream
that announces a nearly spent Docker Hub budget (hub.test). Real skopeo pulls make hits and misses; a small
`max_size` makes an eviction; stopping the upstream makes a stale answer, an unreachable upstream and 503s;
the data filesystem (a small tmpfs) is filled until the disk alert holds. Then every expression of every
panel and every alert rule is evaluated through Prometheus's HTTP API and must return data.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_upstream import FakeUpstream
from tests.support import skopeo
from tests.support.fixtures import ImageFactory, MirrorFactory, RegistryFactory
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import require_tool, run
from tests.support.prometheus import Prometheus
from tests.support.token_server import TokenServer

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "dashboards" / "mirror.json"
ALERTS = ROOT / "grafana" / "alerts.yaml"
SCREENSHOT = ROOT / "docs" / "images" / "status-page.png"
MiB = 1 << 20
FS_MIB = 48
# Grafana's variables, as an operator's 5-minute view would fill them in.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "5m", "$__interval": "5s"}


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def alert_rules() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def grafana_expr(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    require_tool("mount")
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    run(["mount", "-t", "tmpfs", "-o", f"size={FS_MIB}m,mode=0700", "tmpfs", str(mountpoint)], what="mount tmpfs")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fetch(url: str, accept: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def samples(mirror: MirrorProcess) -> list[tuple[str, dict[str, str], float]]:
    status, body = fetch(f"{mirror.url}/metrics")
    assert status == 200
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    ]


def total(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    def matches(have: dict[str, str]) -> bool:
        return all(re.fullmatch(value, have.get(key, "")) for key, value in labels.items())

    return sum(value for sample, have, value in found if sample == name and matches(have))


@pytest.mark.needs_tools("skopeo", "docker-registry", "prometheus", "promtool", "chromium")
async def test_every_panel_and_alert_returns_data_and_the_status_page_agrees_with_metrics(
    token_server: TokenServer,
    registry_factory: RegistryFactory,
    mirror_factory: MirrorFactory,
    image_factory: ImageFactory,
    aiohttp_server: Any,
    small_fs: Path,
    tmp_path: Path,
) -> None:
    upstream = registry_factory.token_auth(token_server)
    # Two images of ~4 MiB each against a 6 MiB bound: only one fits.
    first = image_factory.busybox(tag="1", seed=1, extra_layers=(3 * MiB,))
    second = image_factory.busybox(tag="1", seed=2, extra_layers=(3 * MiB,))
    upstream.push(first, "library/first:1")
    upstream.push(second, "library/second:1")
    hub = FakeUpstream(ratelimit_remaining=3)
    hub.add_image("library/limited", "1", [b"a small layer"])
    hub_server = await aiohttp_server(hub.app())

    mirror = mirror_factory(
        {
            "storage": {"path": str(small_fs / "data"), "max_size": "6MiB"},
            "upstreams": [
                {"name": "docker.io", "url": upstream.url, "default": True, "tag_ttl": "1s", "timeout": "3s"},
                {"name": "hub.test", "url": f"http://127.0.0.1:{hub_server.port}", "library_prefix": True},
            ],
            "local": {"repositories": ["team/**"]},
            # One rule that copies a pushed image, one whose source never exists: both states on the dashboard.
            "replication": [
                {"name": "team-copy", "source": "team/app", "destinations": [{"local": "team/copy"}],
                 "interval": "2s"},
                {"name": "broken", "source": "team/missing", "destinations": [{"local": "team/nowhere"}],
                 "interval": "2s"},
            ],
        },
        start=False,
    )
    await mirror.astart()
    pushed = image_factory.busybox(tag="1", seed=3)
    await asyncio.to_thread(skopeo.copy, pushed.ref, f"docker://{mirror.host}/team/app:1")
    prometheus = Prometheus(tmp_path / "prom", mirror.host, rule_files=[ALERTS]).start()
    try:
        await _traffic(mirror, upstream, tmp_path)
        await asyncio.to_thread(prometheus.wait_for_scrapes, "mirror_upstream_up{upstream='docker.io'} == 0")
        await asyncio.to_thread(prometheus.wait_for_scrapes, "mirror_replication_last_success_timestamp_seconds > 0")
        await asyncio.to_thread(_fill_disk, small_fs)
        nearly_full = "mirror_storage_free_bytes / mirror_storage_size_bytes < 0.05"
        await asyncio.to_thread(prometheus.wait_for_scrapes, nearly_full)
        await asyncio.sleep(3)  # a few more scrapes, so every rate() window holds two samples

        empty = []
        for title, expr in dashboard_expressions():
            if not await asyncio.to_thread(prometheus.query, grafana_expr(expr)):
                empty.append(f"panel {title!r}: {expr}")
        for name, expr in alert_rules():
            if not await asyncio.to_thread(prometheus.query, expr):
                empty.append(f"alert {name}: {expr}")
        assert not empty, "expressions without data:\n" + "\n".join(empty)
        rules_lint = subprocess.run([require_tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True)
        assert rules_lint.returncode == 0, rules_lint.stdout.decode() + rules_lint.stderr.decode()
        groups = await asyncio.to_thread(prometheus.rule_groups)
        assert {rule["name"] for group in groups for rule in group["rules"]} == {n for n, _ in alert_rules()}
        assert all(rule["health"] == "ok" for group in groups for rule in group["rules"])

        status, exposition = await asyncio.to_thread(fetch, f"{mirror.url}/metrics")
        lint = subprocess.run([require_tool("promtool"), "check", "metrics"], input=exposition, capture_output=True)
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
        assert b"_created" not in exposition

        await asyncio.to_thread(_check_status_page, mirror)
    finally:
        prometheus.stop()
        await mirror.astop()


async def _traffic(mirror: MirrorProcess, upstream: Any, tmp_path: Path) -> None:
    def pull(repo: str, dest: str) -> None:
        skopeo.copy(f"docker://{mirror.host}/{repo}", f"oci:{tmp_path / dest}:pulled")

    await asyncio.to_thread(pull, "library/first:1", "a")  # misses
    # The second image, pulled more often than the first, earns its room (the cache admits what is asked for
    # more often than what it would evict): the first image is evicted, later pulls are hits.
    for attempt in ("c", "d", "e"):
        await asyncio.to_thread(pull, "library/second:1", attempt)
    status, _ = await asyncio.to_thread(fetch, f"{mirror.url}/v2/hub.test/library/limited/manifests/1",
                                        "application/vnd.oci.image.manifest.v1+json")
    assert status == 200
    # Wait for the eviction before the upstream goes away (it runs when the second image's fills arrive).
    for _ in range(100):
        if total(await asyncio.to_thread(samples, mirror), "mirror_evictions_total") > 0:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("no eviction happened")
    await asyncio.to_thread(upstream.stop)
    await asyncio.sleep(1.2)  # past tag_ttl: the next pull by tag must ask the (stopped) upstream
    status, _ = await asyncio.to_thread(fetch, f"{mirror.url}/v2/library/second/manifests/1",
                                        "application/vnd.oci.image.manifest.v1+json")
    assert status == 200  # served stale
    # A blob of the evicted image: the upstream is gone, so the client gets 503s.
    # The first image's own large layer (the busybox layer is shared with the second image, still cached).
    evicted = max((tmp_path / "a" / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size).name
    for _ in range(20):
        status, _ = await asyncio.to_thread(fetch, f"{mirror.url}/v2/library/first/blobs/sha256:{evicted}")
        assert status == 503
    found = await asyncio.to_thread(samples, mirror)
    assert total(found, "mirror_cache_lookups_total", kind="tag", result="stale") >= 1
    assert total(found, "mirror_http_requests_total", status="5..") >= 1


def _fill_disk(fs: Path) -> None:
    """Leave under 5 % of the small filesystem free, as a disk filled by something else would."""
    import os

    stats = os.statvfs(fs)
    keep_free = int(stats.f_blocks * stats.f_frsize * 0.02)
    to_write = stats.f_bavail * stats.f_frsize - keep_free
    with open(fs / "filler", "wb") as handle:
        while to_write > 0:
            piece = min(to_write, MiB)
            handle.write(b"\0" * piece)
            to_write -= piece


def _chromium(*args: str) -> subprocess.CompletedProcess[bytes]:
    profile = tempfile.mkdtemp(prefix="chromium-")
    argv = [
        require_tool("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1280,1000", *args,
    ]
    return run(argv, timeout=90, what="chromium")


def _check_status_page(mirror: MirrorProcess) -> None:
    found = samples(mirror)
    dom = _chromium("--dump-dom", f"{mirror.url}/").stdout.decode()
    hits = total(found, "mirror_cache_lookups_total", kind="blob", result="hit|revalidated")
    misses = total(found, "mirror_cache_lookups_total", kind="blob", result="miss|joined|prefetched")
    assert f"{hits:.0f} hits, {misses:.0f} misses" in dom
    assert f"{100 * hits / (hits + misses):.1f} %" in dom
    client_pulls = total(found, "mirror_pulls_total")
    upstream_pulls = total(found, "mirror_upstream_requests_total", method="GET", kind="manifest")
    assert f"{client_pulls:.0f} client pulls, {upstream_pulls:.0f} manifest GETs upstream" in dom
    # Top repositories by pulls: the names as routed, with the pull counts since start.
    assert "docker.io/library/first" in dom and "hub.test/library/limited" in dom
    assert re.search(r"docker\.io/library/second</code></td><td>[1-9]", dom)
    # The upstream the test stopped is shown down; the one still running up, with its budget.
    assert re.search(r"<b>docker\.io</b>.*?badge bad[\"']>down", dom, re.S)
    assert re.search(r"<b>hub\.test</b>.*?badge ok[\"']>up.*?3 / 100", dom, re.S)
    assert "of 6.0 MiB" in dom
    assert re.search(r"<b>team-copy</b>.*?badge ok[\"']>ok", dom, re.S)
    assert re.search(r"<b>broken</b>.*?badge bad[\"']>failed", dom, re.S)
    # Recent fills: the misses of the first image, with their upstream and repository.
    assert re.search(r"<td>docker\.io</td><td><code>library/first</code></td>", dom)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    _chromium(f"--screenshot={SCREENSHOT}", f"{mirror.url}/")
    assert SCREENSHOT.stat().st_size > 10_000


@pytest.mark.needs_tools("skopeo", "docker-registry")
def test_request_lines_are_json_and_no_credential_or_token_reaches_the_log(
    upstream_registry: Any,
    fresh_token_server: TokenServer,
    mirror_factory: MirrorFactory,
    busybox_image: Any,
    unique_repo: Any,
    tmp_path: Path,
) -> None:
    import base64

    user, password = fresh_token_server.creds
    repo = unique_repo("private/logged")
    upstream_registry.push(busybox_image, f"{repo}:1")
    mirror = mirror_factory(
        {
            "storage": {"path": str(tmp_path / "data")},
            "upstreams": [{"name": "docker.io", "url": upstream_registry.url, "default": True,
                           "username": user, "password": password}],
            "log": {"format": "json", "level": "debug"},
        }
    )
    skopeo.copy(f"docker://{mirror.host}/{repo}:1", f"oci:{tmp_path / 'out'}:pulled")
    skopeo.copy(f"docker://{mirror.host}/{repo}:1", f"oci:{tmp_path / 'again'}:pulled")
    mirror.stop()
    log = mirror.log_text(tail=None)
    secrets = [password, base64.b64encode(f"{user}:{password}".encode()).decode(), "eyJ"]  # eyJ: any JWT
    leaked = [secret for secret in secrets if secret in log]
    assert not leaked, f"found {leaked} in the mirror's log"

    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests = [entry["http"] for entry in entries if entry["logger"] == "mirror.access"]
    manifest_gets = [r for r in requests if r["route"] == "manifest" and r["method"] == "GET" and r["status"] == 200]
    assert manifest_gets and all(r["repository"] == f"docker.io/{repo}" for r in manifest_gets)
    blob_gets = [r for r in requests if r["route"] == "blob" and r["method"] == "GET"]
    # The first copy came from downloads (its own, or layer prefetches it caught up with), the second hit.
    results = {r["cache"] for r in blob_gets}
    assert "hit" in results and results - {"hit"} and results - {"hit"} <= {"miss", "joined", "prefetched"}
    assert all(r["upstream"] == "docker.io" and r["duration_ms"] >= 0 for r in blob_gets)
    # `bytes` is the body sent (sendfile included), not only the headers: each blob's size in skopeo's copy.
    for entry in entries:
        http = entry.get("http", {})
        if entry["logger"] == "mirror.access" and (http["route"], http["method"], http["status"]) == (
            "blob", "GET", 200
        ):
            digest = entry["message"].split()[1].rsplit("/", 1)[1]
            stored = tmp_path / "again" / "blobs" / "sha256" / digest.removeprefix("sha256:")
            assert entry["http"]["bytes"] == stored.stat().st_size, entry
    assert any(entry["message"].startswith("filled ") for entry in entries)
    assert all(entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR") for entry in entries)
