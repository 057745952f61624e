"""Registry error codes, each registered once with its HTTP status.

Storage and proxy code raise these domain errors; the error middleware renders them as the
distribution-spec `{"errors": [...]}` body. Nothing else in the code base decides a status code for a
registry error.
"""

from __future__ import annotations

import errno
from typing import Any

# A write that failed for want of room, whoever's quota it was: the clean 503 of StorageFull, not a 500.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class RegistryError(Exception):
    """An error a registry client understands: a code, an HTTP status, a message and optional detail."""

    code: str = "UNKNOWN"
    status: int = 500
    default_message: str = "unknown error"

    def __init__(
        self,
        message: str | None = None,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}



class BlobUnknown(RegistryError):
    code, status, default_message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class BlobUploadInvalid(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_INVALID", 400, "blob upload invalid"


class BlobUploadUnknown(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"


class DigestInvalid(RegistryError):
    code, status, default_message = "DIGEST_INVALID", 400, "provided digest did not match uploaded content"


class ManifestBlobUnknown(RegistryError):
    code, status, default_message = "MANIFEST_BLOB_UNKNOWN", 400, "manifest references a blob unknown to the repository"


class ManifestInvalid(RegistryError):
    code, status, default_message = "MANIFEST_INVALID", 400, "manifest invalid"


class ManifestTooLarge(RegistryError):
    code, status, default_message = "MANIFEST_INVALID", 413, "manifest too large"


class ManifestUnknown(RegistryError):
    code, status, default_message = "MANIFEST_UNKNOWN", 404, "manifest unknown to registry"


class NameInvalid(RegistryError):
    code, status, default_message = "NAME_INVALID", 400, "invalid repository name"


class NameUnknown(RegistryError):
    code, status, default_message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class SizeInvalid(RegistryError):
    code, status, default_message = "SIZE_INVALID", 400, "provided length did not match content length"


class TagInvalid(RegistryError):
    # The OCI spec has no code for a malformed tag; distribution's TAG_INVALID is the closest one clients know.
    code, status, default_message = "TAG_INVALID", 400, "invalid tag"


class Unauthorized(RegistryError):
    code, status, default_message = "UNAUTHORIZED", 401, "authentication required"


class Denied(RegistryError):
    code, status, default_message = "DENIED", 403, "requested access to the resource is denied"


class Unsupported(RegistryError):
    code, status, default_message = "UNSUPPORTED", 405, "the operation is unsupported"


class TooManyRequests(RegistryError):
    code, status, default_message = "TOOMANYREQUESTS", 429, "too many requests"


class PaginationNumberInvalid(RegistryError):
    code, status, default_message = "PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"


class RangeNotSatisfiable(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_INVALID", 416, "requested range not satisfiable"


class BlobRangeInvalid(RegistryError):
    """A blob GET whose `bytes=` Range is malformed, asks for several ranges, or lies outside the blob.

    The distribution-spec has no code for it; the name says what the client has to fix."""

    code, status, default_message = "RANGE_INVALID", 416, "requested range not satisfiable"


class BlobUploadTooLarge(RegistryError):
    """One upload session alone would hold more than `uploads.max_bytes`: it can never finish here."""

    code, status, default_message = "BLOB_UPLOAD_INVALID", 413, "blob upload too large"


class BadRequest(RegistryError):
    """A request HTTP itself could not parse (bad request line, a NUL in a header, `PUT *`)."""

    code, status, default_message = "UNSUPPORTED", 400, "malformed HTTP request"


class UpstreamUnavailable(RegistryError):
    """The upstream could not answer and nothing usable is cached.

    503 makes Docker Engine and containerd move on to their next endpoint at once.
    """

    code, status, default_message = "UNAVAILABLE", 503, "upstream registry unavailable"


class UpstreamInvalid(RegistryError):
    """The upstream answered with content that fails verification (wrong digest, bad manifest)."""

    code, status, default_message = "UPSTREAM_INVALID", 502, "upstream returned invalid content"


class StorageFull(RegistryError):
    """The disk cannot hold a blob even after eviction. 503 sends Docker and containerd to their next endpoint."""

    code, status, default_message = "UNAVAILABLE", 503, "mirror storage is full"


class StorageUnavailable(RegistryError):
    """The blob backend (an S3 bucket) does not answer or refuses: 503, so clients retry or go elsewhere."""

    code, status, default_message = "UNAVAILABLE", 503, "mirror storage backend is unavailable"


class UploadsFull(RegistryError):
    """Open upload sessions together hold `uploads.max_bytes`; room comes back as they finish or expire."""

    code, status, default_message = "UNAVAILABLE", 503, "too many bytes in open uploads"


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is a write refused for want of disk space or quota (ENOSPC, EDQUOT)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS
