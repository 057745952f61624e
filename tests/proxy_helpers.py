"""Shared by the pull-through tests: start a fake upstream plus a mirror in front of it, read metrics."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from mirror.state import CONFIG
from tests.fake_upstream import FakeUpstream, upstream_config

ServerFactory = Callable[..., Awaitable[TestServer]]
ClientFactory = Callable[..., Awaitable[TestClient]]


def base_url(server: TestServer, host: str | None = None) -> str:
    """`http://127.0.0.1:PORT` (or with another host name for the same port), no trailing slash."""
    return f"http://{host or server.host}:{server.port}"


async def start_mirror(
    aiohttp_server: ServerFactory,
    make_registry: ClientFactory,
    fake: FakeUpstream,
    *,
    config: dict[str, Any] | None = None,
    **upstream: Any,
) -> tuple[TestClient, TestServer]:
    """The fake upstream on a random port and a mirror whose default upstream `fake.io` is that server."""
    server = await aiohttp_server(fake.app())
    upstream.setdefault("library_prefix", True)
    client = await make_registry(upstreams=[upstream_config(base_url(server), **upstream)], **(config or {}))
    return client, server


def data_dir(client: TestClient) -> Path:
    return client.server.app[CONFIG].storage.path


def blob_files(client: TestClient) -> set[str]:
    root = data_dir(client) / "blobs"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def temp_files(client: TestClient) -> list[Path]:
    root = data_dir(client) / "tmp"
    return [p for p in root.iterdir() if p.is_file()] if root.exists() else []


async def metrics_text(client: TestClient | ClientSession) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    return await response.text()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll a cheap condition (a file appearing, a counter moving) without sleeping longer than needed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def fills_settled(client: TestClient | ClientSession, timeout: float = 10.0) -> None:
    """Wait until no fill is running. A client gets its last byte as soon as the digest is verified; the
    commit (fsync, rename, index, metrics) finishes just after, so look at the cache only then."""
    deadline = time.monotonic() + timeout
    while metric_value(await metrics_text(client), "mirror_fills_in_progress") > 0:
        if time.monotonic() > deadline:
            raise AssertionError("fills still running")
        await asyncio.sleep(0.01)


async def assert_stopping_mid_download_is_prompt(
    client: TestClient, fake: FakeUpstream, digest: str, size: int
) -> None:
    """With a download of `digest` stalled halfway upstream, stopping the server takes seconds, not the
    socket timeout, and leaves no temp file behind."""
    await eventually(lambda: fake.bytes_sent[digest] >= size // 2, what="half the blob sent")
    await eventually(lambda: bool(temp_files(client)), what="the fill's temp file")
    data_tmp = temp_files(client)[0].parent
    started = time.monotonic()
    await client.close()  # app cleanup: fills are cancelled and their threads woken
    assert time.monotonic() - started < 5
    assert [p for p in data_tmp.iterdir() if p.is_file()] == []
