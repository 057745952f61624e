"""Pure OCI knowledge: repository names, tags, digests and manifest parsing (no I/O)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from mirror.errors import DigestInvalid, ManifestInvalid, NameInvalid, TagInvalid
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.manifest import (
    DOCKER_FOREIGN_LAYER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
    parse_manifest,
)
from mirror.oci.names import is_valid_name, is_valid_tag, validate_name, validate_tag
from tests.registry_helpers import OCI_CONFIG, OCI_EMPTY, descriptor, image_manifest, index_manifest

SHA256_HEX = hashlib.sha256(b"x").hexdigest()
SHA512_HEX = hashlib.sha512(b"x").hexdigest()


# -- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "alpine",
        "library/alpine",
        "team/sub/deep/image",
        "a",
        "0",
        "my.image",
        "my_image",
        "my__image",
        "my-image",
        "my--image",
        "my---image",
        "a.b_c__d-e--f",
        "ghcr.io/owner/image",
        "x" * 255,
        "/".join(["ab"] * 85),  # 254 characters, many components
    ],
)
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Alpine",
        "library/Alpine",
        "UPPER",
        "..",
        "team/../x",
        "team/./x",
        "../etc/passwd",
        "%2e%2e",
        "team/%2e%2e/x",
        "a//b",
        "/a",
        "a/",
        "/",
        ".a",
        "a.",
        "_a",
        "a_",
        "-a",
        "a-",
        "a...b",
        "a___b",
        "a.-b",
        "a-_b",
        "a+b",
        "a b",
        "a\\b",
        "a:b",
        "a@b",
        "a\x00b",
        "a\nb",
        "x" * 256,
        "a/" * 150 + "a",
        "é",
    ],
)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(NameInvalid) as caught:
        validate_name(name)
    assert caught.value.status == 400
    assert caught.value.to_json()["errors"][0]["code"] == "NAME_INVALID"


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_private", "1", "A-b_c.D", "x" * 128, "0" * 128])
def test_valid_tags(tag: str) -> None:
    assert is_valid_tag(tag)
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", ".hidden", "-dash", "x" * 129, "a/b", "a:b", "a b", "..", "tag\n", "ü", "sha256:" + SHA256_HEX]
)
def test_invalid_tags(tag: str) -> None:
    assert not is_valid_tag(tag)
    with pytest.raises(TagInvalid) as caught:
        validate_tag(tag)
    assert caught.value.status == 400


# -- digests --------------------------------------------------------------------------------------
def test_digest_parses_sha256_and_sha512() -> None:
    d256 = Digest.parse(f"sha256:{SHA256_HEX}")
    assert (d256.algorithm, d256.hex) == ("sha256", SHA256_HEX)
    assert str(d256) == f"sha256:{SHA256_HEX}"
    d512 = Digest.parse(f"sha512:{SHA512_HEX}")
    assert (d512.algorithm, d512.hex) == ("sha512", SHA512_HEX)


def test_digest_of_bytes_matches_hashlib() -> None:
    assert str(Digest.of(b"x")) == f"sha256:{SHA256_HEX}"
    assert str(Digest.of(b"x", "sha512")) == f"sha512:{SHA512_HEX}"
    assert Digest.of(b"x") == Digest.parse(f"sha256:{SHA256_HEX}")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        "sha256:xyz",
        f"sha256:{SHA256_HEX[:-1]}",  # too short
        f"sha256:{SHA256_HEX}0",  # too long
        f"sha256:{SHA512_HEX}",  # sha512 length under sha256
        f"sha512:{SHA256_HEX}",  # sha256 length under sha512
        f"sha256:{SHA256_HEX.upper()}",
        f"SHA256:{SHA256_HEX}",
        f"md5:{hashlib.md5(b'x').hexdigest()}",
        f"sha384:{hashlib.sha384(b'x').hexdigest()}",
        f"sha1:{hashlib.sha1(b'x').hexdigest()}",
        "sha256:../x",
        "sha256:../../../../etc/passwd",
        f"sha256:{SHA256_HEX[:62]}/x",
        f" sha256:{SHA256_HEX}",
        f"sha256:{SHA256_HEX}\n",
        SHA256_HEX,
        f"sha256::{SHA256_HEX}",
    ],
)
def test_invalid_digests(text: str) -> None:
    with pytest.raises(DigestInvalid) as caught:
        Digest.parse(text)
    assert caught.value.status == 400
    assert caught.value.code == "DIGEST_INVALID"


def test_references_with_a_colon_are_digests() -> None:
    assert looks_like_digest(f"sha256:{SHA256_HEX}")
    assert looks_like_digest("sha256:../x")  # then rejected by Digest.parse, never treated as a tag
    assert not looks_like_digest("latest")


# -- manifests ------------------------------------------------------------------------------------
CONFIG = b'{"architecture":"amd64","os":"linux"}'
LAYERS = [b"layer-a", b"layer-b"]


def test_parse_oci_image_manifest() -> None:
    body = image_manifest(CONFIG, LAYERS)
    parsed = parse_manifest(body, OCI_MANIFEST)
    assert parsed.media_type == OCI_MANIFEST
    assert not parsed.is_index
    assert [str(b.digest) for b in parsed.blobs] == [descriptor("x", d)["digest"] for d in (CONFIG, *LAYERS)]
    assert [b.size for b in parsed.blobs] == [len(CONFIG), *map(len, LAYERS)]
    assert parsed.manifests == ()
    assert parsed.subject is None
    # OCI 1.1: no artifactType means the config's media type.
    assert parsed.artifact_type == OCI_CONFIG


def test_parse_docker_schema2_manifest() -> None:
    body = image_manifest(CONFIG, LAYERS, media_type=DOCKER_MANIFEST)
    parsed = parse_manifest(body, DOCKER_MANIFEST)
    assert parsed.media_type == DOCKER_MANIFEST
    assert len(parsed.blobs) == 3
    assert not parsed.is_index


def test_parse_docker_manifest_list_and_oci_index() -> None:
    child = image_manifest(CONFIG, LAYERS)
    for media_type in (DOCKER_MANIFEST_LIST, OCI_INDEX):
        parsed = parse_manifest(index_manifest([(OCI_MANIFEST, child)], media_type=media_type), media_type)
        assert parsed.media_type == media_type
        assert parsed.is_index
        assert parsed.blobs == ()
        assert [str(m.digest) for m in parsed.manifests] == [descriptor(OCI_MANIFEST, child)["digest"]]


def test_media_type_comes_from_content_type_when_the_document_has_none() -> None:
    doc = json.loads(image_manifest(CONFIG, LAYERS))
    del doc["mediaType"]
    assert parse_manifest(json.dumps(doc).encode(), OCI_MANIFEST).media_type == OCI_MANIFEST
    # ... and from the document when the Content-Type is generic.
    assert parse_manifest(image_manifest(CONFIG, LAYERS), "application/json").media_type == OCI_MANIFEST
    assert parse_manifest(image_manifest(CONFIG, LAYERS), None).media_type == OCI_MANIFEST


def test_content_type_parameters_are_ignored() -> None:
    parsed = parse_manifest(image_manifest(CONFIG, LAYERS), f"{OCI_MANIFEST}; charset=utf-8")
    assert parsed.media_type == OCI_MANIFEST


def test_artifact_with_artifact_type_and_subject() -> None:
    subject = image_manifest(CONFIG, LAYERS)
    body = image_manifest(
        b"{}",
        [b"signature"],
        config_type=OCI_EMPTY,
        artifactType="application/vnd.example.sig",
        subject=descriptor(OCI_MANIFEST, subject),
        annotations={"org.example": "yes"},
    )
    parsed = parse_manifest(body, OCI_MANIFEST)
    assert parsed.artifact_type == "application/vnd.example.sig"
    assert parsed.subject is not None
    assert str(parsed.subject.digest) == descriptor(OCI_MANIFEST, subject)["digest"]
    assert parsed.annotations == {"org.example": "yes"}


def test_artifact_type_defaults_to_config_media_type() -> None:
    body = image_manifest(b"{}", [], config_type="application/vnd.example.config+json")
    assert parse_manifest(body, OCI_MANIFEST).artifact_type == "application/vnd.example.config+json"


def test_index_with_subject_and_artifact_type() -> None:
    subject = image_manifest(CONFIG, LAYERS)
    body = index_manifest(
        [(OCI_MANIFEST, subject)],
        artifactType="application/vnd.example.bundle",
        subject=descriptor(OCI_MANIFEST, subject),
    )
    parsed = parse_manifest(body, OCI_INDEX)
    assert parsed.artifact_type == "application/vnd.example.bundle"
    assert parsed.subject is not None


def _invalid(body: bytes, content_type: str | None) -> ManifestInvalid:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(body, content_type)
    assert caught.value.code == "MANIFEST_INVALID"
    assert caught.value.status == 400
    return caught.value


def test_schema1_is_rejected() -> None:
    schema1 = json.dumps({"schemaVersion": 1, "name": "x", "tag": "latest", "fsLayers": [], "history": []}).encode()
    _invalid(schema1, DOCKER_SCHEMA1)
    _invalid(schema1, DOCKER_SCHEMA1_SIGNED)
    _invalid(schema1, "application/json")
    _invalid(schema1, None)
    # A schema-2-looking body declared as schema 1 is rejected too.
    _invalid(image_manifest(CONFIG, LAYERS, media_type=DOCKER_SCHEMA1), None)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b"[]",
        b'"string"',
        b"null",
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,  # nesting deep enough to exhaust a recursive parser
        b'{"a":' * 100_000,
    ],
    ids=["empty", "text", "truncated", "array", "string", "null", "binary", "deep-array", "deep-object"],
)
def test_invalid_json_is_manifest_invalid(body: bytes) -> None:
    _invalid(body, OCI_MANIFEST)


def test_media_type_conflicting_with_content_type() -> None:
    _invalid(image_manifest(CONFIG, LAYERS), DOCKER_MANIFEST)
    _invalid(image_manifest(CONFIG, LAYERS), OCI_INDEX)
    _invalid(image_manifest(CONFIG, LAYERS, media_type=DOCKER_MANIFEST), OCI_MANIFEST)
    _invalid(index_manifest([], media_type=DOCKER_MANIFEST_LIST), OCI_INDEX)


def test_manifests_and_layers_together_is_rejected() -> None:
    """CVE-2021-41190: a document that reads as an index to one client and an image to another."""
    doc = json.loads(image_manifest(CONFIG, LAYERS))
    doc["manifests"] = [descriptor(OCI_MANIFEST, b"{}")]
    for content_type in (OCI_MANIFEST, OCI_INDEX, None):
        _invalid(json.dumps(doc).encode(), content_type)
    del doc["mediaType"]
    _invalid(json.dumps(doc).encode(), OCI_INDEX)
    # An index carrying a config is the same ambiguity.
    index = json.loads(index_manifest([]))
    index["config"] = descriptor(OCI_CONFIG, CONFIG)
    _invalid(json.dumps(index).encode(), OCI_INDEX)


def _mutated(change: dict[str, Any], drop: tuple[str, ...] = ()) -> bytes:
    doc = json.loads(image_manifest(CONFIG, LAYERS))
    doc.update(change)
    for key in drop:
        doc.pop(key)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "body",
    [
        _mutated({"schemaVersion": 3}),
        _mutated({}, drop=("schemaVersion",)),
        _mutated({"schemaVersion": "2"}),
        _mutated({"mediaType": 5}),
        _mutated({"mediaType": "application/vnd.example.unknown"}),
        _mutated({}, drop=("config",)),
        _mutated({}, drop=("layers",)),
        _mutated({"layers": "nope"}),
        _mutated({"layers": [{"mediaType": OCI_CONFIG, "digest": "sha256:xyz", "size": 1}]}),
        _mutated({"layers": [{"mediaType": OCI_CONFIG, "digest": f"sha256:{SHA256_HEX}", "size": -1}]}),
        _mutated({"layers": [{"mediaType": OCI_CONFIG, "digest": f"sha256:{SHA256_HEX}", "size": "1"}]}),
        _mutated({"layers": [{"mediaType": OCI_CONFIG, "digest": f"sha256:{SHA256_HEX}", "size": True}]}),
        _mutated({"layers": [{"digest": f"sha256:{SHA256_HEX}", "size": 1}]}),
        _mutated({"layers": ["sha256:" + SHA256_HEX]}),
        _mutated({"config": None}),
        _mutated({"subject": "sha256:" + SHA256_HEX}),
        _mutated({"artifactType": 7}),
    ],
)
def test_malformed_image_manifests(body: bytes) -> None:
    _invalid(body, OCI_MANIFEST)


def test_index_without_manifests_list_is_invalid() -> None:
    _invalid(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode(), OCI_INDEX)
    _invalid(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {}}).encode(), OCI_INDEX)


# -- non-distributable ("foreign") layers ---------------------------------------------------------------
ND_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar"
ND_LAYER_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
ND_LAYER_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
ELSEWHERE = "https://store.example.com/blobs/sha256/"


def _with_layers(layers: list[dict[str, Any]], media_type: str = OCI_MANIFEST) -> bytes:
    doc = json.loads(image_manifest(CONFIG, [], media_type=media_type))
    doc["layers"] = layers
    return json.dumps(doc).encode()


def test_non_distributable_layers_are_foreign_not_blobs_the_registry_must_hold() -> None:
    """A registry is never given these layers (clients fetch them from `urls`), so they are not among the
    blobs a push must have uploaded; the others still are."""
    normal = descriptor("application/vnd.oci.image.layer.v1.tar+gzip", b"pushed layer")
    foreign = [
        descriptor(ND_LAYER_GZIP, b"nd gzip", urls=[ELSEWHERE + "1"]),
        descriptor(ND_LAYER, b"nd tar", urls=[ELSEWHERE + "2"]),
        descriptor(ND_LAYER_ZSTD, b"nd zstd"),  # no urls: the client has it already
        descriptor("application/vnd.oci.image.layer.v1.tar", b"any layer with urls", urls=[ELSEWHERE + "3"]),
    ]
    parsed = parse_manifest(_with_layers([foreign[0], normal, *foreign[1:]]), OCI_MANIFEST, pushed=True)
    assert [str(b.digest) for b in parsed.blobs] == [digest_of_bytes(CONFIG), normal["digest"]]
    assert [str(b.digest) for b in parsed.foreign] == [f["digest"] for f in foreign]
    assert [b.size for b in parsed.foreign] == [f["size"] for f in foreign]
    # gc keeps a foreign layer a client chose to push anyway: it is still referenced.
    assert {str(b.digest) for b in parsed.references} == {digest_of_bytes(CONFIG), normal["digest"]} | {
        f["digest"] for f in foreign
    }


def test_docker_foreign_layers_are_foreign() -> None:
    layer = descriptor(DOCKER_FOREIGN_LAYER, b"windows base", urls=["https://mcr.example.com/base"])
    parsed = parse_manifest(_with_layers([layer], DOCKER_MANIFEST), DOCKER_MANIFEST, pushed=True)
    assert [str(b.digest) for b in parsed.foreign] == [layer["digest"]]
    assert [str(b.digest) for b in parsed.blobs] == [digest_of_bytes(CONFIG)]


def test_an_empty_urls_list_leaves_an_ordinary_layer_required() -> None:
    layer = descriptor("application/vnd.oci.image.layer.v1.tar", b"layer", urls=[])
    parsed = parse_manifest(_with_layers([layer]), OCI_MANIFEST, pushed=True)
    assert parsed.foreign == ()
    assert [str(b.digest) for b in parsed.blobs][1:] == [layer["digest"]]


@pytest.mark.parametrize(
    "layer",
    [
        descriptor(ND_LAYER, b"x", urls="https://example.com/x"),
        descriptor(ND_LAYER, b"x", urls=[7]),
        descriptor(ND_LAYER, b"x", urls=["ftp://example.com/x"]),
        descriptor(ND_LAYER, b"x", urls=["/relative/x"]),
        descriptor(ND_LAYER, b"x", urls=["https://example.com/x#fragment"]),
        descriptor(ND_LAYER, b"x", urls=["http://[::1/x"]),
        descriptor(ND_LAYER, b"x", urls=["https://example.com/ok", "file:///etc/passwd"]),
        {"mediaType": ND_LAYER, "digest": "sha256:nothex", "size": 1, "urls": [ELSEWHERE]},
        {"mediaType": ND_LAYER, "digest": f"sha256:{SHA256_HEX}", "size": -1, "urls": [ELSEWHERE]},
    ],
    ids=["string", "not-strings", "ftp", "relative", "fragment", "unparsable", "one-bad", "digest", "size"],
)
def test_a_pushed_foreign_layer_is_still_checked(layer: dict[str, Any]) -> None:
    """Only the blob's presence is waived: the descriptor and its urls must be valid."""
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(_with_layers([layer]), OCI_MANIFEST, pushed=True)
    assert caught.value.code == "MANIFEST_INVALID"


def test_stored_manifests_with_odd_urls_still_parse() -> None:
    """What was stored (or an upstream served) before the urls check existed must still be readable, or gc
    could no longer see the blobs it references."""
    layer = descriptor("application/vnd.oci.image.layer.v1.tar", b"layer", urls=["ftp://example.com/x"])
    parsed = parse_manifest(_with_layers([layer]), OCI_MANIFEST)
    assert [str(b.digest) for b in parsed.references][1:] == [layer["digest"]]


def digest_of_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
