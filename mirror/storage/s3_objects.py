"""Small objects in the bucket: what the S3 metadata store and upload sessions are made of.

Every call translates a failing S3 into StorageUnavailable (a 503 naming the bucket, never a key), as the
blob backend does; a missing key is an answer (None / False), not an error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mirror.errors import StorageUnavailable
from mirror.storage.s3 import _is_missing, _s3_call, _unavailable

log = logging.getLogger(__name__)

# DeleteObjects takes at most this many keys per request.
_DELETE_BATCH = 1000


@dataclass(frozen=True, slots=True)
class ObjectEntry:
    key: str
    size: int
    modified: float  # wall-clock seconds (the object's LastModified)


class S3Objects:
    """Keyed small objects in one bucket, over an aiobotocore client the blob backend owns."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    async def get(self, key: str, *, action: str = "read metadata") -> tuple[bytes, float] | None:
        """The object's bytes and LastModified, or None when there is no such key."""
        try:
            answer = await self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise _unavailable(exc, action, self.bucket) from exc
        with _s3_call(action, self.bucket):
            async with answer["Body"] as body:
                data = await body.read()
        return bytes(data), answer["LastModified"].timestamp()

    async def exists(self, key: str, *, action: str = "read metadata") -> bool:
        try:
            await self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                return False
            raise _unavailable(exc, action, self.bucket) from exc
        return True

    async def put(self, key: str, data: bytes, *, action: str = "write metadata") -> None:
        with _s3_call(action, self.bucket):
            await self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    async def delete(self, key: str, *, action: str = "delete metadata") -> bool:
        """Remove the key; False when it was not there (S3's DELETE cannot say, so this asks first)."""
        if not await self.exists(key, action=action):
            return False
        with _s3_call(action, self.bucket):
            await self.client.delete_object(Bucket=self.bucket, Key=key)
        return True

    async def delete_many(self, keys: list[str], *, action: str = "delete metadata") -> None:
        """Remove every key (absent ones are no error)."""
        for first in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[first:first + _DELETE_BATCH]]
            with _s3_call(action, self.bucket):
                answer = await self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            # DeleteObjects answers 200 even when some keys could not be deleted: those come back as Errors,
            # and a caller relying on them being gone (a tag, a referrer) must hear about it.
            failed = answer.get("Errors") or ()
            if failed:
                code = str(failed[0].get("Code") or "unknown error")
                log.warning("S3 %s in bucket %s failed for %d keys: %s", action, self.bucket, len(failed), code)
                raise StorageUnavailable(f"storage backend failed to {action}: {code}", detail={"bucket": self.bucket})

    async def entries(self, prefix: str, *, action: str = "list metadata") -> AsyncIterator[ObjectEntry]:
        """Every object under `prefix` (paged), in key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_call(action, self.bucket):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for entry in page.get("Contents", ()):
                    yield ObjectEntry(entry["Key"], int(entry["Size"]), entry["LastModified"].timestamp())

    async def children(self, prefix: str, *, action: str = "list metadata") -> list[str]:
        """The names directly under `prefix` (a 'folder' listing with delimiter '/'), objects and
        sub-prefixes alike, without the prefix and without a trailing '/', sorted."""
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_call(action, self.bucket):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for entry in page.get("Contents", ()):
                    names.add(entry["Key"][len(prefix):])
                for common in page.get("CommonPrefixes", ()):
                    names.add(common["Prefix"][len(prefix):].rstrip("/"))
        names.discard("")
        return sorted(names)
