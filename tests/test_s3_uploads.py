"""Blob upload sessions in the bucket (S3UploadSessions) on a real S3 server (Ceph RGW).

Two S3UploadSessions over one bucket, each with its own S3 client, are two mirror nodes. After every test
nothing is left in the bucket but the blobs and the objects of the sessions still open (`leftovers`), and no
unfinished multipart upload. Parts are 5 MiB (S3's smallest), so a 12 MiB chunk is a three-part upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from mirror.errors import (
    BlobUploadTooLarge,
    BlobUploadUnknown,
    DigestInvalid,
    RangeNotSatisfiable,
    SizeInvalid,
    StorageUnavailable,
    UploadsFull,
)
from mirror.oci.digest import Digest
from mirror.storage.backend import put_stream
from mirror.storage.s3 import S3BlobBackend, S3Settings
from mirror.storage.s3_objects import S3Objects
from mirror.storage.s3_uploads import S3UploadSessions
from tests.support.rgw import RadosGateway, new_bucket

MiB = 1 << 20
PART = 5 * MiB
REPO = "team/app"


@dataclass
class Bucket:
    """One fresh bucket and the nodes (S3UploadSessions, each on its own S3 client) that share it."""

    settings: S3Settings
    backends: list[S3BlobBackend] = field(default_factory=list)

    async def node(self, **options: int | None) -> S3UploadSessions:
        backend = await S3BlobBackend.open(self.settings, part_size=PART)
        self.backends.append(backend)
        return S3UploadSessions(S3Objects(backend.client, backend.bucket), backend, **options)

    @property
    def backend(self) -> S3BlobBackend:
        return self.backends[0]

    async def keys(self, prefix: str = "") -> list[str]:
        answer = await self.backend.client.list_objects_v2(Bucket=self.settings.bucket, Prefix=prefix)
        return [entry["Key"] for entry in answer.get("Contents", ())]

    async def session_keys(self, upload_id: str) -> list[str]:
        return await self.keys(f"sessions/{upload_id}/")

    async def leftovers(self, *open_sessions: str) -> list[str]:
        """Everything but blobs and the objects of `open_sessions`, and every unfinished multipart upload."""
        kept = ("blobs/", *(f"sessions/{upload_id}/" for upload_id in open_sessions))
        return [key for key in await self.keys() if not key.startswith(kept)] + [
            f"multipart:{key}" for key in await self.backend.pending_multipart_uploads()
        ]


@pytest.fixture
async def bucket(rgw: RadosGateway) -> AsyncIterator[Bucket]:
    settings = await new_bucket(rgw)
    place = Bucket(S3Settings(**settings))
    first = await S3BlobBackend.open(place.settings, part_size=PART)
    place.backends.append(first)
    try:
        yield place
    finally:
        client = first.client
        uploads = await client.list_multipart_uploads(Bucket=first.bucket)
        for upload in uploads.get("Uploads", ()):
            await client.abort_multipart_upload(Bucket=first.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for key in await place.keys():
            await client.delete_object(Bucket=first.bucket, Key=key)
        await client.delete_bucket(Bucket=first.bucket)
        for backend in place.backends:
            await backend.close()


@pytest.fixture
async def sessions(bucket: Bucket) -> S3UploadSessions:
    return S3UploadSessions(S3Objects(bucket.backend.client, bucket.backend.bucket), bucket.backend)


def data_of(size: int, seed: int = 0) -> list[bytes]:
    """Deterministic bytes in pieces of at most 1 MiB, as a request body arrives."""
    block = hashlib.sha256(f"seed-{seed}".encode()).digest() * (MiB // 32)
    pieces = [block[i % 7:] + block[: i % 7] for i in range(size // MiB)]
    if size % MiB:
        pieces.append(block[: size % MiB])
    return pieces


def digest_of(*bodies: list[bytes]) -> Digest:
    return Digest.of(b"".join(b"".join(body) for body in bodies))


async def body(pieces: list[bytes], *, pause: float = 0.0) -> AsyncIterator[bytes]:
    for piece in pieces:
        if pause:
            await asyncio.sleep(pause)
        yield piece


async def hangs_up(pieces: list[bytes]) -> AsyncIterator[bytes]:
    """A client that sends `pieces` and then goes away."""
    for piece in pieces:
        yield piece
    raise ConnectionResetError("client went away")


async def blob_bytes(backend: S3BlobBackend, digest: Digest) -> bytes:
    return b"".join([piece async for piece in backend.read(digest)])


# -- a push, in chunks ------------------------------------------------------------------------------
async def test_three_patches_then_put_publish_the_blob(bucket: Bucket, sessions: S3UploadSessions) -> None:
    bodies = [[os.urandom(70_000), os.urandom(30_000)], [os.urandom(1)], [os.urandom(250_000)]]
    upload = await sessions.create(REPO)
    assert (upload.repository, upload.size) == (REPO, 0)
    offset = 0
    for pieces in bodies:
        size = sum(map(len, pieces))
        upload = await sessions.append(REPO, upload.id, body(pieces), start=offset, length=size)
        offset += size
        assert upload.size == offset
        assert (await sessions.get(REPO, upload.id)).size == offset
    digest = digest_of(*bodies)
    assert await sessions.finish_into(bucket.backend, REPO, upload.id, digest) == offset
    assert await blob_bytes(bucket.backend, digest) == b"".join(b"".join(pieces) for pieces in bodies)
    with pytest.raises(BlobUploadUnknown):
        await sessions.get(REPO, upload.id)
    assert await bucket.leftovers() == []


async def test_a_push_started_on_one_node_finishes_on_another(bucket: Bucket) -> None:
    node_a, node_b = await bucket.node(), await bucket.node()
    first, second, last = data_of(300_000, 1), data_of(200_000, 2), data_of(1000, 3)
    upload = await node_a.create(REPO)
    await node_a.append(REPO, upload.id, body(first), start=0, length=300_000)
    assert (await node_b.get(REPO, upload.id)).size == 300_000
    assert (await node_b.append(REPO, upload.id, body(second), start=300_000)).size == 500_000
    digest = digest_of(first, second, last)
    size = await node_b.finish_into(node_b.backend, REPO, upload.id, digest, body(last), start=500_000, length=1000)
    assert size == 501_000
    assert await blob_bytes(node_a.backend, digest) == b"".join(first + second + last)
    with pytest.raises(BlobUploadUnknown):
        await node_a.get(REPO, upload.id)
    assert await bucket.leftovers() == []


async def test_a_session_cancelled_on_one_node_is_gone_on_the_other(bucket: Bucket) -> None:
    node_a, node_b = await bucket.node(), await bucket.node()
    upload = await node_a.create(REPO)
    await node_a.append(REPO, upload.id, body([b"x" * 100]))
    await node_b.cancel(REPO, upload.id)
    with pytest.raises(BlobUploadUnknown):
        await node_a.append(REPO, upload.id, body([b"y" * 100]), start=100)
    with pytest.raises(BlobUploadUnknown):
        await node_a.finish_into(node_a.backend, REPO, upload.id, Digest.of(b"x" * 100))
    assert await bucket.leftovers() == []


async def test_a_chunk_larger_than_a_part_goes_up_in_parts(bucket: Bucket, sessions: S3UploadSessions) -> None:
    pieces = data_of(12 * MiB, 4)
    upload = await sessions.create(REPO)
    upload = await sessions.append(REPO, upload.id, body(pieces), start=0, length=12 * MiB)
    assert upload.size == 12 * MiB
    keys = await bucket.session_keys(upload.id)
    assert keys == [f"sessions/{upload.id}/{0:016d}", f"sessions/{upload.id}/info.json"]
    head = await bucket.backend.client.head_object(Bucket=bucket.backend.bucket, Key=keys[0])
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object of three 5 MiB parts
    assert await bucket.leftovers(upload.id) == []
    digest = digest_of(pieces, [b"!"])
    assert await sessions.finish_into(bucket.backend, REPO, upload.id, digest, body([b"!"]), start=12 * MiB) == (
        12 * MiB + 1
    )
    assert await blob_bytes(bucket.backend, digest) == b"".join(pieces) + b"!"
    assert await bucket.leftovers() == []


async def test_patches_at_once_on_one_node_do_not_interleave(bucket: Bucket, sessions: S3UploadSessions) -> None:
    one, two = [b"a" * 1000] * 5, [b"b" * 1000] * 5
    upload = await sessions.create(REPO)
    first, second = await asyncio.gather(
        sessions.append(REPO, upload.id, body(one, pause=0.01)),
        sessions.append(REPO, upload.id, body(two, pause=0.01)),
    )
    assert sorted([first.size, second.size]) == [5000, 10_000]
    ordered = (one, two) if first.size == 5000 else (two, one)
    digest = digest_of(*ordered)
    assert await sessions.finish_into(bucket.backend, REPO, upload.id, digest) == 10_000
    assert await bucket.leftovers() == []


# -- refused chunks leave the session as it was -----------------------------------------------------
async def test_a_chunk_at_the_wrong_offset_is_refused(bucket: Bucket, sessions: S3UploadSessions) -> None:
    upload = await sessions.create(REPO)
    await sessions.append(REPO, upload.id, body([b"z" * 100]))
    before = await bucket.session_keys(upload.id)
    for start in (0, 99, 101, 5000):
        with pytest.raises(RangeNotSatisfiable) as refused:
            await sessions.append(REPO, upload.id, body([b"q" * 10]), start=start)
        assert refused.value.headers == {"Range": "0-99"}
    with pytest.raises(RangeNotSatisfiable):
        await sessions.finish_into(bucket.backend, REPO, upload.id, Digest.of(b"z" * 110), body([b"q" * 10]), start=0)
    assert (await sessions.get(REPO, upload.id)).size == 100
    assert await bucket.session_keys(upload.id) == before
    assert await bucket.leftovers(upload.id) == []


@pytest.mark.parametrize(
    ("declared", "sent"),
    [(100, 50), (50, 100), (7 * MiB, 6 * MiB), (6 * MiB, 7 * MiB)],
    ids=["short", "long", "short-multipart", "long-multipart"],
)
async def test_a_chunk_of_another_length_than_declared_is_refused_whole(
    bucket: Bucket, sessions: S3UploadSessions, declared: int, sent: int
) -> None:
    upload = await sessions.create(REPO)
    await sessions.append(REPO, upload.id, body([b"k" * 10]))
    before = await bucket.session_keys(upload.id)
    with pytest.raises(SizeInvalid):
        await sessions.append(REPO, upload.id, body(data_of(sent, 5)), start=10, length=declared)
    assert (await sessions.get(REPO, upload.id)).size == 10
    assert await bucket.session_keys(upload.id) == before
    assert await bucket.leftovers(upload.id) == []
    # The client sends it again, right this time.
    assert (await sessions.append(REPO, upload.id, body([b"m" * 20]), start=10, length=20)).size == 30


@pytest.mark.parametrize("sent", [300_000, 6 * MiB], ids=["small", "after-a-part"])
async def test_a_client_that_hangs_up_mid_chunk_leaves_the_session_as_it_was(
    bucket: Bucket, sessions: S3UploadSessions, sent: int
) -> None:
    upload = await sessions.create(REPO)
    await sessions.append(REPO, upload.id, body([b"k" * 10]))
    before = await bucket.session_keys(upload.id)
    with pytest.raises(ConnectionResetError):
        await sessions.append(REPO, upload.id, hangs_up(data_of(sent, 6)), start=10)
    assert (await sessions.get(REPO, upload.id)).size == 10
    assert await bucket.session_keys(upload.id) == before
    assert await bucket.leftovers(upload.id) == []
    with pytest.raises(ConnectionResetError):
        await sessions.finish_into(bucket.backend, REPO, upload.id, Digest.of(b"k" * 10), hangs_up([b"x"]))
    assert await bucket.session_keys(upload.id) == before
    assert await sessions.finish_into(bucket.backend, REPO, upload.id, Digest.of(b"k" * 10)) == 10
    assert await bucket.leftovers() == []


# -- finishing --------------------------------------------------------------------------------------
async def test_a_wrong_digest_ends_the_session(bucket: Bucket, sessions: S3UploadSessions) -> None:
    upload = await sessions.create(REPO)
    await sessions.append(REPO, upload.id, body([b"real bytes"]))
    claimed = Digest.of(b"other bytes")
    with pytest.raises(DigestInvalid):
        await sessions.finish_into(bucket.backend, REPO, upload.id, claimed, body([b"!"]))
    with pytest.raises(BlobUploadUnknown):
        await sessions.get(REPO, upload.id)
    assert await bucket.backend.stat(claimed) is None
    assert await bucket.keys() == []
    assert await bucket.leftovers() == []


async def test_a_blob_the_backend_has_is_verified_not_written_again(bucket: Bucket, sessions: S3UploadSessions) -> None:
    stored = b"already here" * 1000
    digest = Digest.of(stored)
    await put_stream(bucket.backend, digest, body([stored]))
    upload = await sessions.create(REPO)
    await sessions.append(REPO, upload.id, body([stored]))
    assert await sessions.finish_into(bucket.backend, REPO, upload.id, digest) == len(stored)
    # Other bytes claimed to be that blob are refused all the same, and the stored blob is untouched.
    other = await sessions.create(REPO)
    await sessions.append(REPO, other.id, body([b"not it"]))
    with pytest.raises(DigestInvalid):
        await sessions.finish_into(bucket.backend, REPO, other.id, digest)
    with pytest.raises(BlobUploadUnknown):
        await sessions.get(REPO, other.id)
    assert await blob_bytes(bucket.backend, digest) == stored
    assert await bucket.leftovers() == []


async def test_a_failing_backend_keeps_the_session(bucket: Bucket, sessions: S3UploadSessions) -> None:
    settings = bucket.settings
    unreachable = await S3BlobBackend.open(
        S3Settings(
            bucket="t-no-such-bucket-here", endpoint=settings.endpoint, region=settings.region,
            access_key=settings.access_key, secret_key=settings.secret_key,
        ),
        part_size=PART,
    )
    bucket.backends.append(unreachable)
    data = os.urandom(100_000)
    upload = await sessions.create(REPO)
    await sessions.append(REPO, upload.id, body([data[:60_000]]))
    with pytest.raises(StorageUnavailable):
        await sessions.finish_into(unreachable, REPO, upload.id, Digest.of(data), body([data[60_000:]]))
    # The last chunk was taken before the backend failed: the client's retry of the PUT needs no body.
    assert (await sessions.get(REPO, upload.id)).size == 100_000
    assert await sessions.finish_into(bucket.backend, REPO, upload.id, Digest.of(data)) == 100_000
    assert await blob_bytes(bucket.backend, Digest.of(data)) == data
    assert await bucket.leftovers() == []


# -- ids and repositories ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "upload_id",
    ["", "0" * 32, "0" * 31, "A" * 32, "g" * 32, "../../etc/passwd", "0" * 32 + "/info.json", "sessions", "*"],
)
async def test_unknown_or_malformed_ids_are_unknown_uploads(
    bucket: Bucket, sessions: S3UploadSessions, upload_id: str
) -> None:
    with pytest.raises(BlobUploadUnknown):
        await sessions.get(REPO, upload_id)
    with pytest.raises(BlobUploadUnknown):
        await sessions.append(REPO, upload_id, body([b"x"]))
    with pytest.raises(BlobUploadUnknown):
        await sessions.finish_into(bucket.backend, REPO, upload_id, Digest.of(b"x"), body([b"x"]))
    with pytest.raises(BlobUploadUnknown):
        await sessions.cancel(REPO, upload_id)
    assert await bucket.keys() == []
    assert await bucket.leftovers() == []


async def test_a_session_of_another_repository_is_unknown(bucket: Bucket) -> None:
    node_a, node_b = await bucket.node(), await bucket.node()
    upload = await node_a.create(REPO)
    await node_a.append(REPO, upload.id, body([b"mine"]))
    for node in (node_a, node_b):
        with pytest.raises(BlobUploadUnknown):
            await node.get("team/other", upload.id)
        with pytest.raises(BlobUploadUnknown):
            await node.append("team/other", upload.id, body([b"theirs"]))
        with pytest.raises(BlobUploadUnknown):
            await node.finish_into(node.backend, "team/other", upload.id, Digest.of(b"mine"))
        with pytest.raises(BlobUploadUnknown):
            await node.cancel("team/other", upload.id)
    assert (await node_b.get(REPO, upload.id)).size == 4
    assert await bucket.leftovers(upload.id) == []


# -- cancel and expiry ------------------------------------------------------------------------------
async def test_cancel_removes_everything(bucket: Bucket, sessions: S3UploadSessions) -> None:
    upload = await sessions.create(REPO)
    await sessions.append(REPO, upload.id, body([b"a" * 100]))
    await sessions.append(REPO, upload.id, body([b"b" * 100]))
    kept = await sessions.create(REPO)
    await sessions.cancel(REPO, upload.id)
    with pytest.raises(BlobUploadUnknown):
        await sessions.get(REPO, upload.id)
    with pytest.raises(BlobUploadUnknown):
        await sessions.cancel(REPO, upload.id)
    assert await bucket.session_keys(upload.id) == []
    assert (await sessions.get(REPO, kept.id)).size == 0
    assert await bucket.leftovers(kept.id) == []


async def _chunk_of_a_dead_node(bucket: Bucket, upload_id: str, offset: int) -> str:
    """An unfinished multipart upload of a chunk, as a node that died mid-PATCH leaves it; its upload id."""
    client = bucket.backend.client
    key = f"sessions/{upload_id}/{offset:016d}"
    answer = await client.create_multipart_upload(Bucket=bucket.backend.bucket, Key=key)
    return str(answer["UploadId"])


async def _send_part(bucket: Bucket, upload_id: str, offset: int, multipart_id: str) -> None:
    await bucket.backend.client.upload_part(
        Bucket=bucket.backend.bucket, Key=f"sessions/{upload_id}/{offset:016d}", UploadId=multipart_id,
        PartNumber=1, Body=b"p" * 1000,
    )


async def test_expire_removes_idle_sessions_only(bucket: Bucket) -> None:
    node_a, node_b = await bucket.node(), await bucket.node()
    idle = await node_a.create(REPO)
    await node_a.append(REPO, idle.id, body([b"i" * 1000]))
    dead_chunk = await _chunk_of_a_dead_node(bucket, idle.id, 1000)
    await _send_part(bucket, idle.id, 1000, dead_chunk)
    written_later = await node_a.create(REPO)
    # Another node is still sending a large chunk: its multipart upload started early, a part arrives late.
    arriving = await node_a.create(REPO)
    arriving_chunk = await _chunk_of_a_dead_node(bucket, arriving.id, 0)
    await asyncio.sleep(2.5)
    await node_a.append(REPO, written_later.id, body([b"w" * 10]))
    await _send_part(bucket, arriving.id, 0, arriving_chunk)
    fresh = await node_a.create(REPO)
    assert await node_b.expire(3600) == (0, 0)
    assert await node_b.expire(2.0) == (1, 1000)  # through a node that never saw the session
    with pytest.raises(BlobUploadUnknown):
        await node_a.get(REPO, idle.id)
    assert await bucket.session_keys(idle.id) == []
    for upload in (written_later, arriving, fresh):
        await node_a.get(REPO, upload.id)
    assert node_a.open_bytes == 10  # what node A holds, the expired session's bytes no longer counted
    assert await bucket.leftovers(written_later.id, arriving.id, fresh.id) == [
        f"multipart:sessions/{arriving.id}/{0:016d}"
    ]
    await node_a.cancel(REPO, arriving.id)  # takes the chunk still arriving with it
    assert await bucket.leftovers(written_later.id, fresh.id) == []


async def test_expiring_runs_in_the_background(bucket: Bucket, sessions: S3UploadSessions) -> None:
    upload = await sessions.create(REPO)
    await sessions.append(REPO, upload.id, body([b"e" * 500]))
    expired: list[tuple[int, int]] = []
    async with sessions.expiring(0.5, lambda removed, freed: expired.append((removed, freed))):
        for _ in range(100):
            if expired:
                break
            await asyncio.sleep(0.1)
    assert expired == [(1, 500)]
    assert sessions.open_bytes == 0
    assert await bucket.leftovers() == []


# -- max_bytes (per node) ---------------------------------------------------------------------------
async def test_max_bytes_bounds_what_sessions_hold(bucket: Bucket) -> None:
    sessions = await bucket.node(max_bytes=1000)
    one = await sessions.create(REPO)
    await sessions.append(REPO, one.id, body([b"1" * 600]))
    with pytest.raises(BlobUploadTooLarge):
        await sessions.append(REPO, one.id, body([b"1" * 500]), start=600, length=500)
    with pytest.raises(BlobUploadTooLarge):
        await sessions.append(REPO, one.id, body([b"1" * 100] * 5), start=600)
    two = await sessions.create(REPO)
    with pytest.raises(UploadsFull) as full:
        await sessions.append(REPO, two.id, body([b"2" * 300] * 2))
    assert full.value.headers["Retry-After"]
    assert (await sessions.get(REPO, one.id)).size == 600
    assert (await sessions.get(REPO, two.id)).size == 0
    assert sessions.open_bytes == 600
    assert await bucket.leftovers(one.id, two.id) == []
    await sessions.finish_into(sessions.backend, REPO, one.id, Digest.of(b"1" * 600))
    assert (await sessions.append(REPO, two.id, body([b"2" * 300] * 2))).size == 600
    assert sessions.open_bytes == 600
