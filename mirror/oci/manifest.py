"""Manifest parsing and validation.

A manifest's bytes are never re-serialised: its digest is the hash of exactly what was pushed or fetched.
This module only reads the JSON to learn what the manifest references and to reject what must not be
stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mirror.errors import ManifestInvalid
from mirror.oci.digest import Digest

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY_JSON = "application/vnd.oci.empty.v1+json"

INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
IMAGE_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

# Layers a registry is not given: clients fetch them from the descriptor's `urls` (Windows base layers) or
# already have them. OCI deprecated these types in image-spec 1.1 but images carrying them are still pushed.
NONDISTRIBUTABLE_LAYER_PREFIX = "application/vnd.oci.image.layer.nondistributable."
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

# What a client asking for any manifest accepts; used for upstream requests.
ACCEPT_ALL_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    """What the registry needs to know about a manifest; the bytes themselves are kept elsewhere."""

    media_type: str
    blobs: tuple[Descriptor, ...]  # config and layers: must exist in the repository
    manifests: tuple[Descriptor, ...]  # children of an index: must exist in the repository
    subject: Descriptor | None
    artifact_type: str | None
    annotations: dict[str, str] = field(default_factory=dict)
    # Non-distributable layers (see `is_foreign_layer`): never required, fetched or cached by the registry.
    foreign: tuple[Descriptor, ...] = ()

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def references(self) -> tuple[Descriptor, ...]:
        """Every blob the manifest names, foreign layers included: what gc keeps if this repository has it."""
        return self.blobs + self.foreign


def _descriptor(raw: Any, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ManifestInvalid(f"{where} is not a descriptor object")
    media_type = raw.get("mediaType")
    digest = raw.get("digest")
    size = raw.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise ManifestInvalid(f"{where} needs string mediaType and digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(f"{where} needs a non-negative integer size")
    try:
        parsed_digest = Digest.parse(digest)
    except Exception as exc:  # DigestInvalid: the manifest is what's invalid here
        raise ManifestInvalid(f"{where} has an invalid digest {digest[:100]!r}") from exc
    artifact_type = raw.get("artifactType")
    annotations = raw.get("annotations")
    return Descriptor(
        media_type,
        parsed_digest,
        size,
        artifact_type if isinstance(artifact_type, str) else None,
        annotations if isinstance(annotations, dict) else None,
    )


def is_foreign_layer(raw: dict[str, Any]) -> bool:
    """A layer the registry is not expected to hold: a non-distributable media type, or `urls` to fetch it
    from. A push leaves its blob out, so a registry that required it would refuse the manifest."""
    media_type = raw.get("mediaType", "")
    return (
        media_type.startswith(NONDISTRIBUTABLE_LAYER_PREFIX)
        or media_type == DOCKER_FOREIGN_LAYER
        or bool(raw.get("urls"))
    )


def _check_urls(raw: dict[str, Any], where: str) -> None:
    urls = raw.get("urls")
    if urls is None:
        return
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestInvalid(f"{where}.urls must be a list of strings")
    for url in urls:
        # What a client will download instead of asking us: an absolute http(s) URL, as distribution requires.
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # e.g. an unclosed IPv6 bracket
            raise ManifestInvalid(f"{where}.urls has {url[:200]!r}, not a URL") from exc
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            raise ManifestInvalid(f"{where}.urls has {url[:200]!r}, not an absolute http(s) URL without a fragment")


def parse_manifest(body: bytes, content_type: str | None, *, pushed: bool = False) -> ParsedManifest:
    """Parse and validate a manifest as pushed with `content_type` (or fetched with it).

    Raises MANIFEST_INVALID for schema 1, invalid JSON, a mediaType that disagrees with the
    Content-Type, and documents carrying both `manifests` and `layers` (CVE-2021-41190).
    `pushed` (a client's PUT) also checks layer `urls`: a stored or upstream manifest that was accepted
    before that check existed must still parse, or gc would lose track of what it references.
    """
    content_type = (content_type or "").split(";")[0].strip()
    if content_type in SCHEMA1_TYPES:
        raise ManifestInvalid("Docker schema 1 manifests are not supported; push schema 2 or OCI")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        # `[[[[...` a few thousand deep fits in any size limit and exhausts the recursive decoder;
        # uncaught it would be a 500 instead of the client's error.
        raise ManifestInvalid("manifest JSON is nested too deeply") from exc
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise ManifestInvalid("Docker schema 1 manifests are not supported; push schema 2 or OCI")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("manifest schemaVersion must be 2")
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string")
    if "manifests" in doc and ("layers" in doc or "config" in doc):
        raise ManifestInvalid("manifest carries both manifests and layers/config (ambiguous document)")
    if declared and content_type and content_type != declared and content_type in MANIFEST_TYPES:
        raise ManifestInvalid(f"mediaType {declared!r} disagrees with Content-Type {content_type!r}")
    media_type = declared or content_type or ""
    if not media_type:
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type in SCHEMA1_TYPES:
        raise ManifestInvalid("Docker schema 1 manifests are not supported; push schema 2 or OCI")
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}")

    blobs: list[Descriptor] = []
    foreign: list[Descriptor] = []
    children: list[Descriptor] = []
    if media_type in INDEX_TYPES:
        raw_children = doc.get("manifests")
        if not isinstance(raw_children, list):
            raise ManifestInvalid("an index needs a manifests list")
        children = [_descriptor(item, f"manifests[{i}]") for i, item in enumerate(raw_children)]
    else:
        if "config" not in doc:
            raise ManifestInvalid("an image manifest needs a config descriptor")
        blobs.append(_descriptor(doc["config"], "config"))
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise ManifestInvalid("an image manifest needs a layers list")
        for i, item in enumerate(raw_layers):
            layer = _descriptor(item, f"layers[{i}]")  # checks that `item` is an object
            if pushed:
                _check_urls(item, f"layers[{i}]")
            (foreign if is_foreign_layer(item) else blobs).append(layer)

    subject = _descriptor(doc["subject"], "subject") if doc.get("subject") is not None else None
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid("artifactType must be a string")
    if artifact_type is None and media_type == OCI_MANIFEST and blobs:
        # OCI 1.1: a referrer without artifactType is listed under its config's media type.
        artifact_type = blobs[0].media_type
    annotations = doc.get("annotations")
    return ParsedManifest(
        media_type=media_type,
        blobs=tuple(blobs),
        manifests=tuple(children),
        subject=subject,
        artifact_type=artifact_type,
        annotations=annotations if isinstance(annotations, dict) else {},
        foreign=tuple(foreign),
    )
