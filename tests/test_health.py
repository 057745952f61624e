"""/livez and /readyz as a load balancer sees them: ready turns 503 when the data directory becomes
read-only or the upstream stops, says which check failed, and turns back when they recover."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.observe.health import HEALTH
from tests.fake_upstream import FakeUpstream, upstream_config
from tests.proxy_helpers import base_url
from tests.support.procs import require_tool, run


@pytest.fixture
def data_fs(tmp_path: Path) -> Iterator[Path]:
    require_tool("mount")
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mountpoint)], what="mount tmpfs")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint / "data")], capture_output=True)  # a bind mount left over
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


async def readyz(client: Any) -> tuple[int, dict[str, dict[str, str]]]:
    response = await client.get("/readyz")
    body = await response.json()
    assert body["status"] == ("healthy" if response.status == 200 else "unhealthy")
    return response.status, {c["name"]: c for c in body["components"]}


@pytest.mark.needs_tools("mount")
async def test_readyz_follows_a_read_only_data_directory_and_a_stopped_upstream(
    aiohttp_server: Any, make_registry: Any, data_fs: Path
) -> None:
    fake = FakeUpstream()
    upstream = await aiohttp_server(fake.app())
    port = upstream.port
    client = await make_registry(
        storage={"path": str(data_fs / "data")}, upstreams=[upstream_config(base_url(upstream))]
    )
    client.server.app[HEALTH].upstream_ttl = 0.0  # no memory between probes, for the test

    assert (await client.get("/livez")).status == 200
    status, checks = await readyz(client)
    assert status == 200 and set(checks) == {"storage", "index", "upstream:fake.io"}

    # A read-only bind mount over the data directory: what the mirror opens from now on is read-only (the
    # index's open files keep the filesystem itself from being remounted, as on a real server).
    data = data_fs / "data"
    run(["mount", "--bind", str(data), str(data)], what="bind mount")
    run(["mount", "-o", "remount,bind,ro", str(data)], what="remount ro")
    status, checks = await readyz(client)
    assert status == 503
    assert checks["storage"]["status"] == "unhealthy" and "Read-only" in checks["storage"]["error"]
    assert checks["upstream:fake.io"]["status"] == "healthy"
    assert (await client.get("/livez")).status == 200  # alive all the same: a restart would not help
    run(["umount", str(data)], what="umount the read-only view")
    assert (await readyz(client))[0] == 200

    await upstream.close()
    status, checks = await readyz(client)
    assert status == 503 and checks["upstream:fake.io"]["status"] == "unhealthy"
    assert checks["storage"]["status"] == "healthy"
    upstream = await aiohttp_server(fake.app(), port=port)
    assert (await readyz(client))[0] == 200


async def test_an_offline_upstream_is_not_probed(aiohttp_server: Any, make_registry: Any) -> None:
    client = await make_registry(upstreams=[upstream_config("http://127.0.0.1:1", offline=True)])
    status, checks = await readyz(client)
    assert status == 200 and "upstream:fake.io" not in checks


async def test_created_samples_appear_only_when_asked_for(make_registry: Any, tmp_path: Path) -> None:
    plain = await make_registry()
    await plain.get("/v2/")
    text = await (await plain.get("/metrics")).text()
    assert "mirror_http_requests_total" in text and "_created" not in text
    asked = await make_registry(metrics={"created_series": True}, storage={"path": str(tmp_path / "other")})
    await asked.get("/v2/")
    assert "mirror_http_requests_created" in await (await asked.get("/metrics")).text()


def test_the_plain_access_log_line_names_each_field_once(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from mirror.observe.requests import RequestLogger

    request = make_mocked_request("GET", "/v2/library/alpine/manifests/3.20")
    request["endpoint"], request["repository"] = "manifest", "docker.io/library/alpine"
    logger = logging.getLogger("mirror.access-test")
    with caplog.at_level(logging.INFO, logger="mirror.access-test"):
        RequestLogger(logger, "").log(request, web.Response(status=200), 0.0123)
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith("GET /v2/library/alpine/manifests/3.20 route=manifest ")
    assert line.count("GET") == 1 and "status=200" in line and "duration_ms=12.3" in line
    assert caplog.records[0].http["method"] == "GET"  # type: ignore[attr-defined]
