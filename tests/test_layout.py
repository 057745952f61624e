"""LayoutRegistry as a replication destination kept up to date in place (`oci_layout: DIR`, `archive:`):
a rerun sends nothing already there, an interrupted run leaves the previous layout usable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.app import create_app
from mirror.config import load_config_data
from mirror.replication.copier import Copier
from mirror.replication.layout import REF_NAME, LayoutRegistry
from mirror.state import ROUTER
from mirror.storage.interface import Registry
from tests.registry_helpers import push_image


async def _registry(aiohttp_client: Any, path: Path) -> TestClient:
    return await aiohttp_client(create_app(load_config_data({"storage": {"path": str(path)}})))


def _local(client: TestClient) -> Registry:
    return client.app[ROUTER].local


@pytest.mark.parametrize("name", ["layout", "layout.tar"])
async def test_a_layout_updated_in_place_gains_new_tags_and_resends_nothing(
    aiohttp_client: Any, tmp_path: Path, name: str
) -> None:
    source = await _registry(aiohttp_client, tmp_path / "source")
    one, _ = await push_image(source, "team/app", "1", layers=(b"shared" * 1000, b"one"))
    target = tmp_path / name

    layout = await LayoutRegistry.update(target)
    first = await Copier().copy(_local(source), "team/app", "1", layout, "example.org/team/app", dest_tag="1")
    await layout.close()
    assert first.stats.blobs_written == 3

    two, _ = await push_image(source, "team/app", "2", layers=(b"shared" * 1000, b"two"))
    layout = await LayoutRegistry.update(target)
    again = await Copier().copy(_local(source), "team/app", "1", layout, "example.org/team/app", dest_tag="1")
    second = await Copier().copy(_local(source), "team/app", "2", layout, "example.org/team/app", dest_tag="2")
    await layout.close()
    assert again.unchanged and again.stats.blobs_written == 0
    assert second.stats.blobs_written == 1 and second.stats.blobs_present == 2  # only the new layer

    # Read back whole: both tags, the first run's blobs still there (an archive is rewritten with them).
    reader = await LayoutRegistry.open(target)
    dest = await _registry(aiohttp_client, tmp_path / "dest")
    for tag, digest in (("1", one), ("2", two)):
        copied = await Copier().copy(reader, "example.org/team/app", tag, _local(dest), "team/app", dest_tag=tag)
        assert str(copied.dest_digest) == digest
    assert await reader.list_tags("example.org/team/app") == ["1", "2"]
    await reader.close()


async def test_an_interrupted_update_leaves_the_previous_layout(aiohttp_client: Any, tmp_path: Path) -> None:
    source = await _registry(aiohttp_client, tmp_path / "source")
    await push_image(source, "team/app", "1")
    await push_image(source, "team/app", "2", layers=(b"a new layer",))
    target = tmp_path / "layout"
    layout = await LayoutRegistry.update(target)
    await Copier().copy(_local(source), "team/app", "1", layout, "team/app", dest_tag="1")
    await layout.close()

    layout = await LayoutRegistry.update(target)
    await Copier().copy(_local(source), "team/app", "2", layout, "team/app", dest_tag="2")
    await layout.abort()  # the run dies before index.json is written
    index = json.loads((target / "index.json").read_text())
    assert [entry["annotations"][REF_NAME] for entry in index["manifests"]] == ["team/app:1"]
    assert not [p for p in target.iterdir() if p.name.startswith(".")]

    layout = await LayoutRegistry.update(target)  # the rerun finds the blobs the dead run wrote
    rerun = await Copier().copy(_local(source), "team/app", "2", layout, "team/app", dest_tag="2")
    await layout.close()
    # Only the tag was missing: no blob sent again, the manifest found there, one PUT for the tag.
    assert rerun.stats.blobs_written == 0 and rerun.stats.manifests_present == 1
    assert rerun.stats.manifests_written == 1 and not rerun.unchanged
    index = json.loads((target / "index.json").read_text())
    assert [entry["annotations"][REF_NAME] for entry in index["manifests"]] == ["team/app:1", "team/app:2"]
