"""`mirror verify`, `mirror gc` and start-up recovery, run the way an operator runs them: the CLI against
the data directory of a mirror that keeps serving (in-process here, a real process for gc during a push)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mirror.cache.manager as manager_module
from mirror.cache.index import CACHED, LOCAL, PINNED, BlobIndex
from mirror.cache.manager import CacheManager
from mirror.oci.digest import Digest
from mirror.state import CACHE, CONFIG
from tests.cache_helpers import (
    Http,
    Image,
    MiB,
    add_to_upstream,
    backdate,
    blob_files,
    check_store,
    index_rows,
    make_image,
    pull,
    push,
    run_cli,
    write_config,
)
from tests.fake_upstream import OCI_MANIFEST, FakeUpstream, digest_of, upstream_config
from tests.proxy_helpers import metric_value, metrics_text

HOUR = 3600.0


async def start(aiohttp_server: Any, make_registry: Any, fake: FakeUpstream) -> Any:
    server = await aiohttp_server(fake.app())
    return await make_registry(
        upstreams=[upstream_config(f"http://{server.host}:{server.port}", library_prefix=True, tag_ttl="1h")],
        local={"repositories": ["local/**"]},
    )


def data_dir(client: Any) -> Path:
    return client.server.app[CONFIG].storage.path


def corrupt(path: Path) -> None:
    """Flip bytes in place: same size, same name, wrong content (what bit rot or a bad disk does)."""
    data = bytearray(path.read_bytes())
    for offset in (0, len(data) // 2, len(data) - 1):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def cli_json(result: Any) -> dict[str, Any]:
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


# -- verify ---------------------------------------------------------------------------------------------


async def test_verify_quarantines_corrupted_blobs_which_are_then_fetched_again(
    aiohttp_server, make_registry, tmp_path
):
    fake = FakeUpstream()
    upstream_image = make_image("library/tool", "1", [os.urandom(512 << 10), os.urandom(512 << 10)])
    add_to_upstream(fake, upstream_image)
    client = await start(aiohttp_server, make_registry, fake)
    root = data_dir(client)
    cache: CacheManager = client.server.app[CACHE]
    await pull(client, upstream_image)
    local_image = make_image("local/tool", "1", [os.urandom(256 << 10)])
    await push(client, local_image)
    config = write_config(tmp_path / "mirror.yml", root)

    files = blob_files(root)
    cached_layer, local_layer = upstream_image.layer_digests[0], local_image.layer_digests[0]
    corrupt(files[cached_layer])
    corrupt(files[local_layer])

    # A sample checks only that many blobs (and reports exactly what it checked).
    sampled = run_cli("verify", "--config", str(config), "--sample", "2")
    report = cli_json(sampled)
    assert report["checked"] == 2
    assert set(report["quarantined"]) <= {cached_layer, local_layer}
    assert sampled.returncode == (1 if report["quarantined"] else 0)
    assert run_cli("verify", "--config", str(config), "--sample", "-1").returncode == 2

    full = run_cli("verify", "--config", str(config))
    # The sample may have drawn both corrupted blobs (1 time in 10): then the full run finds none left.
    left_corrupted = {cached_layer, local_layer} - set(cli_json(sampled)["quarantined"])
    assert full.returncode == (1 if left_corrupted else 0), full.stderr
    report = cli_json(full)
    assert report["checked"] == len(files) - len(cli_json(sampled)["quarantined"])
    assert sorted(report["quarantined"] + cli_json(sampled)["quarantined"]) == sorted([cached_layer, local_layer])
    quarantined = sorted(p.name.rsplit("-", 1)[0] for p in (root / "quarantine").iterdir())
    assert quarantined == sorted(d.replace(":", "-") for d in (cached_layer, local_layer))
    rows = check_store(root)  # the files left all hash right, and the index dropped the quarantined rows
    assert cached_layer not in rows and local_layer not in rows

    # Never served again: the cached blob is fetched anew from the upstream, byte for byte ...
    assert fake.count("GET", cached_layer) == 1
    await pull(client, upstream_image)
    assert fake.count("GET", cached_layer) == 2
    assert index_rows(root)[cached_layer].holders == {CACHED}
    # ... and the local one is gone until it is pushed again.
    response = await client.get(f"/v2/local/tool/blobs/{local_layer}")
    assert response.status == 404 and "BLOB_UNKNOWN" in await response.text()
    await push(client, local_image)
    await pull(client, local_image)

    clean = run_cli("verify", "--config", str(config))
    assert clean.returncode == 0 and cli_json(clean)["quarantined"] == []
    text = await metrics_text(client)
    assert metric_value(text, "mirror_quarantined_blobs_total") == 2
    assert metric_value(text, "mirror_verify_runs_total") == 3
    await cache.maintain()  # the server notices the maintenance run and recounts
    text = await metrics_text(client)
    assert metric_value(text, "mirror_stored_bytes", holder="cached") == upstream_image.total_bytes
    assert metric_value(text, "mirror_stored_bytes", holder="local") == local_image.total_bytes
    check_store(root)


# -- gc -------------------------------------------------------------------------------------------------


def artifact(subject: Image | bytes, blob: bytes, artifact_type: str = "application/vnd.example.sig") -> bytes:
    subject_body = subject.manifest if isinstance(subject, Image) else subject
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": digest_of(blob), "size": len(blob)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": digest_of(subject_body), "size": len(subject_body)},
        }
    ).encode()


async def push_blob(client: Any, repo: str, data: bytes) -> str:
    async with client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest_of(data)}, data=data) as r:
        assert r.status == 201, await r.text()
    return digest_of(data)


async def put_manifest(client: Any, repo: str, reference: str, body: bytes) -> None:
    async with client.put(f"/v2/{repo}/manifests/{reference}", data=body,
                          headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201, await r.text()


async def test_gc_marks_and_sweeps_local_content_and_leaves_the_rest(aiohttp_server, make_registry, tmp_path):
    fake = FakeUpstream()
    upstream_image = make_image("library/base", "1", [os.urandom(64 << 10)])
    add_to_upstream(fake, upstream_image)
    client = await start(aiohttp_server, make_registry, fake)
    root = data_dir(client)
    cache: CacheManager = client.server.app[CACHE]
    config = write_config(tmp_path / "mirror.yml", root)
    await pull(client, upstream_image)  # cached: never gc's business

    shared = os.urandom(40 << 10)
    kept = make_image("local/app", "v1", [shared, os.urandom(30 << 10)])
    dropped = make_image("local/app", "v2", [shared, os.urandom(20 << 10)])
    other = make_image("local/other", "1", [os.urandom(10 << 10)])
    await push(client, kept)
    await push(client, dropped)
    await push(client, other)
    signature_blob, doomed_signature_blob = os.urandom(1000), os.urandom(1001)
    signature = artifact(kept, signature_blob)
    doomed_signature = artifact(dropped, doomed_signature_blob)
    for body, blob in ((signature, signature_blob), (doomed_signature, doomed_signature_blob)):
        await push_blob(client, "local/app", blob)
        await push_blob(client, "local/app", b"{}")
        await put_manifest(client, "local/app", digest_of(body), body)
    dangling = await push_blob(client, "local/app", os.urandom(5000))  # uploaded, never referenced
    pinned = await push_blob(client, "local/app", os.urandom(6000))
    await cache.hold(Digest.parse(pinned), 6000, PINNED)  # replication keeps it whatever gc thinks
    for repo, tag in (("local/app", "v2"), ("local/other", "1")):  # deleted tags: their manifests go
        async with client.delete(f"/v2/{repo}/manifests/{tag}") as r:
            assert r.status == 202
    backdate(root, 2 * HOUR)
    young = make_image("local/young", "1", [os.urandom(3000)])  # pushed and untagged just now: grace
    await push(client, young)
    async with client.delete("/v2/local/young/manifests/1") as r:
        assert r.status == 202

    before = {p for p in root.rglob("*") if p.is_file() and "index" not in p.parts}
    dry = run_cli("gc", "--config", str(config), "--dry-run", "--grace", "1h")
    assert dry.returncode == 0, dry.stderr
    dry_report = cli_json(dry)
    assert {p for p in root.rglob("*") if p.is_file() and "index" not in p.parts} == before, "a dry run removed files"

    real = run_cli("gc", "--config", str(config), "--grace", "1h")
    assert real.returncode == 0, real.stderr
    report = cli_json(real)
    assert report["dry_run"] is False and dry_report["dry_run"] is True
    for key in ("manifests_removed", "links_removed", "blobs_removed", "bytes_freed"):
        assert (sorted(report[key]) if key != "bytes_freed" else report[key]) == (
            sorted(dry_report[key]) if key != "bytes_freed" else dry_report[key]
        ), f"the dry run reported other {key} than the real run"

    assert sorted(report["manifests_removed"]) == sorted(
        [f"local/app@{dropped.digest}", f"local/app@{digest_of(doomed_signature)}", f"local/other@{other.digest}"]
    )
    removed_blobs = {
        dropped.digest, digest_of(doomed_signature), other.digest,
        digest_of(dropped.config), digest_of(dropped.layers[1]), digest_of(doomed_signature_blob),
        digest_of(other.config), digest_of(other.layers[0]), dangling,
    }
    assert set(report["blobs_removed"]) == removed_blobs
    assert f"local/app@{pinned}" in report["links_removed"]
    assert report["bytes_freed"] == sum(
        len(b) for b in (dropped.manifest, doomed_signature, other.manifest, dropped.config, dropped.layers[1],
                         doomed_signature_blob, other.config, other.layers[0])
    ) + 5000
    files = blob_files(root)
    assert not removed_blobs & set(files)
    for keep in (*kept.all_digests, digest_of(signature), digest_of(signature_blob), digest_of(b"{}"), pinned,
                 *upstream_image.all_digests, *young.all_digests):
        assert keep in files, keep

    # What was kept still works; what was collected is gone for good.
    await pull(client, kept)
    async with client.get(f"/v2/local/app/referrers/{kept.digest}") as r:
        assert r.status == 200
        assert [m["digest"] for m in (await r.json())["manifests"]] == [digest_of(signature)]
    async with client.get(f"/v2/local/app/manifests/{dropped.digest}") as r:
        assert r.status == 404
    async with client.get(f"/v2/local/app/blobs/{digest_of(dropped.layers[1])}") as r:
        assert r.status == 404
    await pull(client, young, by_digest=True)
    requests_before = sum(fake.requests.values())
    await pull(client, upstream_image)
    assert sum(fake.requests.values()) == requests_before, "gc touched cached content"

    rows = check_store(root)
    assert rows[pinned].holders == {PINNED}  # no local repository links it any more
    assert rows[digest_of(shared)].holders == {LOCAL}
    text = await metrics_text(client)
    assert metric_value(text, "mirror_gc_runs_total") == 1  # dry runs do not count
    assert metric_value(text, "mirror_gc_freed_bytes_total") == report["bytes_freed"]
    await cache.maintain()
    text = await metrics_text(client)
    local_bytes = sum(files[d].stat().st_size for d, r in rows.items() if LOCAL in r.holders)
    assert metric_value(text, "mirror_stored_bytes", holder="local") == local_bytes
    assert metric_value(text, "mirror_stored_bytes", holder="pinned") == 6000
    assert metric_value(text, "mirror_stored_bytes", holder="cached") == upstream_image.total_bytes

    # Nothing is old enough under a longer grace; a second run finds nothing more.
    assert cli_json(run_cli("gc", "--config", str(config), "--grace", "3h"))["blobs_removed"] == []
    assert cli_json(run_cli("gc", "--config", str(config), "--grace", "1h"))["blobs_removed"] == []


def chunked_push(client: Http, repo: str, data: bytes, *, delay: float) -> str:
    """A slow chunked upload (POST, several PATCHes, PUT), the way docker pushes a layer."""
    status, headers, body = client.request("POST", f"/v2/{repo}/blobs/uploads/")
    assert status == 202, (status, body)
    location, offset = headers["location"], 0
    while offset < len(data):
        chunk = data[offset : offset + (256 << 10)]
        status, headers, body = client.request(
            "PATCH", location, chunk, {"Content-Range": f"{offset}-{offset + len(chunk) - 1}"}, pieces_delay=delay
        )
        assert status == 202, (status, body)
        offset += len(chunk)
    status, _, body = client.request("PUT", f"{location}?digest={digest_of(data)}", b"")
    assert status == 201, (status, body)
    return digest_of(data)


def http_pull(client: Http, image: Image) -> None:
    status, _, body = client.request("GET", f"/v2/{image.repo}/manifests/{image.tag}", headers={"Accept": OCI_MANIFEST})
    assert status == 200 and body == image.manifest, (image.repo, status, body[:200])
    for blob in (image.config, *image.layers):
        status, _, body = client.request("GET", f"/v2/{image.repo}/blobs/{digest_of(blob)}")
        assert status == 200 and body == blob, (image.repo, digest_of(blob), status)


@pytest.mark.slow
def test_gc_is_safe_against_a_live_mirror_during_a_push(mirror_factory: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    mirror = mirror_factory({"storage": {"path": str(data)}})  # a private registry: every repository is local
    client = Http(mirror.port)
    config = write_config(tmp_path / "gc.yml", data)
    shared = os.urandom(1 * MiB)  # garbage's layer, which the image pushed during gc uploads again
    garbage = make_image("team/garbage", "1", [shared, os.urandom(256 << 10)])
    kept = make_image("team/app", "1", [os.urandom(512 << 10)])
    incoming = make_image("team/new", "1", [shared, os.urandom(2 * MiB)])
    for image in (garbage, kept):
        for blob in (image.config, *image.layers):
            chunked_push(client, image.repo, blob, delay=0)
        status, _, body = client.request("PUT", f"/v2/{image.repo}/manifests/{image.tag}", image.manifest,
                                         {"Content-Type": OCI_MANIFEST})
        assert status == 201, body
    status, _, _ = client.request("DELETE", "/v2/team/garbage/manifests/1")
    assert status == 202
    backdate(data, 2 * HOUR)

    errors: list[BaseException] = []
    # The manifest goes up only after a gc run has finished while the blobs were uploaded: the push then
    # spans at least two gc runs however slow this machine is at starting the CLI.
    first_gc_done = threading.Event()

    def push_incoming() -> None:
        try:
            for blob in (incoming.config, *incoming.layers):
                chunked_push(client, incoming.repo, blob, delay=0.01)
            assert first_gc_done.wait(120), "no gc run finished"
            status, _, body = client.request("PUT", f"/v2/{incoming.repo}/manifests/{incoming.tag}",
                                             incoming.manifest, {"Content-Type": OCI_MANIFEST})
            assert status == 201, body
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    pusher = threading.Thread(target=push_incoming)
    pusher.start()
    runs = []
    while pusher.is_alive() or not runs:
        result = run_cli("gc", "--config", str(config), "--grace", "10m")
        assert result.returncode == 0, result.stderr
        runs.append(cli_json(result))
        first_gc_done.set()
    pusher.join()
    assert not errors, errors
    assert len(runs) >= 2, "gc did not run while the push was under way"
    runs.append(cli_json(run_cli("gc", "--config", str(config), "--grace", "10m")))

    removed = {d for run in runs for d in run["blobs_removed"]}
    assert garbage.digest in removed and digest_of(garbage.layers[1]) in removed
    assert not removed & set(kept.all_digests)
    http_pull(client, kept)
    http_pull(client, incoming)  # its reused layer survived (or was stored again from the upload)
    status, _, _ = client.request("GET", f"/v2/team/garbage/manifests/{garbage.digest}")
    assert status == 404
    status, _, body = client.request("GET", "/metrics")
    assert metric_value(body.decode(), "mirror_gc_runs_total") == len(runs)
    check_store(data)


# -- start-up recovery ----------------------------------------------------------------------------------


async def test_startup_recovery_cleans_temp_files_and_reconciles_the_index(aiohttp_server, make_registry):
    fake = FakeUpstream()
    upstream_image = make_image("library/base", "1", [os.urandom(100 << 10)])
    add_to_upstream(fake, upstream_image)
    server = await aiohttp_server(fake.app())
    settings = dict(
        upstreams=[upstream_config(f"http://{server.host}:{server.port}", library_prefix=True, tag_ttl="1h")],
        local={"repositories": ["local/**"]},
        uploads={"expire": "1h"},  # the backdated session below is past it
    )
    client = await make_registry(**settings)
    root = data_dir(client)
    await pull(client, upstream_image)
    local_image = make_image("local/app", "1", [os.urandom(50 << 10)])
    await push(client, local_image)
    sessions = []
    for _ in range(2):
        async with client.post("/v2/local/app/blobs/uploads/") as r:
            location = r.headers["Location"]
        async with client.patch(location, data=b"x" * 1000, headers={"Content-Range": "0-999"}) as r:
            assert r.status == 202
        sessions.append(location)
    await client.close()  # the server stops (as if it crashed: nothing below is something it would do)

    old_temp, new_temp = root / "tmp" / "old.part", root / "tmp" / "new.part"
    old_temp.write_bytes(b"half a fill")
    new_temp.write_bytes(b"a fill under way")
    evicted = root / "tmp" / "0123.evicted"
    evicted.write_bytes(b"an eviction renamed this away; the process died before unlinking it")
    backdate(old_temp, 2 * HOUR)
    backdate(root / "uploads" / sessions[0].rsplit("/", 1)[1], 2 * HOUR)
    ghost = digest_of(b"a blob whose file is gone")
    orphan = os.urandom(7000)
    orphan_path = root / "blobs" / "sha256" / digest_of(orphan)[7:9] / digest_of(orphan)[7:]
    orphan_path.parent.mkdir(parents=True, exist_ok=True)
    orphan_path.write_bytes(orphan)  # committed, then the process died before any repository linked it
    index = BlobIndex(root / "index")
    try:
        index.add_holder(ghost, 123, CACHED, time.time())
        index.remove(local_image.layer_digests[0])
        index.remove(upstream_image.layer_digests[0])
        index.set_size(digest_of(upstream_image.config), 1)
    finally:
        index.close()

    client = await make_registry(**settings)
    cache: CacheManager = client.server.app[CACHE]
    await cache.wait_reconciled()  # in the background: the mirror served from the start
    report = cache.reconcile_report
    assert report is not None and (report.dropped, report.indexed, report.removed, report.resized) == (1, 2, 1, 1)
    assert not old_temp.exists() and new_temp.exists() and not evicted.exists()
    async with client.get(sessions[0]) as r:
        assert r.status == 404 and "BLOB_UPLOAD_UNKNOWN" in await r.text()
    async with client.get(sessions[1]) as r:
        assert r.status == 204 and r.headers["Range"] == "0-999"
    new_temp.unlink()
    rows = check_store(root)
    assert ghost not in rows and not orphan_path.exists()
    assert rows[local_image.layer_digests[0]].holders == {LOCAL}
    assert rows[upstream_image.layer_digests[0]].holders == {CACHED}
    assert rows[digest_of(upstream_image.config)].size == len(upstream_image.config)
    requests_before = sum(fake.requests.values())
    await pull(client, upstream_image)
    await pull(client, local_image)
    assert sum(fake.requests.values()) == requests_before
    text = await metrics_text(client)
    assert metric_value(text, "mirror_stored_bytes", holder="local") == local_image.total_bytes
    assert metric_value(text, "mirror_stored_bytes", holder="cached") == upstream_image.total_bytes


async def test_the_mirror_serves_at_once_after_a_restart_and_reconciles_in_the_background(
    aiohttp_server, make_registry, monkeypatch
):
    """Start-up does not wait for the scan of every blob and link: cached and pushed content is served
    (from the files, as always) while it runs, and nothing is evicted until it is done."""
    fake = FakeUpstream()
    upstream_image = make_image("library/base", "1", [os.urandom(100 << 10)])
    add_to_upstream(fake, upstream_image)
    server = await aiohttp_server(fake.app())
    settings = dict(
        upstreams=[upstream_config(f"http://{server.host}:{server.port}", library_prefix=True, tag_ttl="1h")],
        local={"repositories": ["local/**"]},
    )
    client = await make_registry(**settings)
    await pull(client, upstream_image)
    local_image = make_image("local/app", "1", [os.urandom(50 << 10)])
    await push(client, local_image)
    await client.close()

    scan_may_finish = threading.Event()
    real_scan = manager_module._scan_store_sync

    def slow_scan(*args: Any) -> Any:
        assert scan_may_finish.wait(30), "the test never let the scan finish"
        return real_scan(*args)

    monkeypatch.setattr(manager_module, "_scan_store_sync", slow_scan)
    client = await make_registry(**settings)  # returns once /v2/ is served: the scan is still waiting
    cache: CacheManager = client.server.app[CACHE]
    try:
        assert not cache.reconciled
        async with client.get("/v2/") as r:
            assert r.status == 200
        requests_before = sum(fake.requests.values())
        await pull(client, upstream_image)
        await pull(client, local_image)
        assert sum(fake.requests.values()) == requests_before, "cached content was fetched again"
        assert (await cache.evict_to(0)).evicted == 0, "evicted before the index was checked against the files"
        assert set(upstream_image.all_digests) <= set(blob_files(data_dir(client)))
    finally:
        scan_may_finish.set()
    await cache.wait_reconciled()
    result = await cache.evict_to(0)
    assert result.evicted == len(upstream_image.all_digests)
    await pull(client, local_image)  # never evicted
    check_store(data_dir(client))


async def test_stored_bytes_stay_exact_when_verify_drops_a_row_and_the_blob_is_fetched_again(
    aiohttp_server, make_registry, tmp_path
):
    """`mirror verify` (another process) drops a corrupted blob's row; the next pull fetches and holds it
    again. The server's byte totals must count it once, at once, not twice until some later recount (it
    once reported 1.5x the cached bytes in test_verify_quarantines_...: the totals were moved by the
    server's own changes only, so a row removed elsewhere was still counted when the blob came back)."""
    fake = FakeUpstream()
    image = make_image("library/tool", "1", [os.urandom(512 << 10), os.urandom(512 << 10)])
    add_to_upstream(fake, image)
    client = await start(aiohttp_server, make_registry, fake)
    root = data_dir(client)
    cache: CacheManager = client.server.app[CACHE]
    await pull(client, image)
    layer = image.layer_digests[0]
    corrupt(blob_files(root)[layer])
    result = run_cli("verify", "--config", str(write_config(tmp_path / "mirror.yml", root)))
    assert cli_json(result)["quarantined"] == [layer]
    await pull(client, image)  # fetched again and held again, before any background pass
    assert fake.count("GET", layer) == 2
    assert cache.totals[CACHED] == image.total_bytes
    text = await metrics_text(client)
    assert metric_value(text, "mirror_stored_bytes", holder="cached") == image.total_bytes
