"""The BlobBackend's behaviour: the same tests against the filesystem and a real S3 server (Ceph RGW).

Every test that writes also checks what is left in the store afterwards (`leftovers`): for the filesystem the
files under tmp/, for S3 every object key and every unfinished multipart upload. S3 runs with 5 MiB parts
(S3's smallest), so a 12 MiB blob is already a three-part multipart upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from mirror.cli import main as cli_main
from mirror.config import ConfigError, load_config_data
from mirror.errors import BlobUnknown, DigestInvalid, SizeInvalid
from mirror.oci.digest import Digest
from mirror.storage.backend import BlobBackend, put_stream
from mirror.storage.blobs import BlobStore
from mirror.storage.fs_backend import FilesystemBlobBackend
from mirror.storage.s3 import S3BlobBackend, S3Settings, S3Unavailable
from tests.registry_helpers import ClientFactory, digest_of, error_codes, files_under, push_blob, push_image
from tests.support.procs import free_port
from tests.support.rgw import RadosGateway, new_bucket

MiB = 1 << 20
PART = 5 * MiB


class Store:
    """A backend under test and a way to see everything it holds, committed or not."""

    def __init__(self, kind: str, backend: Any, root: Path | None = None) -> None:
        self.kind = kind
        self.backend: BlobBackend = backend
        self._raw = backend
        self.root = root

    async def leftovers(self) -> list[str]:
        """Everything that is not a committed blob: temp files, temp objects, unfinished multipart uploads."""
        if self.kind == "fs":
            assert self.root is not None
            return [str(p) for p in (self.root / "tmp").iterdir()]
        backend: S3BlobBackend = self._raw
        keys = await self.all_keys()
        return [k for k in keys if not k.startswith("blobs/")] + [
            f"multipart:{k}" for k in await backend.pending_multipart_uploads()
        ]

    async def all_keys(self) -> list[str]:
        if self.kind == "fs":
            assert self.root is not None
            return [str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()]
        backend: S3BlobBackend = self._raw
        answer = await backend.client.list_objects_v2(Bucket=backend.bucket)
        return [entry["Key"] for entry in answer.get("Contents", ())]


async def make_bucket(gateway: RadosGateway, **settings: Any) -> S3BlobBackend:
    assert gateway.account is not None
    account = gateway.account
    backend = await S3BlobBackend.open(
        S3Settings(
            bucket=f"t-{uuid.uuid4().hex[:16]}", endpoint=account.endpoint, region=account.region,
            access_key=account.access_key, secret_key=account.secret_key, **settings,
        ),
        part_size=PART,
    )
    await backend.client.create_bucket(Bucket=backend.bucket)
    return backend


async def empty_and_remove(backend: S3BlobBackend) -> None:
    for key in await Store("s3", backend).all_keys():
        await backend.client.delete_object(Bucket=backend.bucket, Key=key)
    await backend.client.delete_bucket(Bucket=backend.bucket)


@pytest.fixture(params=["fs", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "fs":
        yield Store("fs", FilesystemBlobBackend(BlobStore(tmp_path / "data")), tmp_path / "data")
        return
    gateway: RadosGateway = request.getfixturevalue("rgw")
    backend = await make_bucket(gateway)
    try:
        yield Store("s3", backend)
    finally:
        await empty_and_remove(backend)
        await backend.close()


def pattern(size: int, seed: int = 0) -> tuple[Digest, list[bytes]]:
    """Deterministic pseudo-random bytes in 1 MiB chunks (and their digest), made once per call."""
    block = hashlib.sha256(f"seed-{seed}".encode()).digest() * (MiB // 32)
    chunks = [block[i % 7:] + block[: i % 7] for i in range(size // MiB)]
    if size % MiB:
        chunks.append(block[: size % MiB])
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return Digest("sha256", hasher.hexdigest()), chunks


async def stream(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def read_all(backend: BlobBackend, digest: Digest, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([piece async for piece in backend.read(digest, start, end)])


async def listed(backend: BlobBackend) -> list[Digest]:
    return [digest async for digest in backend.list()]


# -- basics ----------------------------------------------------------------------------------------
async def test_write_commit_stat_and_ranged_read(store: Store) -> None:
    data = os.urandom(300_000)
    digest = Digest.of(data)
    assert await put_stream(store.backend, digest, stream([data[:100_000], data[100_000:]]), size=len(data)) == len(
        data
    )
    assert await store.backend.stat(digest) == len(data)
    assert await read_all(store.backend, digest) == data
    assert await read_all(store.backend, digest, 10, 20) == data[10:20]
    assert await read_all(store.backend, digest, 299_999) == data[299_999:]
    assert await read_all(store.backend, digest, 123_456, None) == data[123_456:]
    assert await read_all(store.backend, digest, len(data)) == b""
    assert await listed(store.backend) == [digest]
    assert await store.leftovers() == []


async def test_an_empty_blob_is_a_blob(store: Store) -> None:
    digest = Digest.of(b"")
    assert await put_stream(store.backend, digest, stream([]), size=0) == 0
    assert await store.backend.stat(digest) == 0
    assert await read_all(store.backend, digest) == b""


async def test_a_missing_blob_has_no_size_and_cannot_be_read(store: Store) -> None:
    digest = Digest.of(b"never stored")
    assert await store.backend.stat(digest) is None
    with pytest.raises(BlobUnknown):
        await read_all(store.backend, digest)
    assert await store.backend.delete(digest) is False


async def test_delete_and_list(store: Store) -> None:
    blobs = [os.urandom(1000 + i) for i in range(3)]
    digests = [Digest.of(blob) for blob in blobs]
    for blob, digest in zip(blobs, digests, strict=True):
        await put_stream(store.backend, digest, stream([blob]))
    assert sorted(await listed(store.backend), key=str) == sorted(digests, key=str)
    assert await store.backend.delete(digests[1]) is True
    assert await store.backend.stat(digests[1]) is None
    assert sorted(await listed(store.backend), key=str) == sorted([digests[0], digests[2]], key=str)
    assert await read_all(store.backend, digests[0]) == blobs[0]


# -- nothing visible until verified, nothing left when it fails -----------------------------------
@pytest.mark.parametrize("size", [1000, 12 * MiB], ids=["small", "multipart"])
async def test_a_digest_mismatch_leaves_nothing(store: Store, size: int) -> None:
    claimed, _ = pattern(size, seed=1)
    _, chunks = pattern(size, seed=2)
    with pytest.raises(DigestInvalid):
        await put_stream(store.backend, claimed, stream(chunks))
    assert await store.backend.stat(claimed) is None
    assert await listed(store.backend) == []
    assert await store.leftovers() == []


@pytest.mark.parametrize("size", [1000, 12 * MiB], ids=["small", "multipart"])
async def test_a_size_mismatch_leaves_nothing(store: Store, size: int) -> None:
    digest, chunks = pattern(size)
    with pytest.raises(SizeInvalid):
        await put_stream(store.backend, digest, stream(chunks), size=size + 1)
    assert await store.backend.stat(digest) is None
    assert await store.leftovers() == []


@pytest.mark.parametrize("expected", [True, False], ids=["digest-known", "digest-at-commit"])
async def test_abort_after_several_parts_leaves_nothing(store: Store, expected: bool) -> None:
    digest, chunks = pattern(12 * MiB)
    sink = await store.backend.open_sink("sha256", expected=digest if expected else None)
    for chunk in chunks:
        await sink.write(chunk)
    assert sink.size == 12 * MiB
    await sink.abort()
    await sink.abort()  # idempotent
    assert await store.backend.stat(digest) is None
    assert await store.leftovers() == []


async def test_a_write_cancelled_midway_leaves_nothing(store: Store) -> None:
    digest, chunks = pattern(12 * MiB)
    halfway = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        for i, chunk in enumerate(chunks):
            if i == 7:
                halfway.set()
                await asyncio.Event().wait()  # a client that stops sending
            yield chunk

    task = asyncio.create_task(put_stream(store.backend, digest, slow()))
    await halfway.wait()
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.backend.stat(digest) is None
    assert await store.leftovers() == []


async def test_nothing_is_visible_before_commit(store: Store) -> None:
    digest, chunks = pattern(12 * MiB)
    sink = await store.backend.open_sink("sha256", expected=digest)
    for chunk in chunks:
        await sink.write(chunk)
    assert await store.backend.stat(digest) is None
    assert await listed(store.backend) == []
    assert await sink.commit(digest) == 12 * MiB
    assert await store.backend.stat(digest) == 12 * MiB


# -- large and concurrent --------------------------------------------------------------------------
async def _peak_memory_writing(backend: BlobBackend, size: int, seed: int) -> tuple[Digest, bytes, int]:
    """Write a `size`-byte blob whose chunks are made as they are sent; the peak of Python allocations."""
    digest, chunks = pattern(size, seed=seed)
    block = chunks[0]
    del chunks  # only the writer may hold the blob's bytes

    async def produce() -> AsyncIterator[bytes]:
        for i in range(size // MiB):
            yield block[i % 7:] + block[: i % 7]

    tracemalloc.start()
    try:
        assert await put_stream(backend, digest, produce(), size=size) == size
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return digest, block, peak


async def test_a_blob_of_many_parts_streams_in_flat_memory(store: Store) -> None:
    _, _, peak_small = await _peak_memory_writing(store.backend, 24 * MiB, seed=3)
    digest, block, peak = await _peak_memory_writing(store.backend, 64 * MiB, seed=4)
    # Flat: 40 MiB more blob costs no more memory than the writer's own bound and its jitter under load
    # (the filesystem writer holds at most 16 MiB, S3 a few 5 MiB parts); whole-blob buffering would add 40 MiB.
    assert peak < peak_small + 16 * MiB, f"peak {peak / MiB:.1f} MiB for 64 MiB, {peak_small / MiB:.1f} for 24 MiB"
    assert peak < 44 * MiB
    hasher = hashlib.sha256()
    async for piece in store.backend.read(digest):
        hasher.update(piece)
    assert hasher.hexdigest() == digest.hex
    assert await read_all(store.backend, digest, 17 * MiB + 3, 17 * MiB + 10) == (block[17 % 7:] + block[:17 % 7])[3:10]
    assert await store.leftovers() == []


async def test_a_digest_given_only_at_commit_is_verified_and_published(store: Store) -> None:
    digest, chunks = pattern(12 * MiB, seed=4)
    sink = await store.backend.open_sink("sha256")
    for chunk in chunks:
        await sink.write(chunk)
    assert await sink.commit(digest, size=12 * MiB) == 12 * MiB
    assert hashlib.sha256(await read_all(store.backend, digest)).hexdigest() == digest.hex
    assert await store.leftovers() == []
    wrong, _ = pattern(12 * MiB, seed=5)
    sink = await store.backend.open_sink("sha256")
    for chunk in chunks:
        await sink.write(chunk)
    with pytest.raises(DigestInvalid):
        await sink.commit(wrong)
    assert await store.backend.stat(wrong) is None
    assert await store.leftovers() == []


async def test_concurrent_writers_of_one_digest_both_succeed_into_one_blob(store: Store) -> None:
    digest, chunks = pattern(12 * MiB, seed=6)

    async def writer() -> int:
        async def paced() -> AsyncIterator[bytes]:
            for chunk in chunks:
                await asyncio.sleep(0)  # interleave the two writers chunk by chunk
                yield chunk

        return await put_stream(store.backend, digest, paced(), size=12 * MiB)

    assert await asyncio.gather(writer(), writer()) == [12 * MiB, 12 * MiB]
    assert await listed(store.backend) == [digest]
    assert hashlib.sha256(await read_all(store.backend, digest)).hexdigest() == digest.hex
    assert await store.leftovers() == []


# -- S3 only ---------------------------------------------------------------------------------------
async def test_s3_presigned_url_serves_the_blob_and_only_when_enabled(rgw: RadosGateway) -> None:
    backend = await make_bucket(rgw, presign=True)
    try:
        data = os.urandom(50_000)
        digest = Digest.of(data)
        await put_stream(backend, digest, stream([data]))
        url = await backend.presigned_url(digest, expires=60)
        assert rgw.account is not None and url is not None
        assert url.startswith(f"{rgw.account.endpoint}/{backend.bucket}/")  # path-style
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers={"Range": "bytes=100-199"}) as response:
                assert response.status == 206
                assert await response.read() == data[100:200]
            async with session.get(url.replace("Signature=", "Signature=00")) as response:
                assert response.status == 403
        backend.settings = S3Settings(bucket=backend.bucket, presign=False)
        assert await backend.presigned_url(digest, expires=60) is None
    finally:
        await empty_and_remove(backend)
        await backend.close()


async def test_s3_check_names_a_missing_bucket_and_bad_credentials(rgw: RadosGateway) -> None:
    assert rgw.account is not None
    account = rgw.account
    good = await make_bucket(rgw)
    try:
        await good.check()
    finally:
        await empty_and_remove(good)
        await good.close()
    missing = await S3BlobBackend.open(
        S3Settings(bucket="no-such-bucket-here", endpoint=account.endpoint, access_key=account.access_key,
                   secret_key=account.secret_key)
    )
    try:
        with pytest.raises(S3Unavailable, match="no-such-bucket-here.*no such bucket"):
            await missing.check()
    finally:
        await missing.close()
    wrong_secret = "not-the-secret-0123456789"
    denied = await S3BlobBackend.open(
        S3Settings(bucket="anything", endpoint=account.endpoint, access_key=account.access_key,
                   secret_key=wrong_secret)
    )
    try:
        with pytest.raises(S3Unavailable, match="access denied") as caught:
            await denied.check()
        assert wrong_secret not in str(caught.value)
    finally:
        await denied.close()


# -- config, check-config, serve -----------------------------------------------------------------
def _s3_config(tmp_path: Path, s3: dict[str, Any]) -> Path:
    path = tmp_path / "mirror.yaml"
    path.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path / "data"), "backend": "s3", "s3": s3}}))
    return path


def test_storage_config_names_each_bad_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_data({"storage": {"backend": "s3", "s3": {
            "bucket": "Not_A_Bucket", "endpoint": "ftp://example", "region": "US East", "access_key": "AK",
            "secret_key": 12345, "presign_expires": "30d", "colour": "blue", "cache_max_size": "lots",
        }}})
    errors = caught.value.errors
    assert "storage.s3.bucket: expected an S3 bucket name (3-63 of a-z, 0-9, '.', '-'), got 'Not_A_Bucket'" in errors
    assert "storage.s3.endpoint: expected http(s)://host[:port], got 'ftp://example'" in errors
    assert "storage.s3.region: expected a region name like us-east-1, got 'US East'" in errors
    assert "storage.s3.secret_key: expected a string, got a int (value not shown)" in errors
    assert "storage.s3.presign_expires: must be between 1s and 7d" in errors
    assert "storage.s3.colour: unknown key" in errors
    assert any(e.startswith("storage.s3.cache_max_size: ") for e in errors), errors
    assert not any("12345" in e for e in errors)
    with pytest.raises(ConfigError, match=r"storage\.backend: expected one of fs, s3, got 'gcs'"):
        load_config_data({"storage": {"backend": "gcs"}})
    with pytest.raises(ConfigError, match=r"storage\.s3: required with storage\.backend: s3"):
        load_config_data({"storage": {"backend": "s3"}})
    with pytest.raises(ConfigError, match=r"storage\.s3\.secret_key: set access_key and secret_key together"):
        load_config_data({"storage": {"backend": "s3", "s3": {"bucket": "abc", "access_key": "AK"}}})


def test_storage_config_defaults_and_masks_the_secret() -> None:
    assert load_config_data({}).storage.backend == "fs"
    config = load_config_data({"storage": {"backend": "s3", "s3": {
        "bucket": "layers", "endpoint": "http://127.0.0.1:7480/", "access_key": "AK", "secret_key": "hunter2",
    }}})
    assert config.storage.s3 is not None
    assert (config.storage.s3.endpoint, config.storage.s3.region, config.storage.s3.path_style) == (
        "http://127.0.0.1:7480", "us-east-1", True,
    )
    assert config.storage.s3.presign is False and config.storage.s3.presign_expires == 900.0
    assert config.storage.s3.cache_max_size is None  # the shared tier is unbounded unless bounded
    assert load_config_data({"storage": {"backend": "s3", "s3": {
        "bucket": "layers", "cache_max_size": "2GiB"}}}).storage.s3.cache_max_size == 2 << 30
    shown = config.to_dict()["storage"]["s3"]
    assert shown["secret_key"] == "***" and shown["access_key"] == "AK"
    assert "hunter2" not in repr(config)


def test_check_config_heads_the_bucket(
    rgw: RadosGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rgw.account is not None
    account = rgw.account

    async def create() -> str:
        backend = await make_bucket(rgw)
        await backend.close()
        return backend.bucket

    bucket = asyncio.run(create())
    keys = {"endpoint": account.endpoint, "access_key": account.access_key, "secret_key": account.secret_key}
    assert cli_main(["check-config", "--config", str(_s3_config(tmp_path, {"bucket": bucket, **keys}))]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["storage"]["s3"]["secret_key"] == "***"

    assert cli_main(["check-config", "--config", str(_s3_config(tmp_path, {"bucket": "not-made-yet", **keys}))]) == 1
    captured = capsys.readouterr()
    assert "storage.s3: bucket 'not-made-yet' at http://127.0.0.1:" in captured.err
    assert "no such bucket" in captured.err

    wrong = {**keys, "secret_key": "wrong-secret-xyz"}
    assert cli_main(["check-config", "--config", str(_s3_config(tmp_path, {"bucket": bucket, **wrong}))]) == 1
    captured = capsys.readouterr()
    assert "access denied" in captured.err
    assert "wrong-secret-xyz" not in captured.err + captured.out


def test_serve_refuses_to_start_when_its_bucket_does_not_answer(
    rgw: RadosGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node that cannot reach its bucket must not accept pushes it could not store."""
    assert rgw.account is not None
    account = rgw.account
    config = _s3_config(tmp_path, {"bucket": "never-created", "endpoint": account.endpoint,
                                   "access_key": account.access_key, "secret_key": account.secret_key})
    data = yaml.safe_load(config.read_text())
    data["listen"] = f"127.0.0.1:{free_port()}"
    config.write_text(yaml.safe_dump(data))
    assert cli_main(["serve", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "storage.s3: bucket 'never-created'" in err and "no such bucket" in err
    assert account.secret_key not in err


# -- the registry on S3 ----------------------------------------------------------------------------
class S3Registry:
    def __init__(self, client: TestClient, backend: S3BlobBackend, root: Path) -> None:
        self.client, self.backend, self.root = client, backend, root

    async def keys(self) -> list[str]:
        return await Store("s3", self.backend).all_keys()

    async def blob_keys(self) -> list[str]:
        return [key for key in await self.keys() if key.startswith("blobs/")]

    async def leftovers(self) -> list[str]:
        """What a finished push must not leave: temp objects, sessions, unfinished multipart uploads
        (repository links and tags under `repositories/` are what a push is for)."""
        return [key for key in await Store("s3", self.backend).leftovers() if not key.startswith("repositories/")]


@pytest.fixture
async def s3_registry(make_registry: ClientFactory, rgw: RadosGateway, tmp_path: Path) -> AsyncIterator[S3Registry]:
    s3 = await new_bucket(rgw)
    client = await make_registry(storage={"path": str(tmp_path / "data"), "backend": "s3", "s3": s3})
    backend = await S3BlobBackend.open(S3Settings(
        bucket=s3["bucket"], endpoint=s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"],
    ))
    try:
        yield S3Registry(client, backend, tmp_path / "data")
    finally:
        await empty_and_remove(backend)
        await backend.close()


async def chunked_push(client: TestClient, name: str, chunks: list[bytes], digest: str) -> ClientResponse:
    """A push in PATCHes of the given chunks, finished by a PUT with the digest."""
    started = await client.post(f"/v2/{name}/blobs/uploads/")
    assert started.status == 202, await started.text()
    location = started.headers["Location"]
    offset = 0
    for chunk in chunks:
        patched = await client.patch(location, data=chunk, headers={
            "Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
        })
        assert patched.status == 202, await patched.text()
        location = patched.headers["Location"]
        offset += len(chunk)
    return await client.put(location, params={"digest": digest})


async def test_pushed_blobs_live_in_the_bucket_and_pull_back(s3_registry: S3Registry) -> None:
    client = s3_registry.client
    big_digest, big_chunks = pattern(12 * MiB, seed=9)  # a multipart upload into the bucket
    finished = await chunked_push(client, "team/app", big_chunks, str(big_digest))
    assert finished.status == 201, await finished.text()
    manifest_digest, _ = await push_image(client, "team/app", "v1", layers=(b"layer one", b"layer two"))

    keys = await s3_registry.keys()
    for blob in (b"layer one", b"layer two"):
        assert f"blobs/sha256/{digest_of(blob)[7:]}" in keys
    assert f"blobs/sha256/{big_digest.hex}" in keys
    # The manifest and its tag are in the bucket too (what lets every node on it serve the image); nothing
    # of it on the node's disk.
    assert f"blobs/sha256/{manifest_digest[7:]}" in keys and "repositories/team/app/_tags/v1" in keys
    assert files_under(s3_registry.root / "blobs") == set()
    assert await s3_registry.leftovers() == []

    got = await client.get(f"/v2/team/app/blobs/{big_digest}")
    assert got.status == 200 and got.headers["Content-Length"] == str(12 * MiB)
    assert hashlib.sha256(await got.read()).hexdigest() == big_digest.hex
    ranged = await client.get(f"/v2/team/app/blobs/{big_digest}", headers={"Range": "bytes=5242878-5242881"})
    assert ranged.status == 206 and ranged.headers["Content-Range"] == f"bytes 5242878-5242881/{12 * MiB}"
    assert await ranged.read() == b"".join(big_chunks)[5242878:5242882]
    head = await client.head(f"/v2/team/app/blobs/{digest_of(b'layer one')}")
    assert head.status == 200 and head.headers["Content-Length"] == str(len(b"layer one"))
    pulled = await client.get("/v2/team/app/manifests/v1")
    assert pulled.status == 200 and pulled.headers["Docker-Content-Digest"] == manifest_digest
    assert (await client.get(f"/v2/team/other/blobs/{big_digest}")).status == 404  # not linked there


async def test_a_wrong_digest_on_s3_is_refused_and_leaves_nothing(s3_registry: S3Registry) -> None:
    client = s3_registry.client
    _, chunks = pattern(12 * MiB, seed=10)
    claimed, _ = pattern(12 * MiB, seed=11)
    finished = await chunked_push(client, "team/app", chunks, str(claimed))
    assert finished.status == 400
    assert await error_codes(finished) == ["DIGEST_INVALID"]
    monolithic = await client.post("/v2/team/app/blobs/uploads/", params={"digest": str(claimed)}, data=b"x" * 1000)
    assert monolithic.status == 400
    assert await s3_registry.blob_keys() == []
    assert await s3_registry.leftovers() == []
    assert (await client.get(f"/v2/team/app/blobs/{claimed}")).status == 404


async def test_a_blob_gone_from_the_bucket_is_blob_unknown(s3_registry: S3Registry) -> None:
    client = s3_registry.client
    digest = await push_blob(client, "team/app", b"soon gone")
    await s3_registry.backend.delete(Digest.parse(digest))  # behind the mirror's back (a lifecycle rule, ...)
    for method in ("GET", "HEAD"):
        response = await client.request(method, f"/v2/team/app/blobs/{digest}")
        assert response.status == 404
        if method == "GET":
            assert await error_codes(response) == ["BLOB_UNKNOWN"]


def deny_blob_writes(bucket: str) -> str:
    """A bucket policy refusing every write under blobs/: the bucket fails the way a full or read-only one
    does, while the sessions beside it stay readable."""
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": ["s3:PutObject"], "Resource": [f"arn:aws:s3:::{bucket}/blobs/*"],
    }]})


async def test_a_bucket_that_fails_is_503_and_the_push_can_be_finished_later(s3_registry: S3Registry) -> None:
    client, backend = s3_registry.client, s3_registry.backend
    started = await client.post("/v2/team/app/blobs/uploads/")
    data = os.urandom(200_000)
    patched = await client.patch(started.headers["Location"], data=data)
    assert patched.status == 202
    await backend.client.put_bucket_policy(Bucket=backend.bucket, Policy=deny_blob_writes(backend.bucket))
    digest = digest_of(data)
    refused = await client.put(patched.headers["Location"], params={"digest": digest})
    assert refused.status == 503
    assert await error_codes(refused) == ["UNAVAILABLE"]
    monolithic = await client.post("/v2/team/app/blobs/uploads/", params={"digest": digest_of(b"m")}, data=b"m")
    assert monolithic.status == 503 and await error_codes(monolithic) == ["UNAVAILABLE"]
    # The session kept every byte: once the bucket takes writes again, the same PUT finishes the push.
    await backend.client.delete_bucket_policy(Bucket=backend.bucket)
    finished = await client.put(patched.headers["Location"], params={"digest": digest})
    assert finished.status == 201, await finished.text()
    assert await (await client.get(f"/v2/team/app/blobs/{digest}")).read() == data
    assert await s3_registry.leftovers() == []


def deny_blob_reads(bucket: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": ["s3:GetObject"], "Resource": [f"arn:aws:s3:::{bucket}/blobs/*"],
    }]})


async def test_a_pushed_blob_read_from_the_bucket_is_then_served_from_the_nodes_disk(
    s3_registry: S3Registry,
) -> None:
    """The disk tier: the first GET streams from the bucket and copies the blob to the node's disk (in the
    background); later GETs are served from there, even with the bucket refusing reads."""
    client, backend = s3_registry.client, s3_registry.backend
    data = os.urandom(300_000)
    digest = await push_blob(client, "team/app", data)
    assert await (await client.get(f"/v2/team/app/blobs/{digest}")).read() == data
    on_disk = s3_registry.root / "blobs" / "sha256" / digest[7:9] / digest[7:]
    for _ in range(100):
        if on_disk.exists():
            break
        await asyncio.sleep(0.05)
    assert on_disk.read_bytes() == data
    await backend.client.put_bucket_policy(Bucket=backend.bucket, Policy=deny_blob_reads(backend.bucket))
    try:
        got = await client.get(f"/v2/team/app/blobs/{digest}", headers={"Range": "bytes=10-19"})
        assert got.status == 206 and await got.read() == data[10:20]
        # Only through a repository that links it, as before.
        assert (await client.get(f"/v2/team/other/blobs/{digest}")).status == 404
    finally:
        await backend.client.delete_bucket_policy(Bucket=backend.bucket)


async def test_a_mount_on_s3_links_without_copying(s3_registry: S3Registry) -> None:
    client = s3_registry.client
    digest = await push_blob(client, "team/base", b"shared layer")
    mounted = await client.post("/v2/team/app/blobs/uploads/", params={"mount": digest, "from": "team/base"})
    assert mounted.status == 201
    assert await (await client.get(f"/v2/team/app/blobs/{digest}")).read() == b"shared layer"
    elsewhere = await client.post("/v2/team/app/blobs/uploads/", params={"mount": digest, "from": "team/none"})
    assert elsewhere.status == 202  # not readable from there: an ordinary upload starts instead
    assert await s3_registry.blob_keys() == [f"blobs/sha256/{digest[7:]}"]  # one copy of the bytes


async def test_blob_gets_redirect_to_a_presigned_url_when_enabled(
    make_registry: ClientFactory, rgw: RadosGateway, tmp_path: Path
) -> None:
    s3 = await new_bucket(rgw)
    client = await make_registry(storage={"path": str(tmp_path / "data"), "backend": "s3",
                                          "s3": {**s3, "presign": True, "presign_expires": "2m"}})
    data = os.urandom(70_000)
    digest = await push_blob(client, "team/app", data)
    redirected = await client.get(f"/v2/team/app/blobs/{digest}", allow_redirects=False)
    assert redirected.status == 307
    location = redirected.headers["Location"]
    assert location.startswith(f"{s3['endpoint']}/{s3['bucket']}/blobs/sha256/{digest[7:]}?")
    assert "X-Amz-Expires=120" in location
    async with aiohttp.ClientSession() as session:
        async with session.get(location, headers={"Range": "bytes=10-19"}) as response:
            assert response.status == 206 and await response.read() == data[10:20]
    # HEAD and a bad Range are still answered here.
    assert (await client.head(f"/v2/team/app/blobs/{digest}")).status == 200
    bad = await client.get(f"/v2/team/app/blobs/{digest}", headers={"Range": "bytes=5-2"}, allow_redirects=False)
    assert bad.status == 416
    backend = await S3BlobBackend.open(S3Settings(
        bucket=s3["bucket"], endpoint=s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"],
    ))
    try:
        await empty_and_remove(backend)
    finally:
        await backend.close()
