"""Shared by the registry tests: content builders and a few push helpers that speak the distribution API.

Every helper takes either aiohttp's TestClient (in-process app) or a ClientSession with a `base_url`
(a live server); both accept paths like `/v2/...`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, ClientSession
from aiohttp.test_utils import TestClient

HttpClient = TestClient | ClientSession
# The `make_registry` fixture of conftest.py: keyword arguments are config keys.
ClientFactory = Callable[..., Awaitable[TestClient]]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
EMPTY_CONFIG = b"{}"


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def image_manifest(
    config: bytes,
    layers: list[bytes],
    *,
    media_type: str = OCI_MANIFEST,
    config_type: str | None = None,
    **extra: Any,
) -> bytes:
    """An image manifest (OCI or Docker schema 2) as the exact bytes a client would push."""
    docker = media_type == DOCKER_MANIFEST
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor(config_type or (DOCKER_CONFIG if docker else OCI_CONFIG), config),
        "layers": [descriptor(DOCKER_LAYER if docker else OCI_LAYER, layer) for layer in layers],
        **extra,
    }
    # Unusual but legal formatting: the registry must keep these bytes exactly, not re-serialise them.
    return json.dumps(doc, indent=3).encode()


def index_manifest(children: list[tuple[str, bytes]], *, media_type: str = OCI_INDEX, **extra: Any) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            descriptor(child_type, body, platform={"architecture": "amd64", "os": "linux"})
            for child_type, body in children
        ],
        **extra,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


async def error_codes(response: ClientResponse) -> list[str]:
    """The codes of a registry error body, checking its shape on the way."""
    body = await response.json(content_type=None)
    assert isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"], body
    for entry in body["errors"]:
        assert isinstance(entry.get("code"), str) and isinstance(entry.get("message"), str), entry
    return [entry["code"] for entry in body["errors"]]


async def push_blob(client: HttpClient, name: str, data: bytes) -> str:
    """Monolithic upload; returns the digest."""
    digest = digest_of(data)
    async with client.post(f"/v2/{name}/blobs/uploads/", params={"digest": digest}, data=data) as response:
        assert response.status == 201, await response.text()
    return digest


async def put_manifest(client: HttpClient, name: str, reference: str, body: bytes, media_type: str) -> ClientResponse:
    response = await client.put(f"/v2/{name}/manifests/{reference}", data=body, headers={"Content-Type": media_type})
    await response.read()
    return response


async def push_image(
    client: HttpClient,
    name: str,
    tag: str,
    *,
    layers: tuple[bytes, ...] = (b"layer one", b"layer two"),
    config: bytes = b'{"architecture":"amd64","os":"linux"}',
    media_type: str = OCI_MANIFEST,
) -> tuple[str, bytes]:
    """Push the blobs and the manifest of a small image; returns (manifest digest, manifest bytes)."""
    for blob in (config, *layers):
        await push_blob(client, name, blob)
    body = image_manifest(config, list(layers), media_type=media_type)
    response = await put_manifest(client, name, tag, body, media_type)
    assert response.status == 201, await response.text()
    return digest_of(body), body


def files_under(root: Path) -> set[str]:
    """Every file below `root`, relative, for before/after comparisons."""
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


async def stored_bytes(client: TestClient, *, sessions: bool = False) -> set[str]:
    """Every blob (and temp file or object) an in-process registry holds, wherever it keeps them: the files
    under storage.path's blobs/ and tmp/, or the bucket's blobs/ and temp keys; with `sessions`, its upload
    sessions too. What a refused push must leave unchanged."""
    from mirror.state import CONFIG

    storage = client.server.app[CONFIG].storage
    if storage.backend != "s3" or storage.s3 is None:
        folders = ["blobs", "tmp", *(["uploads"] if sessions else [])]
        return {f"{folder}/{name}" for folder in folders for name in files_under(storage.path / folder)}
    from aiobotocore.session import get_session

    s3 = storage.s3
    prefixes = ("blobs/", "_uploads/", *(("sessions/",) if sessions else ()))
    async with get_session().create_client(
        "s3", endpoint_url=s3.endpoint, region_name=s3.region, aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
    ) as s3_client:
        keys: set[str] = set()
        async for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
            keys |= {entry["Key"] for entry in page.get("Contents", ()) if entry["Key"].startswith(prefixes)}
        return keys
