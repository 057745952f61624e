"""Deterministic builders of OCI image layouts, in pure Python.

An OCI layout (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``) is what
``skopeo copy oci:DIR:TAG ...`` reads, so these images can be pushed to any
registry, loaded into dockerd or compared digest-for-digest after a round trip.
Images with Docker media types (schema2 manifest / manifest list) are written in
skopeo's ``dir:`` format instead (see ``_DirWriter`` for why); ``BuiltImage.ref``
gives the right skopeo reference either way.

Determinism: tar entries carry fixed mtimes/owners and gzip carries mtime 0 and
no file name, so for a given seed (and the same /bin/busybox on the machine)
every digest is the same from run to run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import random
import struct
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .procs import require_file

MediaStyle = Literal["oci", "docker"]

BUSYBOX_PATH = Path(os.environ.get("MIRROR_TEST_BUSYBOX", "/bin/busybox"))
DEFAULT_MARKER = "hello-from-mirror"
# A fixed timestamp (2024-01-01T00:00:00Z) for tar entries and image configs.
EPOCH = 1704067200
CREATED = "2024-01-01T00:00:00Z"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class MediaTypes:
    manifest: str
    index: str
    config: str
    layer_gzip: str


MEDIA_TYPES: dict[str, MediaTypes] = {
    "oci": MediaTypes(
        manifest="application/vnd.oci.image.manifest.v1+json",
        index="application/vnd.oci.image.index.v1+json",
        config="application/vnd.oci.image.config.v1+json",
        layer_gzip="application/vnd.oci.image.layer.v1.tar+gzip",
    ),
    "docker": MediaTypes(
        manifest="application/vnd.docker.distribution.manifest.v2+json",
        index="application/vnd.docker.distribution.manifest.list.v2+json",
        config="application/vnd.docker.container.image.v1+json",
        layer_gzip="application/vnd.docker.image.rootfs.diff.tar.gzip",
    ),
}


def host_arch() -> str:
    """The machine's architecture in OCI/GOARCH spelling (amd64, arm64, ...)."""
    machine = _platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def other_arch() -> str:
    """An architecture that is not this machine's, for the non-runnable half of a multi-arch image."""
    return "arm64" if host_arch() == "amd64" else "amd64"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Layer:
    digest: str  # of the compressed blob: what manifests reference
    diff_id: str  # of the uncompressed tar: what the config's rootfs lists
    size: int
    media_type: str


@dataclass(frozen=True)
class ManifestInfo:
    """One image manifest (one platform) and everything it references."""

    platform: str  # "linux/amd64"
    digest: str
    media_type: str
    size: int
    config_digest: str
    layers: tuple[Layer, ...]
    runnable: bool  # True when its layer holds a busybox for this machine

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple(layer.digest for layer in self.layers)

    @property
    def blob_digests(self) -> tuple[str, ...]:
        return (self.config_digest, *self.layer_digests)


@dataclass(frozen=True)
class BuiltImage:
    """An image written to an OCI layout, with every digest needed to check a round trip."""

    layout: Path
    tag: str
    media: MediaStyle
    digest: str  # what the tag points at: the index for multi-arch, else the manifest
    media_type: str
    size: int
    manifests: tuple[ManifestInfo, ...]
    index_digest: str | None = None  # None for a single-platform image
    marker: str = DEFAULT_MARKER

    @property
    def ref(self) -> str:
        """The skopeo source reference: ``oci:DIR:TAG``, or ``dir:DIR`` for Docker media types."""
        return f"oci:{self.layout}:{self.tag}" if self.media == "oci" else f"dir:{self.layout}"

    @property
    def is_index(self) -> bool:
        return self.index_digest is not None

    def manifest_for(self, platform: str) -> ManifestInfo:
        for manifest in self.manifests:
            if manifest.platform == platform:
                return manifest
        raise KeyError(f"no manifest for {platform}; have {[m.platform for m in self.manifests]}")

    @property
    def host_manifest(self) -> ManifestInfo:
        return self.manifest_for(f"linux/{host_arch()}")

    @property
    def manifest_digests(self) -> tuple[str, ...]:
        return tuple(m.digest for m in self.manifests)

    @property
    def config_digests(self) -> tuple[str, ...]:
        return tuple(m.config_digest for m in self.manifests)

    @property
    def layer_digests(self) -> tuple[str, ...]:
        """Unique layer digests across platforms, in first-seen order."""
        seen: dict[str, None] = {}
        for manifest in self.manifests:
            for digest in manifest.layer_digests:
                seen.setdefault(digest)
        return tuple(seen)

    @property
    def all_digests(self) -> frozenset[str]:
        """Every blob and manifest digest the tag reaches."""
        digests = {self.digest, *self.manifest_digests, *self.config_digests, *self.layer_digests}
        return frozenset(digests)


class _Writer:
    """Where blobs and manifests go; two on-disk formats share the image-building code."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _write(self, path: Path, data: bytes) -> None:
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: a half-written blob never has its final name

    def blob(self, data: bytes) -> tuple[str, int]:
        raise NotImplementedError

    def manifest(self, data: bytes, *, top: bool) -> tuple[str, int]:
        raise NotImplementedError

    def json_blob(self, obj: Any) -> tuple[str, int]:
        return self.blob(_canonical_json(obj))

    def json_manifest(self, obj: Any, *, top: bool) -> tuple[str, int]:
        return self.manifest(_canonical_json(obj), top=top)

    def tag(self, tag: str, descriptor: dict[str, Any]) -> None:
        pass


class _OciLayoutWriter(_Writer):
    """An OCI image layout; ``dest`` may already hold one, the new tag is added."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def blob(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        self._write(self.root / "blobs" / "sha256" / digest.split(":", 1)[1], data)
        return digest, len(data)

    def manifest(self, data: bytes, *, top: bool) -> tuple[str, int]:
        return self.blob(data)

    def tag(self, tag: str, descriptor: dict[str, Any]) -> None:
        """Point ``tag`` at ``descriptor`` in index.json, replacing an older entry of that tag."""
        index_path = self.root / "index.json"
        if index_path.exists():
            index = json.loads(index_path.read_text())
        else:
            index = {"schemaVersion": 2, "mediaType": MEDIA_TYPES["oci"].index, "manifests": []}
        manifests = [
            m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
        ]
        manifests.append({**descriptor, "annotations": {REF_NAME_ANNOTATION: tag}})
        index["manifests"] = manifests
        index_path.write_text(json.dumps(index, sort_keys=True, indent=1))


class _DirWriter(_Writer):
    """containers/image's ``dir:`` transport: one image per directory.

    Used for Docker media types because skopeo 1.9's ``oci:`` transport ignores
    index.json entries whose mediaType is not an OCI one ("no descriptor found
    for reference"), so a Docker manifest list cannot be read from an OCI layout.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root}: a dir: image needs its own empty directory")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "version").write_text("Directory Transport Version: 1.1\n")

    def blob(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        self._write(self.root / digest.split(":", 1)[1], data)
        return digest, len(data)

    def manifest(self, data: bytes, *, top: bool) -> tuple[str, int]:
        digest = sha256_digest(data)
        name = "manifest.json" if top else f"{digest.split(':', 1)[1]}.manifest.json"
        self._write(self.root / name, data)
        return digest, len(data)


def _writer(dest: Path, media: MediaStyle) -> _Writer:
    return _OciLayoutWriter(dest) if media == "oci" else _DirWriter(dest)


def _canonical_json(obj: Any) -> bytes:
    # Compact, key-sorted JSON: stable bytes, hence stable digests.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _tar_bytes(entries: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    # mtime=0 and an empty filename keep the gzip header free of run-specific bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def _layer(writer: _Writer, tar: bytes, media: MediaTypes) -> Layer:
    compressed = _gzip(tar)
    digest, size = writer.blob(compressed)
    return Layer(digest=digest, diff_id=sha256_digest(tar), size=size, media_type=media.layer_gzip)


def _elf_is_dynamic(data: bytes) -> bool:
    """True when a 64-bit little-endian ELF has a PT_INTERP header, i.e. needs a dynamic loader."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False  # not an ELF64 LE we can read; let the container decide
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def busybox_layer_tar() -> bytes:
    """``/bin/busybox`` plus a ``/bin/sh`` symlink: enough for ``sh -c 'echo ...'`` to run.

    The image has no libc, so busybox must be static: Debian's busybox-static,
    not the dynamically linked busybox package.
    """
    data = require_file(BUSYBOX_PATH, "apt-get install busybox-static").read_bytes()
    if _elf_is_dynamic(data):
        raise RuntimeError(f"{BUSYBOX_PATH} is dynamically linked; install busybox-static")
    return _tar_bytes(
        [
            (_info("bin", tarfile.DIRTYPE, 0o755), None),
            (_info("bin/busybox", tarfile.REGTYPE, 0o755, size=len(data)), data),
            (_info("bin/sh", tarfile.SYMTYPE, 0o777, linkname="busybox"), None),
            (_info("tmp", tarfile.DIRTYPE, 0o1777), None),
        ]
    )


def marker_layer_tar(text: str) -> bytes:
    """A tiny layer holding a text file; used for the non-runnable (foreign-arch) half."""
    data = text.encode()
    return _tar_bytes(
        [
            (_info("etc", tarfile.DIRTYPE, 0o755), None),
            (_info("etc/mirror-test-arch", tarfile.REGTYPE, 0o644, size=len(data)), data),
        ]
    )


def random_layer_tar(rng: random.Random, size: int, index: int) -> bytes:
    """One file of ``size`` random bytes: incompressible, so the blob is about ``size`` long."""
    data = rng.randbytes(size)
    return _tar_bytes(
        [
            (_info("data", tarfile.DIRTYPE, 0o755), None),
            (_info(f"data/blob-{index}.bin", tarfile.REGTYPE, 0o644, size=size), data),
        ]
    )


def _image_manifest(
    writer: _Writer,
    *,
    arch: str,
    media: MediaTypes,
    first_layer_tar: bytes,
    extra_layers: Sequence[int],
    seed: int,
    marker: str,
    runnable: bool,
    top: bool,
) -> ManifestInfo:
    rng = random.Random(f"{seed}:{arch}")
    layers = [_layer(writer, first_layer_tar, media)]
    layers += [_layer(writer, random_layer_tar(rng, size, i), media) for i, size in enumerate(extra_layers)]
    config = {
        "architecture": arch,
        "os": "linux",
        "created": CREATED,
        "config": {
            "Cmd": ["/bin/sh", "-c", f"echo {marker}"],
            "Env": ["PATH=/bin"],
            # The seed in a label makes configs (hence manifests) differ between seeds
            # even when the layers are shared.
            "Labels": {"mirror.test.seed": str(seed), "mirror.test.arch": arch},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": f"mirror test layer {i}"} for i in range(len(layers))],
    }
    config_digest, config_size = writer.json_blob(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": media.manifest,
        "config": {"mediaType": media.config, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    digest, size = writer.json_manifest(manifest, top=top)
    return ManifestInfo(
        platform=f"linux/{arch}",
        digest=digest,
        media_type=media.manifest,
        size=size,
        config_digest=config_digest,
        layers=tuple(layers),
        runnable=runnable,
    )


def build_busybox_image(
    dest: Path,
    *,
    tag: str = "1",
    seed: int = 0,
    extra_layers: Sequence[int] = (),
    media: MediaStyle = "oci",
    marker: str = DEFAULT_MARKER,
) -> BuiltImage:
    """A single-platform image for this machine that runs: its Cmd echoes ``marker``.

    ``extra_layers`` are sizes in bytes of additional random layers (seeded).
    ``dest`` may already hold a layout; the new tag is added to it.
    """
    types = MEDIA_TYPES[media]
    writer = _writer(Path(dest), media)
    manifest = _image_manifest(
        writer,
        arch=host_arch(),
        media=types,
        first_layer_tar=busybox_layer_tar(),
        extra_layers=extra_layers,
        seed=seed,
        marker=marker,
        runnable=True,
        top=True,
    )
    writer.tag(tag, {"mediaType": manifest.media_type, "digest": manifest.digest, "size": manifest.size})
    return BuiltImage(
        layout=Path(dest),
        tag=tag,
        media=media,
        digest=manifest.digest,
        media_type=manifest.media_type,
        size=manifest.size,
        manifests=(manifest,),
        marker=marker,
    )


def build_multiarch_image(
    dest: Path,
    *,
    tag: str = "1",
    seed: int = 0,
    extra_layers: Sequence[int] = (),
    media: MediaStyle = "oci",
    marker: str = DEFAULT_MARKER,
) -> BuiltImage:
    """An index (or Docker manifest list) for linux/amd64 and linux/arm64.

    The entry for this machine's architecture is the runnable busybox image;
    the other one holds a marker file (it could not run here anyway).
    """
    types = MEDIA_TYPES[media]
    writer = _writer(Path(dest), media)
    native, foreign = host_arch(), other_arch()
    manifests = []
    for arch in sorted({native, foreign}):
        runnable = arch == native
        first = busybox_layer_tar() if runnable else marker_layer_tar(f"linux/{arch} seed={seed}\n")
        manifests.append(
            _image_manifest(
                writer,
                arch=arch,
                media=types,
                first_layer_tar=first,
                extra_layers=extra_layers,
                seed=seed,
                marker=marker,
                runnable=runnable,
                top=False,
            )
        )
    index = {
        "schemaVersion": 2,
        "mediaType": types.index,
        "manifests": [
            {
                "mediaType": m.media_type,
                "digest": m.digest,
                "size": m.size,
                "platform": {"architecture": m.platform.split("/")[1], "os": "linux"},
            }
            for m in manifests
        ],
    }
    digest, size = writer.json_manifest(index, top=True)
    writer.tag(tag, {"mediaType": types.index, "digest": digest, "size": size})
    return BuiltImage(
        layout=Path(dest),
        tag=tag,
        media=media,
        digest=digest,
        media_type=types.index,
        size=size,
        manifests=tuple(manifests),
        index_digest=digest,
        marker=marker,
    )


def read_layout_tag(layout: Path, tag: str) -> dict[str, Any]:
    """The index.json descriptor that ``tag`` points at in an OCI layout (e.g. one skopeo wrote)."""
    index = json.loads((Path(layout) / "index.json").read_text())
    for descriptor in index.get("manifests", []):
        if descriptor.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            return dict(descriptor)
    raise KeyError(f"tag {tag!r} not in {layout}/index.json")


def _is_dir_transport(path: Path) -> bool:
    return (Path(path) / "version").is_file() and (Path(path) / "manifest.json").is_file()


def read_blob(layout: Path, digest: str) -> bytes:
    """A blob or manifest by digest, from an OCI layout or a ``dir:`` directory."""
    algorithm, hexdigest = digest.split(":", 1)
    root = Path(layout)
    if _is_dir_transport(root):
        for candidate in (root / hexdigest, root / f"{hexdigest}.manifest.json", root / "manifest.json"):
            if not candidate.is_file():
                continue
            data = candidate.read_bytes()
            # manifest.json is only the answer when it is the manifest asked for.
            if candidate.name != "manifest.json" or sha256_digest(data) == digest:
                return data
        raise FileNotFoundError(f"{digest} not in {root}")
    return (root / "blobs" / algorithm / hexdigest).read_bytes()


def top_manifest(path: Path, tag: str | None = None) -> tuple[str, bytes]:
    """(digest, bytes) of what ``tag`` points at (OCI layout) or of ``manifest.json`` (``dir:``)."""
    if _is_dir_transport(path):
        data = (Path(path) / "manifest.json").read_bytes()
        return sha256_digest(data), data
    if tag is None:
        raise ValueError("an OCI layout needs a tag")
    digest = str(read_layout_tag(path, tag)["digest"])
    return digest, read_blob(path, digest)


def layout_digests(layout: Path, tag: str | None = None) -> frozenset[str]:
    """Every manifest/config/layer digest reachable from ``tag`` (OCI layout) or in a ``dir:`` image.

    Lets a test compare an image pulled back from a registry with the BuiltImage
    it pushed: ``layout_digests(pulled, tag) == image.all_digests``.
    """
    top_digest, top_data = top_manifest(layout, tag)
    found: set[str] = set()

    def walk(digest: str, data: bytes) -> None:
        found.add(digest)
        doc = json.loads(data)
        if "manifests" in doc:
            for child in doc["manifests"]:
                walk(child["digest"], read_blob(layout, child["digest"]))
        else:
            found.add(doc["config"]["digest"])
            found.update(layer["digest"] for layer in doc["layers"])

    walk(top_digest, top_data)
    return frozenset(found)


def verify_layout(layout: Path) -> None:
    """Assert every blob hashes to its own name (catches truncated or corrupt copies)."""
    root = Path(layout)
    if _is_dir_transport(root):
        paths = [p for p in root.iterdir() if p.name not in ("version", "manifest.json")]
        names = {p: p.name.removesuffix(".manifest.json") for p in paths}
    else:
        paths = list((root / "blobs" / "sha256").iterdir())
        names = {p: p.name for p in paths}
    for path in paths:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != names[path]:
            raise AssertionError(f"blob {path} hashes to {actual}")
