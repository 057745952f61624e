"""The MetadataStore's behaviour: the same tests against the filesystem (FsMetadataStore over RepoStore) and a
real S3 server (S3MetadataStore on a fresh Ceph RGW bucket), so the two keep one meaning.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.errors import StorageUnavailable, TagInvalid
from mirror.oci.digest import Digest
from mirror.oci.manifest import Descriptor
from mirror.storage.metadata import FsMetadataStore, ManifestLink, MetadataStore
from mirror.storage.repos import RepoStore
from mirror.storage.s3 import S3BlobBackend, S3Settings
from mirror.storage.s3_meta import S3MetadataStore
from mirror.storage.s3_objects import S3Objects
from tests.support.procs import free_port
from tests.support.rgw import RadosGateway, new_bucket

IMAGE = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def digest(label: str) -> Digest:
    return Digest.of(label.encode())


def link(label: str, *, media_type: str = IMAGE, size: int = 123, references_linked: bool = False) -> ManifestLink:
    return ManifestLink(digest(label), media_type, size, references_linked)


class Stores:
    """The store under test, a second one on the same storage (another node), and raw writes behind their
    backs (damage)."""

    def __init__(self, kind: str, root: Path | None = None, backend: S3BlobBackend | None = None) -> None:
        self.kind = kind
        self.root = root
        self.backend = backend
        self.store = self.another()

    def another(self) -> MetadataStore:
        if self.backend is not None:
            return S3MetadataStore(S3Objects(self.backend.client, self.backend.bucket))
        assert self.root is not None
        return FsMetadataStore(RepoStore(self.root))

    async def write_raw(self, relative: str, data: bytes) -> None:
        """Bytes at `relative` (repos.py's layout) under the store's root, bypassing the store."""
        if self.backend is not None:
            await S3Objects(self.backend.client, self.backend.bucket).put(f"repositories/{relative}", data)
            return
        assert self.root is not None
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


async def open_bucket(gateway: RadosGateway) -> S3BlobBackend:
    return await S3BlobBackend.open(S3Settings(**await new_bucket(gateway)))


async def empty_and_remove(backend: S3BlobBackend) -> None:
    objects = S3Objects(backend.client, backend.bucket)
    await objects.delete_many([entry.key async for entry in objects.entries("")])
    await backend.client.delete_bucket(Bucket=backend.bucket)


@pytest.fixture(params=["fs", "s3"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    if request.param == "fs":
        yield Stores("fs", root=tmp_path / "repositories")
        return
    backend = await open_bucket(request.getfixturevalue("rgw"))
    try:
        yield Stores("s3", backend=backend)
    finally:
        await empty_and_remove(backend)
        await backend.close()


# -- blobs -----------------------------------------------------------------------------------------
async def test_link_has_and_unlink_blob(stores: Stores) -> None:
    store, blob = stores.store, digest("layer")
    assert not await store.has_blob("library/app", blob)
    await store.link_blob("library/app", blob)
    await store.link_blob("library/app", blob)  # linking twice is linking once
    assert await store.has_blob("library/app", blob)
    assert not await store.has_blob("library/other", blob)
    assert await store.unlink_blob("library/app", blob)
    assert not await store.has_blob("library/app", blob)
    assert not await store.unlink_blob("library/app", blob)


async def test_missing_lists_unlinked_blobs_then_unlinked_manifests_in_order(stores: Stores) -> None:
    store = stores.store
    blobs = [digest(f"layer-{i}") for i in range(40)]  # more than one fan-out's worth of requests
    for blob in blobs[::2]:
        await store.link_blob("app", blob)
    await store.store_manifest("app", link("m1"), referrer_of=None, referrer=None, tag=None)
    manifests = [digest("m2"), digest("m1"), digest("m3")]
    assert await store.missing("app", blobs, manifests) == [*blobs[1::2], digest("m2"), digest("m3")]
    assert await store.missing("app", blobs[::2], [digest("m1")]) == []
    assert await store.missing("elsewhere", blobs[:1], [digest("m1")]) == [blobs[0], digest("m1")]
    assert await store.missing("app", [], []) == []


# -- manifests, tags, referrers --------------------------------------------------------------------
async def test_store_manifest_with_tag_and_referrer_resolves_by_tag_and_digest(stores: Stores) -> None:
    store = stores.store
    subject = link("subject", media_type=INDEX, size=999, references_linked=True)
    signature = link("signature", size=42)
    descriptor = Descriptor(
        IMAGE, signature.digest, 42, artifact_type="application/vnd.example.sig",
        annotations={"org.example.signed-by": "ci"},
    )
    await store.store_manifest("app", subject, referrer_of=None, referrer=None, tag="1.0")
    await store.store_manifest("app", signature, referrer_of=subject.digest, referrer=descriptor, tag="sig")

    assert await store.resolve("app", "1.0") == subject
    assert await store.resolve("app", str(subject.digest)) == subject
    assert await store.manifest_link("app", subject.digest) == subject
    assert (await store.resolve("app", "sig")) == signature
    assert await store.referrers("app", subject.digest) == [descriptor]
    assert await store.referrers("app", signature.digest) == []
    assert await store.referrers("other", subject.digest) == []
    assert await store.resolve("app", "2.0") is None
    assert await store.resolve("app", str(digest("unknown"))) is None
    assert await store.resolve("other", "1.0") is None
    with pytest.raises(TagInvalid):
        await store.resolve("app", "-not-a-tag")


async def test_retagging_moves_the_tag(stores: Stores) -> None:
    store = stores.store
    await store.store_manifest("app", link("old"), referrer_of=None, referrer=None, tag="latest")
    await store.store_manifest("app", link("new"), referrer_of=None, referrer=None, tag="latest")
    assert await store.resolve("app", "latest") == link("new")
    assert await store.manifest_link("app", digest("old")) == link("old")


async def test_tag_validated_at_is_the_wall_clock_when_written(stores: Stores) -> None:
    before = time.time()
    await stores.store.store_manifest("app", link("m"), referrer_of=None, referrer=None, tag="v1")
    after = time.time()
    tag = await stores.store.tag("app", "v1")
    assert tag is not None and tag.digest == digest("m")
    # S3's LastModified has whole seconds; the filesystem's mtime may be coarse too.
    assert before - 2 <= tag.validated_at <= after + 2
    assert await stores.store.tag("app", "v2") is None


async def test_delete_tag_keeps_the_manifest(stores: Stores) -> None:
    store = stores.store
    await store.store_manifest("app", link("m"), referrer_of=None, referrer=None, tag="v1")
    assert await store.delete_tag("app", "v1")
    assert not await store.delete_tag("app", "v1")
    assert await store.resolve("app", "v1") is None
    assert await store.resolve("app", str(digest("m"))) == link("m")
    assert await store.tags("app") == []


async def test_unlink_manifest_removes_its_tags_referrer_entry_and_link(stores: Stores) -> None:
    store = stores.store
    subject, child = link("subject"), link("child")
    descriptor = Descriptor(IMAGE, child.digest, child.size)
    await store.store_manifest("app", subject, referrer_of=None, referrer=None, tag="base")
    await store.store_manifest("app", child, referrer_of=subject.digest, referrer=descriptor, tag="v1")
    await store.store_manifest("app", child, referrer_of=None, referrer=None, tag="v2")

    await store.unlink_manifest("app", child.digest, subject=subject.digest)

    assert await store.manifest_link("app", child.digest) is None
    assert await store.resolve("app", "v1") is None
    assert await store.tags("app") == ["base"]
    assert await store.referrers("app", subject.digest) == []
    assert await store.resolve("app", "base") == subject
    # Unlinking what is not linked is no error.
    await store.unlink_manifest("app", child.digest, subject=subject.digest)
    await store.unlink_manifest("app", subject.digest, subject=None)
    assert await store.tags("app") == []


async def test_tags_none_for_an_unknown_repository_else_sorted(stores: Stores) -> None:
    store = stores.store
    assert await store.tags("nobody/here") is None
    await store.link_blob("blobs-only", digest("layer"))
    assert await store.tags("blobs-only") == []
    await store.store_manifest("untagged", link("m"), referrer_of=None, referrer=None, tag=None)
    assert await store.tags("untagged") == []
    for tag in ["b", "latest", "10", "9", "Z", "a_1", "1.0-rc.1"]:
        await store.store_manifest("app", link("m"), referrer_of=None, referrer=None, tag=tag)
    assert await store.tags("app") == sorted(["b", "latest", "10", "9", "Z", "a_1", "1.0-rc.1"])


async def test_nested_repositories_are_separate_and_listed_sorted(stores: Stores) -> None:
    store = stores.store
    await store.store_manifest("a/b/c", link("deep"), referrer_of=None, referrer=None, tag="t1")
    await store.link_blob("a/b", digest("layer"))
    await store.store_manifest("a", link("top"), referrer_of=None, referrer=None, tag="t0")
    await store.link_blob("z9", digest("layer"))
    await store.link_blob("a/b", digest("layer2"))  # a repository is listed once

    assert await store.repositories() == ["a", "a/b", "a/b/c", "z9"]
    assert await store.tags("a") == ["t0"]
    assert await store.tags("a/b") == []
    assert await store.tags("a/b/c") == ["t1"]
    assert not await store.has_blob("a/b/c", digest("layer"))
    assert await store.resolve("a/b", "t1") is None
    assert await store.resolve("a/b/c", "t1") == link("deep")


async def test_repositories_empty_at_first(stores: Stores) -> None:
    assert await stores.store.repositories() == []


async def test_two_stores_on_the_same_storage_see_each_others_writes(stores: Stores) -> None:
    one, two = stores.store, stores.another()
    await one.store_manifest("shared", link("m"), referrer_of=None, referrer=None, tag="v1")
    assert await two.resolve("shared", "v1") == link("m")
    await two.link_blob("shared", digest("layer"))
    await two.link_blob("second/only", digest("layer"))
    assert await one.has_blob("shared", digest("layer"))
    assert await one.repositories() == ["second/only", "shared"]
    await two.store_manifest("shared", link("m2"), referrer_of=None, referrer=None, tag="v1")
    assert await one.resolve("shared", "v1") == link("m2")
    assert await two.delete_tag("shared", "v1")
    assert await one.tag("shared", "v1") is None
    await one.unlink_manifest("shared", digest("m2"), subject=None)
    assert await two.manifest_link("shared", digest("m2")) is None
    await two.close()


async def test_torn_or_foreign_objects_read_as_absent(stores: Stores) -> None:
    store = stores.store
    subject = link("subject")
    good = Descriptor(IMAGE, digest("good"), 10)
    await store.store_manifest("app", subject, referrer_of=None, referrer=None, tag="ok")
    await store.store_manifest("app", link("good"), referrer_of=subject.digest, referrer=good, tag=None)
    torn, foreign = digest("torn"), digest("foreign")
    await stores.write_raw(f"app/_manifests/sha256/{torn.hex}", b'{"mediaType": "applica')
    await stores.write_raw(f"app/_manifests/sha256/{foreign.hex}", b"\xff\xfe\x00 not json")
    await stores.write_raw("app/_tags/broken", b"sha256:not-a-digest")
    await stores.write_raw("app/_tags/binary", b"\xff\xfe\x00")
    await stores.write_raw(f"app/_referrers/sha256/{subject.digest.hex}/sha256-{'0' * 64}", b"[1, 2")

    assert await store.manifest_link("app", torn) is None
    assert await store.resolve("app", str(foreign)) is None
    assert await store.missing("app", [], [torn, foreign, subject.digest]) == [torn, foreign]
    assert await store.tag("app", "broken") is None
    assert await store.tag("app", "binary") is None
    assert await store.resolve("app", "broken") is None
    assert await store.referrers("app", subject.digest) == [good]
    assert await store.resolve("app", "ok") == subject


INVALID_NAMES = ["", "Upper", "../escape", "a//b", "a/", "/a", "_layers", "a/_tags", "a/../b", "x" * 256]


async def test_invalid_names_are_refused(stores: Stores) -> None:
    await refuses_invalid_names(stores.store)


async def refuses_invalid_names(store: MetadataStore) -> None:
    for name in INVALID_NAMES:
        with pytest.raises(ValueError):
            await store.has_blob(name, digest("layer"))
        with pytest.raises(ValueError):
            await store.link_blob(name, digest("layer"))
        with pytest.raises(ValueError):
            await store.missing(name, [digest("layer")], [])
        with pytest.raises(ValueError):
            await store.manifest_link(name, digest("m"))
        with pytest.raises(ValueError):
            await store.resolve(name, "latest")
        with pytest.raises(ValueError):
            await store.store_manifest(name, link("m"), referrer_of=None, referrer=None, tag="v1")
        with pytest.raises(ValueError):
            await store.unlink_manifest(name, digest("m"), subject=None)
        with pytest.raises(ValueError):
            await store.tags(name)
        with pytest.raises(ValueError):
            await store.referrers(name, digest("m"))


# -- S3 only ---------------------------------------------------------------------------------------
@pytest.fixture
async def s3_down() -> AsyncIterator[S3MetadataStore]:
    """A store whose bucket's endpoint does not answer (nothing listens on the port), on a client that does
    not retry: the backend's retries with backoff would make each refused call take seconds."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=2)
    async with get_session().create_client(
        "s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1", aws_access_key_id="k",
        aws_secret_access_key="s", config=config,
    ) as client:
        yield S3MetadataStore(S3Objects(client, "gone"))


async def test_s3_down_through_the_blob_backends_client_raises_storage_unavailable() -> None:
    backend = await S3BlobBackend.open(
        S3Settings(bucket="gone", endpoint=f"http://127.0.0.1:{free_port()}", access_key="k", secret_key="s")
    )
    try:
        store = S3MetadataStore(S3Objects(backend.client, backend.bucket))
        with pytest.raises(StorageUnavailable):
            await store.resolve("app", "latest")
        await store.close()
    finally:
        await backend.close()


async def test_s3_down_raises_storage_unavailable(s3_down: S3MetadataStore) -> None:
    store, m = s3_down, link("m")
    calls = [
        store.has_blob("app", digest("layer")),
        store.link_blob("app", digest("layer")),
        store.missing("app", [digest("layer")], [m.digest]),
        store.resolve("app", "latest"),
        store.store_manifest("app", m, referrer_of=None, referrer=None, tag="v1"),
        store.delete_tag("app", "v1"),
        store.unlink_manifest("app", m.digest, subject=None),
        store.tags("app"),
        store.referrers("app", m.digest),
        store.repositories(),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable) as caught:
            await call
        assert "repositories/" not in str(caught.value)  # a 503 names the bucket, never a key
        assert caught.value.detail == {"bucket": "gone"}


async def test_s3_refuses_invalid_names_tags_and_digests_before_any_request(s3_down: S3MetadataStore) -> None:
    # The endpoint is down: any request would raise StorageUnavailable instead of ValueError.
    await refuses_invalid_names(s3_down)
    for tag in ["", "../x", "a/b", "-x", "x" * 129]:
        with pytest.raises(ValueError):
            await s3_down.tag("app", tag)
        with pytest.raises(ValueError):
            await s3_down.delete_tag("app", tag)
        with pytest.raises(ValueError):
            await s3_down.store_manifest("app", link("m"), referrer_of=None, referrer=None, tag=tag)
    with pytest.raises(ValueError):
        await s3_down.has_blob("app", Digest("sha256", "../../blobs/x"))
    with pytest.raises(ValueError):
        await s3_down.manifest_link("app", Digest("md5", "00"))
