"""Air-gap bundles in process: export from one mirror, import into another that has no upstream.

What a user notices: the names every kind of client asks for, a delta that ships only what is new, and a
bundle that is damaged, cut short or missing its base changing nothing at all on the importing side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.app import create_app
from mirror.config import load_config_data
from mirror.replication.bundles import BUNDLE_FILE, BundleError, export_bundle, import_bundles
from mirror.replication.layout import REF_NAME
from mirror.state import CONFIG, ROUTER
from tests.fake_upstream import FakeUpstream
from tests.proxy_helpers import base_url
from tests.registry_helpers import (
    digest_of,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
BIG_LAYER = bytes(range(256)) * 12_000  # ~3 MB: spans pieces of a split archive


async def _hub_mirror(aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, fake: FakeUpstream) -> TestClient:
    """The exporting side: Docker Hub (a fake) as its default upstream, `team/**` local."""
    server = await aiohttp_server(fake.app())
    config = {
        "storage": {"path": str(tmp_path / "source")},
        "upstreams": [{"name": "docker.io", "url": base_url(server), "default": True}],
        "local": {"repositories": ["team/**"]},
    }
    return await aiohttp_client(create_app(load_config_data(config)))


async def _airgapped(aiohttp_client: Any, tmp_path: Path, label: str = "dest") -> TestClient:
    """The importing side: no upstream at all."""
    return await aiohttp_client(create_app(load_config_data({"storage": {"path": str(tmp_path / label)}})))


def _stored_blobs(client: TestClient) -> set[str]:
    root = client.server.app[CONFIG].storage.path / "blobs"
    return {p.name for p in root.rglob("*") if p.is_file()}


async def _catalog(client: TestClient) -> list[str]:
    async with client.get("/v2/_catalog") as response:
        return list((await response.json())["repositories"])


async def _manifest(client: TestClient, path: str, **params: str) -> tuple[int, bytes]:
    async with client.get(f"/v2/{path}", params=params, headers={"Accept": OCI_MANIFEST}) as response:
        return response.status, await response.read()


async def test_an_exported_image_is_served_under_every_name_clients_ask_for(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fake = FakeUpstream()
    hub_digest, hub_body = fake.add_image("library/alpine", "3.20", [b"alpine layer"])
    source = await _hub_mirror(aiohttp_client, aiohttp_server, tmp_path, fake)
    team_digest, team_body = await push_image(source, "team/app", "1", layers=(BIG_LAYER, b"small"))

    bundle = tmp_path / "bundle"
    result = await export_bundle(source.app[ROUTER], ["alpine:3.20", "team/app:1"], bundle)
    index = json.loads((bundle / "index.json").read_text())
    names = {entry["annotations"][REF_NAME]: entry["digest"] for entry in index["manifests"]}
    assert names == {"docker.io/library/alpine:3.20": hub_digest, "team/app:1": team_digest}
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    assert [(i["name"], i["digest"]) for i in manifest["images"]] == [
        ("docker.io/library/alpine:3.20", hub_digest), ("team/app:1", team_digest)
    ]
    assert {b["digest"] for b in manifest["blobs"]} == {
        hub_digest, team_digest, digest_of(BIG_LAYER), digest_of(b"small"), digest_of(b"alpine layer"),
        digest_of(b'{"architecture":"amd64","os":"linux"}'),
        digest_of(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()),
    }
    assert result.bundle.base is None

    dest = await _airgapped(aiohttp_client, tmp_path)
    await import_bundles(dest.app[ROUTER], [bundle])
    # Docker's registry-mirrors, a path-prefix client, containerd's ?ns=: one image.
    for path, params in [
        ("library/alpine/manifests/3.20", {}),
        ("docker.io/library/alpine/manifests/3.20", {}),
        ("docker.io/alpine/manifests/3.20", {}),
        ("library/alpine/manifests/3.20", {"ns": "docker.io"}),
    ]:
        assert await _manifest(dest, path, **params) == (200, hub_body), (path, params)
    assert await _manifest(dest, "team/app/manifests/1") == (200, team_body)
    async with dest.get(f"/v2/team/app/blobs/{digest_of(BIG_LAYER)}") as response:
        assert response.status == 200 and await response.read() == BIG_LAYER
    assert await _catalog(dest) == ["library/alpine", "team/app"]


async def test_other_registries_keep_their_host_in_the_name(aiohttp_client: Any, tmp_path: Path) -> None:
    source = await _airgapped(aiohttp_client, tmp_path, "source")  # every name is local here
    digest, body = await push_image(source, "ghcr.io/owner/app", "2")
    bundle = tmp_path / "bundle.tar"
    await export_bundle(source.app[ROUTER], ["ghcr.io/owner/app:2"], bundle)
    dest = await _airgapped(aiohttp_client, tmp_path)
    await import_bundles(dest.app[ROUTER], [bundle])
    assert await _manifest(dest, "ghcr.io/owner/app/manifests/2") == (200, body)
    assert await _manifest(dest, "owner/app/manifests/2", ns="ghcr.io") == (200, body)
    assert (await _manifest(dest, "owner/app/manifests/2"))[0] == 404  # not Docker Hub's owner/app


async def test_an_index_referrers_and_signatures_travel_byte_for_byte(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fake = FakeUpstream()
    children = [fake.add_image("library/multi", f"arch-{arch}", [f"layer {arch}".encode()]) for arch in ("a", "b")]
    index_digest, index_body = fake.add_index("library/multi", "1", children)
    source = await _hub_mirror(aiohttp_client, aiohttp_server, tmp_path, fake)
    digest, body = await push_image(source, "team/app", "1")
    subject = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body)}
    await push_blob(source, "team/app", b"{}")
    await push_blob(source, "team/app", b"an sbom")
    sbom = image_manifest(b"{}", [b"an sbom"], artifactType="application/spdx+json", subject=subject)
    assert (await put_manifest(source, "team/app", digest_of(sbom), sbom, OCI_MANIFEST)).status == 201
    await push_blob(source, "team/app", b"a signature")
    signature = image_manifest(b"{}", [b"a signature"])
    sig_tag = "sha256-" + digest.split(":")[1] + ".sig"
    assert (await put_manifest(source, "team/app", sig_tag, signature, OCI_MANIFEST)).status == 201

    bundle = tmp_path / "bundle.tar"
    await export_bundle(source.app[ROUTER], ["multi:1", "team/app:1"], bundle)
    dest = await _airgapped(aiohttp_client, tmp_path)
    await import_bundles(dest.app[ROUTER], [bundle])
    async with dest.get("/v2/library/multi/manifests/1", headers={"Accept": OCI_INDEX}) as response:
        assert response.status == 200 and await response.read() == index_body
        assert response.headers["Docker-Content-Digest"] == index_digest
    async with dest.get(f"/v2/team/app/referrers/{digest}") as response:
        assert [entry["digest"] for entry in (await response.json())["manifests"]] == [digest_of(sbom)]
    assert await _manifest(dest, f"team/app/manifests/{sig_tag}") == (200, signature)


async def test_a_split_archive_is_pieces_with_checksums_and_imports_whole(aiohttp_client: Any, tmp_path: Path) -> None:
    source = await _airgapped(aiohttp_client, tmp_path, "source")
    _, body = await push_image(source, "team/app", "1", layers=(BIG_LAYER,))
    bundle = tmp_path / "out" / "bundle.tar"
    result = await export_bundle(source.app[ROUTER], ["team/app:1"], bundle, split_bytes=1 << 20)
    pieces = result.files[:-1]
    assert [p.name for p in result.files] == ["bundle.tar.001", "bundle.tar.002", "bundle.tar.003",
                                              "bundle.tar.bundle.json"]
    assert all(p.stat().st_size == 1 << 20 for p in pieces[:-1])
    sums = (tmp_path / "out" / "bundle.tar.sha256").read_text().splitlines()
    assert [line.split("  ")[1] for line in sums] == [p.name for p in pieces]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [*[p.name for p in result.files[:-1]], "bundle.tar.bundle.json", "bundle.tar.sha256"]

    dest = await _airgapped(aiohttp_client, tmp_path)
    await import_bundles(dest.app[ROUTER], [tmp_path / "out" / "bundle.tar"])
    assert await _manifest(dest, "team/app/manifests/1") == (200, body)


async def _assert_untouched(dest: TestClient) -> None:
    assert await _catalog(dest) == []
    assert _stored_blobs(dest) == set()
    assert (await _manifest(dest, "team/app/manifests/1"))[0] == 404


@pytest.mark.parametrize("form", ["folder", "archive"])
async def test_one_flipped_byte_refuses_the_bundle_and_nothing_is_visible(
    aiohttp_client: Any, tmp_path: Path, form: str
) -> None:
    source = await _airgapped(aiohttp_client, tmp_path, "source")
    await push_image(source, "team/app", "1", layers=(BIG_LAYER, b"good layer"))
    await push_image(source, "team/other", "1", layers=(b"other layer",))
    bundle = tmp_path / ("bundle" if form == "folder" else "bundle.tar")
    await export_bundle(source.app[ROUTER], ["team/other:1", "team/app:1"], bundle)
    if form == "folder":
        layer = bundle / "blobs" / "sha256" / digest_of(BIG_LAYER).split(":")[1]
        data = bytearray(layer.read_bytes())
        data[len(data) // 2] ^= 0x01
        layer.write_bytes(bytes(data))
    else:
        data = bytearray(bundle.read_bytes())
        at = data.find(BIG_LAYER[:4096]) + 100_000
        data[at] ^= 0x01
        bundle.write_bytes(bytes(data))
        (tmp_path / "bundle.tar.sha256").unlink()  # the blob digests alone must catch it

    dest = await _airgapped(aiohttp_client, tmp_path)
    with pytest.raises(BundleError, match=f"{digest_of(BIG_LAYER)} is corrupt"):
        await import_bundles(dest.app[ROUTER], [bundle])
    await _assert_untouched(dest)  # team/other was fine, and is not imported either


async def test_a_truncated_or_incomplete_bundle_changes_nothing(aiohttp_client: Any, tmp_path: Path) -> None:
    source = await _airgapped(aiohttp_client, tmp_path, "source")
    await push_image(source, "team/app", "1", layers=(BIG_LAYER,))
    whole = tmp_path / "whole.tar"
    await export_bundle(source.app[ROUTER], ["team/app:1"], whole)
    dest = await _airgapped(aiohttp_client, tmp_path)

    cut = tmp_path / "cut" / "bundle.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(BundleError, match="archive is truncated inside blobs/sha256/"):
        await import_bundles(dest.app[ROUTER], [cut])
    # The same cut with the checksum file beside it: the damaged piece is named.
    (tmp_path / "cut" / "bundle.tar.sha256").write_text(
        (tmp_path / "whole.tar.sha256").read_text().replace("whole.tar", "bundle.tar")
    )
    with pytest.raises(BundleError, match="piece bundle.tar is damaged"):
        await import_bundles(dest.app[ROUTER], [cut])

    pieces = tmp_path / "pieces" / "bundle.tar"
    await export_bundle(source.app[ROUTER], ["team/app:1"], pieces, split_bytes=1 << 20)
    (tmp_path / "pieces" / "bundle.tar.002").unlink()
    with pytest.raises(BundleError, match=r"piece\(s\) missing: bundle.tar.002"):
        await import_bundles(dest.app[ROUTER], [pieces])

    folder = tmp_path / "folder"
    await export_bundle(source.app[ROUTER], ["team/app:1"], folder)
    (folder / "blobs" / "sha256" / digest_of(BIG_LAYER).split(":")[1]).unlink()
    with pytest.raises(BundleError, match=f"Missing: {digest_of(BIG_LAYER)}"):
        await import_bundles(dest.app[ROUTER], [folder])
    await _assert_untouched(dest)


async def test_a_delta_carries_only_new_blobs_and_needs_its_base(aiohttp_client: Any, tmp_path: Path) -> None:
    source = await _airgapped(aiohttp_client, tmp_path, "source")
    one_digest, one_body = await push_image(source, "team/app", "1", layers=(BIG_LAYER, b"v1"))
    base = tmp_path / "base.tar"
    base_result = await export_bundle(source.app[ROUTER], ["team/app:1"], base)
    two_digest, two_body = await push_image(source, "team/app", "2", layers=(BIG_LAYER, b"v2"))

    delta = tmp_path / "delta"
    result = await export_bundle(source.app[ROUTER], ["team/app:1", "team/app:2"], delta, since=base)
    carried = {p.name for p in (delta / "blobs" / "sha256").iterdir()}
    assert carried == {two_digest.split(":")[1], digest_of(b"v2").split(":")[1]}  # the new tag's manifest and layer
    assert result.bundle.base == {"id": base_result.bundle.id, "created": base_result.bundle.created}
    assert [i.name for i in result.bundle.images] == ["team/app:1", "team/app:2"]

    # Without its base: refused, naming the base and what is missing, and nothing is written.
    fresh = await _airgapped(aiohttp_client, tmp_path, "fresh")
    with pytest.raises(BundleError) as refused:
        await import_bundles(fresh.app[ROUTER], [delta])
    message = str(refused.value)
    assert f"delta of bundle {base_result.bundle.id}" in message
    assert digest_of(BIG_LAYER) in message and one_digest in message
    await _assert_untouched(fresh)

    # With it (named in any order): both tags, byte for byte.
    dest = await _airgapped(aiohttp_client, tmp_path)
    await import_bundles(dest.app[ROUTER], [delta, base])
    assert await _manifest(dest, "team/app/manifests/1") == (200, one_body)
    assert await _manifest(dest, "team/app/manifests/2") == (200, two_body)

    # The base's manifest kept beside it (the archive itself went across) gives the same delta.
    kept = tmp_path / "kept" / "base.json"
    kept.parent.mkdir()
    (tmp_path / "base.tar.bundle.json").rename(kept)
    (tmp_path / "base.tar").unlink()
    same = await export_bundle(source.app[ROUTER], ["team/app:1", "team/app:2"], tmp_path / "same", since=kept)
    assert {p.name for p in (tmp_path / "same" / "blobs" / "sha256").iterdir()} == carried
    assert same.bundle.base == result.bundle.base

    # A delta of the delta: nothing new, nothing carried but what a tag list needs.
    again = tmp_path / "again.tar"
    await export_bundle(source.app[ROUTER], ["team/app:2"], again, since=delta)
    await import_bundles(dest.app[ROUTER], [again])
    assert await _manifest(dest, "team/app/manifests/2") == (200, two_body)


async def test_a_bundle_naming_an_upstreams_image_is_refused_where_that_upstream_is_configured(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [b"alpine layer"])
    source = await _hub_mirror(aiohttp_client, aiohttp_server, tmp_path, fake)
    bundle = tmp_path / "bundle"
    await export_bundle(source.app[ROUTER], ["alpine:3.20"], bundle)
    with pytest.raises(BundleError, match="routed to the upstream docker.io"):
        await import_bundles(source.app[ROUTER], [bundle])


async def test_a_failed_export_leaves_nothing_that_looks_like_a_bundle(aiohttp_client: Any, tmp_path: Path) -> None:
    source = await _airgapped(aiohttp_client, tmp_path, "source")
    await push_image(source, "team/app", "1", layers=(BIG_LAYER,))
    out = tmp_path / "out"
    for target in (out / "bundle", out / "bundle.tar", out / "pieces.tar"):
        with pytest.raises(BundleError, match="team/gone:1"):
            split = 1 << 20 if target.name == "pieces.tar" else None
            await export_bundle(source.app[ROUTER], ["team/app:1", "team/gone:1"], target, split_bytes=split)
    assert list(out.iterdir()) == []
    await export_bundle(source.app[ROUTER], ["team/app:1"], out / "bundle")
    with pytest.raises(BundleError, match="already exists"):
        await export_bundle(source.app[ROUTER], ["team/app:1"], out / "bundle")


async def test_without_an_upstream_every_spelling_of_a_name_is_one_local_repository(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    dest = await _airgapped(aiohttp_client, tmp_path)
    router = dest.app[ROUTER]
    for name, ns, local in [
        ("library/alpine", None, "library/alpine"),  # Docker's registry-mirrors
        ("library/alpine", "docker.io", "library/alpine"),  # containerd
        ("docker.io/library/alpine", None, "library/alpine"),  # path prefix
        ("docker.io/alpine", None, "library/alpine"),
        ("index.docker.io/library/alpine", None, "library/alpine"),
        ("owner/app", "ghcr.io", "ghcr.io/owner/app"),
        ("ghcr.io/owner/app", None, "ghcr.io/owner/app"),
        ("team/app", None, "team/app"),
    ]:
        target = router.route(name, ns)
        assert (target.registry, target.repo, target.upstream) == (router.local, local, None), (name, ns)
    # A push by any spelling lands where every pull finds it.
    _, body = await push_image(dest, "docker.io/team/app", "1")
    assert await _manifest(dest, "team/app/manifests/1") == (200, body)
