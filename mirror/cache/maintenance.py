"""Offline-safe maintenance: `mirror verify` (re-hash, quarantine) and `mirror gc` (mark and sweep).

Both work on the data directory directly, so they run from the CLI while the server keeps serving:
blob files are only ever removed or renamed (never rewritten), the index is process-safe, and anything
younger than the grace period is left alone because a push may still be in flight.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mirror.cache.index import LOCAL, PINNED, BlobIndex
from mirror.errors import RegistryError
from mirror.oci.digest import Digest
from mirror.oci.manifest import parse_manifest
from mirror.storage.blobs import BlobStore, hash_file
from mirror.storage.files import atomic_write
from mirror.storage.repos import RepoStore

log = logging.getLogger(__name__)

STATS_FILE = "maintenance.json"


@dataclass
class VerifyReport:
    checked: int = 0
    quarantined: list[str] = field(default_factory=list)


@dataclass
class GcReport:
    dry_run: bool
    manifests_removed: list[str] = field(default_factory=list)  # "repo@digest"
    links_removed: list[str] = field(default_factory=list)  # "repo@digest"
    blobs_removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def _record_stats(root: Path, key: str, increment: int) -> None:
    """Cumulative counters the server exposes as metrics (the CLI is another process)."""
    path = root / STATS_FILE
    try:
        stats = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        stats = {}
    stats[key] = int(stats.get(key, 0)) + increment
    atomic_write(path, json.dumps(stats).encode())


def read_stats(root: Path) -> dict[str, int]:
    try:
        data = json.loads((root / STATS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: int(v) for k, v in data.items() if isinstance(v, int)}


def verify(root: Path, *, sample: int | None = None, seed: int | None = None) -> VerifyReport:
    """Re-hash every blob (or a random sample); move mismatching ones to `quarantine/` and drop their
    index rows, so they are never served again and cached ones are fetched anew on the next pull."""
    blobs = BlobStore(root)
    index = BlobIndex(root / "index")
    report = VerifyReport()
    try:
        digests = blobs.iter_digests_sync()
        if sample is not None and sample < len(digests):
            digests = random.Random(seed).sample(digests, sample)
        quarantine = root / "quarantine"
        for digest in digests:
            path = blobs.path_for(digest)
            try:
                actual, _size = hash_file(path, digest.algorithm)
            except FileNotFoundError:
                continue  # evicted or collected while we looked
            report.checked += 1
            if actual == digest.hex:
                continue
            quarantine.mkdir(exist_ok=True)
            target = quarantine / f"{digest.algorithm}-{digest.hex}-{int(time.time())}"
            os.replace(path, target)
            index.remove(str(digest))
            report.quarantined.append(str(digest))
            log.warning("quarantined %s: its bytes hash to %s:%s", digest, digest.algorithm, actual)
        _record_stats(root, "verify_runs", 1)
        _record_stats(root, "quarantined", len(report.quarantined))
    finally:
        index.close()
    return report


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def gc(root: Path, *, dry_run: bool = False, grace_seconds: float = 3600.0) -> GcReport:
    """Mark and sweep for local repositories.

    Kept: manifests a tag points to, their children (indexes), manifests whose subject is kept
    (referrers), and every blob those reference. Removed: untagged manifests nothing keeps, repository
    links to blobs no kept manifest references, and blob files nothing links (local or cache) and
    nothing pins. Anything younger than `grace_seconds` stays: it may belong to a push in progress.
    Cached upstream content is the evictor's business and is never collected here.
    """
    blobs = BlobStore(root)
    local = RepoStore(root / "repositories")
    index = BlobIndex(root / "index")
    report = GcReport(dry_run=dry_run)
    cutoff = time.time() - grace_seconds
    try:
        for repo in local.repositories():
            _collect_repository(local, blobs, repo, cutoff, report, dry_run)
        linked: set[Digest] = set()
        for repo in local.repositories():
            linked.update(local.linked_blobs(repo))
            linked.update(local.linked_manifests(repo))
        cache_root = root / "cache"
        for upstream_dir in cache_root.iterdir() if cache_root.exists() else []:
            cache_repos = RepoStore(upstream_dir)
            for repo in cache_repos.repositories():
                linked.update(cache_repos.linked_blobs(repo))
                linked.update(cache_repos.linked_manifests(repo))
        for digest in blobs.iter_digests_sync():
            record = index.get(str(digest))
            if digest in linked or (record is not None and PINNED in record.holders):
                continue
            path = blobs.path_for(digest)
            if not _older_than(path, cutoff):
                continue
            size = path.stat().st_size if path.exists() else 0
            report.blobs_removed.append(str(digest))
            report.bytes_freed += size
            if not dry_run:
                blobs.delete_sync(digest)
                index.remove(str(digest))
        if not dry_run:
            # Blobs still on disk but no longer linked locally stop counting as local.
            local_now = {str(d) for d in linked}
            for key, record in list(index.items()):
                if LOCAL in record.holders and key not in local_now:
                    index.remove_holder(key, LOCAL)
            _record_stats(root, "gc_runs", 1)
            _record_stats(root, "gc_bytes_freed", report.bytes_freed)
    finally:
        index.close()
    return report


def _collect_repository(
    repos: RepoStore, blobs: BlobStore, repo: str, cutoff: float, report: GcReport, dry_run: bool
) -> None:
    manifests: dict[Digest, tuple[str, bytes]] = {}
    for digest in repos.linked_manifests(repo):
        link = repos.manifest_link(repo, digest)
        body = blobs.path_for(digest)
        if link is None or not body.exists():
            continue
        manifests[digest] = (link.media_type, body.read_bytes())
    parsed = {}
    for digest, (media_type, body) in manifests.items():
        try:
            parsed[digest] = parse_manifest(body, media_type)
        except RegistryError:
            continue
    kept: set[Digest] = set()
    frontier = [link.digest for tag in repos.tags(repo) if (link := repos.tag(repo, tag)) is not None]
    # Young manifests stay whatever points at them: a push may tag them in a moment.
    frontier += [d for d in manifests if not _older_than(repos.root / repo / "_manifests" / d.algorithm / d.hex, cutoff)]
    changed = True
    while changed:
        while frontier:
            digest = frontier.pop()
            if digest in kept:
                continue
            kept.add(digest)
            if digest in parsed:
                frontier.extend(child.digest for child in parsed[digest].manifests)
        changed = False
        for digest, manifest in parsed.items():
            if digest not in kept and manifest.subject is not None and manifest.subject.digest in kept:
                frontier.append(digest)
                changed = True
    referenced: set[Digest] = set()
    for digest in kept:
        if digest in parsed:
            referenced.update(blob.digest for blob in parsed[digest].blobs)
    for digest in manifests:
        if digest in kept:
            continue
        report.manifests_removed.append(f"{repo}@{digest}")
        if not dry_run:
            subject = parsed[digest].subject if digest in parsed else None
            if subject is not None:
                repos.remove_referrer(repo, subject.digest, digest)
            repos.unlink_manifest(repo, digest)
    for digest in repos.linked_blobs(repo):
        link_path = repos.root / repo / "_layers" / digest.algorithm / digest.hex
        if digest in referenced or not _older_than(link_path, cutoff):
            continue
        report.links_removed.append(f"{repo}@{digest}")
        if not dry_run:
            repos.unlink_blob(repo, digest)


def report_json(report: VerifyReport | GcReport) -> str:
    return json.dumps(asdict(report), indent=2)
