"""Bundles and replication rules together: `export --rule` and the oci_layout / archive destinations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mirror.app import create_app
from mirror.config import load_config_data
from mirror.replication.bundles import export_bundle, import_bundles, rule_images
from mirror.replication.hosting import REPLICATION
from mirror.replication.layout import REF_NAME
from mirror.state import CONFIG, ROUTER
from tests.registry_helpers import push_image


def _rule_config(tmp_path: Path, destinations: list[Any]) -> dict[str, Any]:
    return {
        "storage": {"path": str(tmp_path / "source")},
        "local": {"repositories": ["team/**"]},
        "replication": [{"name": "team-app", "source": "team/app", "tags": {"include": r"\d+", "latest": 2},
                         "destinations": destinations}],
    }


async def test_export_rule_takes_the_tags_the_rule_selects(aiohttp_client: Any, tmp_path: Path) -> None:
    config = _rule_config(tmp_path, [{"oci_layout": str(tmp_path / "unused")}])
    source = await aiohttp_client(create_app(load_config_data(config)))
    digests = {tag: (await push_image(source, "team/app", tag, layers=(tag.encode(),)))[0] for tag in ("1", "2", "3")}
    await push_image(source, "team/app", "edge", layers=(b"edge",))
    router = source.app[ROUTER]
    images, platforms, referrers = await rule_images(source.app[CONFIG], router, "team-app")
    assert images == ["team/app:3", "team/app:2"] and platforms is None and referrers
    bundle = tmp_path / "bundle"
    await export_bundle(router, images, bundle)
    index = json.loads((bundle / "index.json").read_text())
    assert sorted(e["annotations"][REF_NAME] for e in index["manifests"]) == ["team/app:2", "team/app:3"]
    dest = await aiohttp_client(create_app(load_config_data({"storage": {"path": str(tmp_path / "dest")}})))
    await import_bundles(dest.app[ROUTER], [bundle])
    async with dest.get("/v2/team/app/manifests/3") as response:
        assert response.status == 200 and response.headers["Docker-Content-Digest"] == digests["3"]


async def test_a_rule_keeps_an_oci_layout_and_an_archive_up_to_date(aiohttp_client: Any, tmp_path: Path) -> None:
    folder, archive = tmp_path / "airgap" / "base", tmp_path / "airgap" / "base.tar"
    config = _rule_config(tmp_path, [{"oci_layout": str(folder)}, {"archive": str(archive)}])
    source = await aiohttp_client(create_app(load_config_data(config)))
    await push_image(source, "team/app", "1", layers=(b"one",))
    engine = source.app[REPLICATION]
    report = await engine.run_rule("team-app")
    assert report.result == "ok", report
    await push_image(source, "team/app", "2", layers=(b"two",))
    report = await engine.run_rule("team-app")
    assert report.result == "ok", report
    for path in (folder, archive):
        dest = await aiohttp_client(create_app(load_config_data({"storage": {"path": str(path) + "-dest"}})))
        await import_bundles(dest.app[ROUTER], [path])
        for tag in ("1", "2"):
            async with dest.get(f"/v2/team/app/manifests/{tag}") as response:
                assert response.status == 200, (path, tag)
