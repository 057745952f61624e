"""Shared by the bounded-cache, maintenance, crash and disk-full tests: images on the fake upstream, pulls
that check every byte, and a consistency check of a data directory (blobs, index, temp files)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient

from mirror.cache.index import BlobIndex, BlobRecord
from tests.fake_upstream import OCI_MANIFEST, FakeUpstream, digest_of
from tests.proxy_helpers import fills_settled

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
PIECE = 64 << 10  # what Http writes to the socket at a time


@dataclass(frozen=True)
class Image:
    repo: str  # as the client names it through the mirror
    tag: str
    manifest: bytes
    config: bytes
    layers: tuple[bytes, ...]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def layer_digests(self) -> list[str]:
        return [digest_of(layer) for layer in self.layers]

    @property
    def blob_digests(self) -> list[str]:
        return [digest_of(self.config), *self.layer_digests]

    @property
    def all_digests(self) -> list[str]:
        return [self.digest, *self.blob_digests]

    @property
    def total_bytes(self) -> int:
        return len(self.manifest) + len(self.config) + sum(len(layer) for layer in self.layers)


def make_image(repo: str, tag: str, layers: list[bytes], *, label: str | None = None) -> Image:
    """An OCI image whose config is unique (labelled), so images share no blob unless told to."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"},
         "config": {"Labels": {"image": label or f"{repo}:{tag}"}}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config),
                       "size": len(config)},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(layer), "size": len(layer)}
                for layer in layers
            ],
        }
    ).encode()
    return Image(repo, tag, manifest, config, tuple(layers))


def add_to_upstream(fake: FakeUpstream, image: Image, upstream_repo: str | None = None) -> None:
    repo = upstream_repo or image.repo
    fake.add_blob(image.config)
    for layer in image.layers:
        fake.add_blob(layer)
    fake.manifests[(repo, image.tag)] = (image.manifest, OCI_MANIFEST)
    fake.manifests[(repo, image.digest)] = (image.manifest, OCI_MANIFEST)
    fake.tags.setdefault(repo, []).append(image.tag)


async def pull(client: TestClient | ClientSession, image: Image, *, by_digest: bool = False) -> None:
    """Pull an image the way a client does, checking the manifest and every blob byte for byte."""
    reference = image.digest if by_digest else image.tag
    async with client.get(f"/v2/{image.repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200, (image.repo, reference, response.status, await response.text())
        assert await response.read() == image.manifest
    for blob in (image.config, *image.layers):
        async with client.get(f"/v2/{image.repo}/blobs/{digest_of(blob)}") as response:
            assert response.status == 200, (image.repo, digest_of(blob), response.status, await response.text())
            body = await response.read()
            assert len(body) == len(blob) and body == blob, f"wrong bytes for {digest_of(blob)}"
    await fills_settled(client)



async def push(client: TestClient | ClientSession, image: Image) -> None:
    """Monolithic pushes of every blob, then the manifest by tag."""
    for blob in (image.config, *image.layers):
        async with client.post(f"/v2/{image.repo}/blobs/uploads/", params={"digest": digest_of(blob)}, data=blob) as r:
            assert r.status == 201, await r.text()
    async with client.put(
        f"/v2/{image.repo}/manifests/{image.tag}", data=image.manifest, headers={"Content-Type": OCI_MANIFEST}
    ) as r:
        assert r.status == 201, await r.text()


# -- the data directory -------------------------------------------------------------------------------


def blob_files(root: Path) -> dict[str, Path]:
    """digest -> path of every committed blob file."""
    found: dict[str, Path] = {}
    base = root / "blobs"
    if base.exists():
        for path in base.glob("*/*/*"):
            if path.is_file():
                found[f"{path.parent.parent.name}:{path.name}"] = path
    return found


def index_rows(root: Path) -> dict[str, BlobRecord]:
    index = BlobIndex(root / "index")  # diskcache is process-safe: fine while a server runs
    try:
        return dict(index.items())
    finally:
        index.close()


def check_store(root: Path, *, temp_files_allowed: bool = False) -> dict[str, BlobRecord]:
    """Every blob file hashes to its name, the index has exactly one row per file with its size, and (unless
    allowed) no temp file is left. Returns the index rows."""
    files = blob_files(root)
    for digest, path in files.items():
        algorithm, _, hex_ = digest.partition(":")
        assert hashlib.new(algorithm, path.read_bytes()).hexdigest() == hex_, f"{path} does not hash to its name"
    rows = index_rows(root)
    assert set(rows) == set(files), (
        f"index and disk disagree: rows without files {sorted(set(rows) - set(files))}, "
        f"files without rows {sorted(set(files) - set(rows))}"
    )
    for digest, record in rows.items():
        assert record.size == files[digest].stat().st_size, f"index size of {digest} is wrong"
    if not temp_files_allowed:
        leftovers = [p.name for p in (root / "tmp").iterdir()] if (root / "tmp").exists() else []
        assert leftovers == [], f"temp files left behind: {leftovers}"
    return rows


def backdate(root: Path, seconds: float) -> None:
    """Make every file and directory under `root` look `seconds` old (for grace periods)."""
    when = time.time() - seconds
    for path in [root, *root.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


def write_config(path: Path, data_dir: Path, **extra: Any) -> Path:
    config: dict[str, Any] = {"storage": {"path": str(data_dir)}, **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m mirror ARGS` from this checkout, as an operator runs it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
    )


class ThreadedServer:
    """An aiohttp app (e.g. the fake upstream) served from its own thread and loop on 127.0.0.1, for tests
    whose mirror is a real process and whose test body is synchronous."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = 0
        self._loop: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadedServer:
        from aiohttp import web

        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(self.app)
            try:
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, "127.0.0.1", 0)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(runner.cleanup())
                loop.close()

        self._thread = threading.Thread(target=serve, name="threaded-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None


class Http:
    """Tiny blocking client for the mirror process (http.client: nothing between us and the socket)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        *, pieces_delay: float = 0.0, timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for key, value in (headers or {}).items():
                conn.putheader(key, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            if body:
                for offset in range(0, len(body), PIECE):
                    conn.send(body[offset : offset + PIECE])
                    if pieces_delay:
                        time.sleep(pieces_delay)
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    def reconciled(self, timeout: float = 30.0) -> None:
        """Wait until start-up reconciliation of the index is done (it runs while the mirror serves)."""
        deadline = time.monotonic() + timeout
        while True:
            _, _, body = self.request("GET", "/metrics")
            if re.search(rb"^mirror_index_reconciled 1(\.0)?$", body, re.M):
                return
            if time.monotonic() > deadline:
                raise AssertionError("start-up reconciliation did not finish")
            time.sleep(0.01)

    def fills_settled(self, timeout: float = 10.0) -> None:
        """Wait until no fill is running (the commit follows a client's last byte; see fills_settled)."""
        deadline = time.monotonic() + timeout
        while True:
            _, _, body = self.request("GET", "/metrics")
            running = re.search(rb"^mirror_fills_in_progress (\S+)$", body, re.M)
            if running is None or float(running.group(1)) == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError("fills still running")
            time.sleep(0.01)
