"""Issue 9, item 3, with real programs: skopeo lists a repository of 20,000 tags through the mirror, whose
upstream is the distribution registry (token auth). distribution writes the list as one chunked body that
reaches the mirror in many reads: all of it must come through, not "invalid JSON" from the first read.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import skopeo
from tests.support.distribution import DistributionRegistry
from tests.support.fixtures import MirrorFactory
from tests.support.images import BuiltImage
from tests.support.token_server import TokenServer

pytestmark = [pytest.mark.real]

TAG_COUNT = 20_000


def add_tags_on_disk(registry: DistributionRegistry, repo: str, tags: list[str]) -> None:
    """Tag the repository many times by making distribution's tag directories (20,000 pushes would take
    minutes): it lists tags by reading that directory's names, so it serves them as if pushed."""
    root = registry.data_dir / "docker/registry/v2/repositories" / repo / "_manifests/tags"
    for tag in tags:
        (root / tag).mkdir()


@pytest.fixture
def memory_backed_registry(token_server: TokenServer) -> Iterator[DistributionRegistry]:
    """A distribution registry of its own (token auth) whose storage is on tmpfs: 20,000 directories
    on this machine's disk cost minutes to create and delete."""
    memory = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="registry-listing-", dir=memory if memory.is_dir() else None))
    registry = DistributionRegistry.token_auth(token_server, workdir=workdir)
    try:
        yield registry.start()
    finally:
        registry.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.needs_tools("skopeo", "docker-registry")
def test_skopeo_lists_twenty_thousand_tags_through_the_mirror(
    memory_backed_registry: DistributionRegistry,
    mirror_factory: MirrorFactory,
    busybox_image: BuiltImage,
    tmp_path: Path,
) -> None:
    upstream, repo = memory_backed_registry, "library/many-tags"
    upstream.push(busybox_image, f"{repo}:1")
    tags = [f"2026.{i // 1000}.{i % 1000}-r{i:05d}" for i in range(TAG_COUNT)]
    add_tags_on_disk(upstream, repo, tags)
    mirror = mirror_factory(
        {
            "storage": {"path": str(tmp_path / "mirror-data")},
            "upstreams": [{"name": "docker.io", "url": upstream.url, "default": True, "timeout": "10s"}],
            # One page for skopeo: the mirror's own pagination is tested elsewhere.
            "limits": {"page_size_max": 50_000},
        }
    )
    listed = skopeo.list_tags(f"docker://{mirror.host}/{repo}", timeout=120)
    assert sorted(listed) == sorted([*tags, "1"])
