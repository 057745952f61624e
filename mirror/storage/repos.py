"""Repository links: which blobs and manifests a repository may serve, its tags and its referrers.

Layout under a root (one root for local repositories, one per upstream for cached ones):

    <name>/_layers/<alg>/<hex>                 empty file: the blob is readable through <name>
    <name>/_manifests/<alg>/<hex>              JSON {mediaType, size[, referencesLinked]}: the manifest
                                               belongs to <name>
    <name>/_tags/<tag>                         the digest the tag points to (mtime = last validated)
    <name>/_referrers/<alg>/<subject hex>/<alg>-<hex>   JSON descriptor of a manifest whose subject it is

Name components start with [a-z0-9], so `_layers` & co can never collide with a nested repository.
Every method blocks; callers on the event loop run them through a thread.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mirror.errors import DigestInvalid
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import Descriptor
from mirror.oci.names import is_valid_name, is_valid_tag, validate_tag
from mirror.storage.files import atomic_write, read_bytes_or_none

if TYPE_CHECKING:
    from mirror.storage.blobs import BlobStore, StoredBlob

_MARKERS = ("_layers", "_manifests", "_tags")


@dataclass(frozen=True, slots=True)
class ManifestLink:
    digest: Digest
    media_type: str
    size: int
    # Cached repositories: the blobs and child manifests this manifest references are linked too (the
    # upstream serving the manifest vouched for them). False for links written before that was done.
    references_linked: bool = False


@dataclass(frozen=True, slots=True)
class TagLink:
    digest: Digest
    validated_at: float  # when the tag was written or last confirmed against its upstream


# The link formats, shared with the S3 metadata store (mirror/storage/s3_meta.py) so both read and write the
# same bytes.
def encode_manifest_link(link: ManifestLink) -> bytes:
    data: dict[str, object] = {"mediaType": link.media_type, "size": link.size}
    if link.references_linked:
        data["referencesLinked"] = True
    return json.dumps(data).encode()


def decode_manifest_link(digest: Digest, text: str | bytes) -> ManifestLink | None:
    """The link, or None when the text is not one (torn, foreign)."""
    try:
        data = json.loads(text)
        return ManifestLink(digest, str(data["mediaType"]), int(data["size"]), data.get("referencesLinked") is True)
    except (ValueError, KeyError, TypeError):
        return None


def encode_referrer(referrer: Descriptor) -> bytes:
    return json.dumps(referrer.to_json()).encode()


def decode_referrer(text: str | bytes) -> Descriptor | None:
    """The referrer's descriptor, or None when the text is not one (torn, foreign)."""
    try:
        raw = json.loads(text)
        return Descriptor(
            media_type=raw["mediaType"],
            digest=Digest.parse(raw["digest"]),
            size=int(raw["size"]),
            artifact_type=raw.get("artifactType"),
            annotations=raw.get("annotations"),
        )
    except (ValueError, KeyError, TypeError, DigestInvalid):
        return None


class RepoStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _repo(self, name: str) -> Path:
        # Handlers validate names first; this is the last line of defence before a path is built.
        if not is_valid_name(name):
            raise ValueError(f"refusing to build a path from an invalid name {name!r}")
        return self.root / name

    def exists(self, name: str) -> bool:
        repo = self._repo(name)
        return any((repo / marker).is_dir() for marker in _MARKERS)

    # -- blobs -------------------------------------------------------------------------------------
    def link_blob(self, name: str, digest: Digest) -> None:
        # An empty file: it costs an inode and no data block, however many repositories link a blob.
        path = self._repo(name) / "_layers" / digest.algorithm / digest.hex
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)

    def has_blob(self, name: str, digest: Digest) -> bool:
        return (self._repo(name) / "_layers" / digest.algorithm / digest.hex).is_file()

    def unlink_blob(self, name: str, digest: Digest) -> bool:
        try:
            (self._repo(name) / "_layers" / digest.algorithm / digest.hex).unlink()
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def linked_blobs(self, name: str) -> list[Digest]:
        return self._digests_under(self._repo(name) / "_layers")

    # -- manifests ---------------------------------------------------------------------------------
    def link_manifest(self, name: str, link: ManifestLink) -> None:
        path = self._repo(name) / "_manifests" / link.digest.algorithm / link.digest.hex
        atomic_write(path, encode_manifest_link(link))

    def manifest_link(self, name: str, digest: Digest) -> ManifestLink | None:
        text = read_bytes_or_none(self._repo(name) / "_manifests" / digest.algorithm / digest.hex)
        # A torn or foreign file reads as absent; the writer is atomic, so this is damage.
        return None if text is None else decode_manifest_link(digest, text)

    def resolve(self, name: str, reference: str) -> ManifestLink | None:
        """The manifest a reference names in this repository: a digest it links, or a tag's target."""
        if looks_like_digest(reference):
            return self.manifest_link(name, Digest.parse(reference))
        tag = self.tag(name, validate_tag(reference))
        return self.manifest_link(name, tag.digest) if tag else None

    def unlink_manifest(self, name: str, digest: Digest) -> bool:
        try:
            (self._repo(name) / "_manifests" / digest.algorithm / digest.hex).unlink()
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def linked_manifests(self, name: str) -> list[Digest]:
        return self._digests_under(self._repo(name) / "_manifests")

    # -- tags --------------------------------------------------------------------------------------
    def set_tag(self, name: str, tag: str, digest: Digest) -> None:
        atomic_write(self._repo(name) / "_tags" / tag, str(digest).encode())

    def tag(self, name: str, tag: str) -> TagLink | None:
        path = self._repo(name) / "_tags" / tag
        try:
            data = path.read_bytes()
            mtime = path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return TagLink(Digest.parse(data.decode().strip()), mtime)
        except (UnicodeDecodeError, DigestInvalid):
            return None  # a foreign file reads as absent, as a torn manifest link does

    def touch_tag(self, name: str, tag: str, at: float | None = None) -> None:
        """Record that the tag was confirmed against its upstream just now (or at `at`, wall clock)."""
        when = time.time() if at is None else at
        try:
            os.utime(self._repo(name) / "_tags" / tag, (when, when))
        except FileNotFoundError:
            pass

    def delete_tag(self, name: str, tag: str) -> bool:
        try:
            (self._repo(name) / "_tags" / tag).unlink()
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def tags(self, name: str) -> list[str]:
        directory = self._repo(name) / "_tags"
        try:
            return sorted(entry for entry in os.listdir(directory) if is_valid_tag(entry))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def tags_pointing_to(self, name: str, digest: Digest) -> list[str]:
        return [tag for tag in self.tags(name) if (link := self.tag(name, tag)) and link.digest == digest]

    # -- referrers ---------------------------------------------------------------------------------
    def add_referrer(self, name: str, subject: Digest, referrer: Descriptor) -> None:
        path = (
            self._repo(name) / "_referrers" / subject.algorithm / subject.hex
            / f"{referrer.digest.algorithm}-{referrer.digest.hex}"
        )
        atomic_write(path, encode_referrer(referrer))

    def remove_referrer(self, name: str, subject: Digest, referrer: Digest) -> None:
        directory = self._repo(name) / "_referrers" / subject.algorithm / subject.hex
        path = directory / f"{referrer.algorithm}-{referrer.hex}"
        path.unlink(missing_ok=True)

    def referrers(self, name: str, subject: Digest) -> list[Descriptor]:
        directory = self._repo(name) / "_referrers" / subject.algorithm / subject.hex
        try:
            entries = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found: list[Descriptor] = []
        for entry in entries:
            text = read_bytes_or_none(directory / entry)
            descriptor = None if text is None else decode_referrer(text)
            if descriptor is not None:
                found.append(descriptor)
        return found

    # -- repositories ------------------------------------------------------------------------------
    def repositories(self) -> list[str]:
        """Every repository name under the root, sorted."""
        names: list[str] = []
        for directory, subdirs, _files in os.walk(self.root):
            if any(marker in subdirs for marker in _MARKERS):
                relative = os.path.relpath(directory, self.root)
                if relative != "." and is_valid_name(relative):
                    names.append(relative)
            # Never descend into link folders: they hold digests, not repositories.
            subdirs[:] = [d for d in subdirs if not d.startswith("_")]
        return sorted(names)

    def delete_repository(self, name: str) -> None:
        repo = self._repo(name)
        for marker in (*_MARKERS, "_referrers"):
            shutil.rmtree(repo / marker, ignore_errors=True)

    @staticmethod
    def _digests_under(directory: Path) -> list[Digest]:
        found: list[Digest] = []
        try:
            algorithms = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return found
        for algorithm in algorithms:
            for entry in os.listdir(directory / algorithm):
                try:
                    found.append(Digest.parse(f"{algorithm}:{entry}"))
                except DigestInvalid:
                    continue
        return found


def find_blob_sync(repos: RepoStore, blobs: BlobStore, name: str, digest: Digest) -> tuple[bool, StoredBlob | None]:
    """Blocking: whether `name` links the blob, and the stored file if there is one, in one thread hop
    (the lookup every blob GET starts with)."""
    return repos.has_blob(name, digest), blobs.stat_sync(digest)
