"""Digests: parsing, validation and incremental hashing."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mirror.errors import DigestInvalid

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"(sha256|sha512):([0-9a-f]+)")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `algorithm:hex`; anything but lowercase sha256/sha512 of the right length is DIGEST_INVALID."""
        match = _DIGEST.fullmatch(text)
        if not match or len(match.group(2)) != _HEX_LENGTH[match.group(1)]:
            raise DigestInvalid(f"invalid digest: {text[:200]!r}", detail={"digest": text[:200]})
        return cls(match.group(1), match.group(2))

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


def looks_like_digest(reference: str) -> bool:
    """A manifest reference containing ':' can only be meant as a digest (tags cannot contain ':')."""
    return ":" in reference
