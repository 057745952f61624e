"""Puts the benchmark's content into the upstream: one large random blob in an image, and a runnable
multi-layer image for `docker pull`."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.images import build_busybox_image
from tests.support.skopeo import copy as skopeo_copy

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class BigImage:
    repo: str
    tag: str
    blob_digest: str
    blob_size: int
    manifest_digest: str


def _connection(base_url: str, ca_file: Path | None = None) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        return http.client.HTTPSConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300, blocksize=1 << 20,
                                           context=context)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300, blocksize=1 << 20)


def _push_blob(base_url: str, repo: str, path: Path, digest: str, ca_file: Path | None = None) -> None:
    conn = _connection(base_url, ca_file)
    conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    response = conn.getresponse()
    response.read()
    location = response.getheader("Location")
    if response.status != 202 or not location:
        raise RuntimeError(f"upload start failed: {response.status}")
    if location.startswith("http"):
        parts = urlsplit(location)
        location = parts.path + (f"?{parts.query}" if parts.query else "")
    separator = "&" if "?" in location else "?"
    with open(path, "rb") as body:
        conn.request(
            "PUT", f"{location}{separator}digest={digest}", body=body,
            headers={"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"},
        )
        response = conn.getresponse()
        response.read()
    if response.status != 201:
        raise RuntimeError(f"blob PUT failed: {response.status}")
    conn.close()


def seed_big_image(base_url: str, workdir: Path, size_mb: int, repo: str = "bench/big", tag: str = "1",
                   *, ca_file: Path | None = None) -> BigImage:
    blob = workdir / "big.blob"
    hasher = hashlib.sha256()
    with open(blob, "wb") as handle:
        for _ in range(size_mb):
            chunk = os.urandom(1 << 20)
            hasher.update(chunk)
            handle.write(chunk)
    blob_digest = f"sha256:{hasher.hexdigest()}"
    _push_blob(base_url, repo, blob, blob_digest, ca_file)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_path = workdir / "config.json"
    config_path.write_bytes(config)
    config_digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
    _push_blob(base_url, repo, config_path, config_digest, ca_file)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob_digest,
                        "size": size_mb << 20}],
        }
    ).encode()
    conn = _connection(base_url, ca_file)
    conn.request("PUT", f"/v2/{repo}/manifests/{tag}", body=manifest, headers={"Content-Type": OCI_MANIFEST})
    response = conn.getresponse()
    response.read()
    if response.status != 201:
        raise RuntimeError(f"manifest PUT failed: {response.status}")
    blob.unlink()
    return BigImage(repo, tag, blob_digest, size_mb << 20, f"sha256:{hashlib.sha256(manifest).hexdigest()}")


# The image pulled at distance: busybox and nine more layers, from 12 MiB down to 8 KiB (28 MiB in all),
# the spread of a typical application image (a big base, a few middling layers, several small ones).
TEN_LAYERS = (12 << 20, 6 << 20, 4 << 20, 2 << 20, 1 << 20, 512 << 10, 256 << 10, 64 << 10, 8 << 10)


def seed_runnable_image(upstream_host: str, workdir: Path, repo: str = "library/benchbox", tag: str = "1",
                        extra_layers: tuple[int, ...] = (16 << 20, 16 << 20, 8 << 20)) -> str:
    """A busybox image with a few extra layers; returns the name Docker pulls through a mirror."""
    image = build_busybox_image(workdir / f"benchbox-{tag}", tag=tag, extra_layers=extra_layers)
    skopeo_copy(image.ref, f"docker://{upstream_host}/{repo}:{tag}")
    return f"{repo.removeprefix('library/')}:{tag}"
