"""Bounded in-memory LRUs: recently served manifests, so a hot tag costs no disk I/O at all, and the sizes
those manifests (or upstream HEADs) gave their blobs, so a download knows what length to expect.

Manifests are small and immutable by digest; a tag's entry also remembers when it was last confirmed
against the upstream, so the TTL decision needs nothing from disk either. The disk stays the source of
truth that survives restarts; this is only a shortcut in front of it, bounded by bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from mirror.oci.digest import Digest
from mirror.storage.interface import Manifest


@dataclass(frozen=True, slots=True)
class MemoEntry:
    manifest: Manifest
    validated_at: float


class ManifestMemo:
    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, MemoEntry] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable) -> MemoEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, manifest: Manifest, validated_at: float = 0.0) -> None:
        size = len(manifest.body)
        if size > self.max_bytes // 4:
            return  # one huge manifest must not flush everything else
        self.discard(key)
        self._entries[key] = MemoEntry(manifest, validated_at)
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            _key, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.manifest.body)

    def discard(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.manifest.body)

    def __len__(self) -> int:
        return len(self._entries)


class ExpectedSizes:
    """What size a blob must have, as a manifest served through a repository (its descriptor) or an
    upstream HEAD said, per (repository, digest); at most `max_entries`, least recently used out first.

    Kept in memory, not in the blob links: a size there would cost every link a data block. It is needed
    between a manifest being served and its blobs being fetched, which is one pull; after a restart the
    client's next manifest request records it again."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._sizes: OrderedDict[tuple[str, Digest], int] = OrderedDict()

    def record(self, repo: str, digest: Digest, size: int) -> None:
        key = (repo, digest)
        self._sizes[key] = size
        self._sizes.move_to_end(key)
        while len(self._sizes) > self.max_entries:
            self._sizes.popitem(last=False)

    def get(self, repo: str, digest: Digest) -> int | None:
        return self._sizes.get((repo, digest))

    def __len__(self) -> int:
        return len(self._sizes)
