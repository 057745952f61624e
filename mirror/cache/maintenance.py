"""Offline-safe maintenance: `mirror verify` (re-hash, quarantine) and `mirror gc` (mark and sweep).

Both work on the data directory directly, so they run from the CLI while the server keeps serving:
blob files are only ever removed or renamed (never rewritten), the index is process-safe, and anything
younger than the grace period is left alone because a push may still be in flight.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mirror.cache.index import CACHED, LOCAL, PINNED, BlobIndex
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


def _record_stats(root: Path, increments: dict[str, int]) -> None:
    """Cumulative counters the server exposes as metrics (the CLI is another process). Two maintenance
    runs at once must not lose each other's counts: the read-modify-write holds a lock file."""
    path = root / STATS_FILE
    with open(root / (STATS_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            stats = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            stats = {}
        for key, increment in increments.items():
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
                inode = path.stat().st_ino
                actual, _size = hash_file(path, digest.algorithm)
            except FileNotFoundError:
                continue  # evicted or collected while we looked
            report.checked += 1
            if actual == digest.hex:
                continue
            quarantine.mkdir(exist_ok=True)
            target = quarantine / f"{digest.algorithm}-{digest.hex}-{int(time.time())}"
            try:
                # The server may have evicted the bad file meanwhile, or fetched a good copy in its place
                # (a new inode): only the file that was hashed goes to quarantine.
                if path.stat().st_ino != inode:
                    continue
                os.replace(path, target)
            except FileNotFoundError:
                continue
            index.remove(str(digest))
            report.quarantined.append(str(digest))
            log.warning("quarantined %s: its bytes hash to %s:%s", digest, digest.algorithm, actual)
        _record_stats(root, {"verify_runs": 1, "quarantined": len(report.quarantined)})
    finally:
        index.close()
    return report


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _all_links(root: Path, local: RepoStore) -> tuple[set[Digest], set[Digest]]:
    """Every digest linked by a local repository, and every digest linked by a cached one."""
    local_linked: set[Digest] = set()
    for repo in local.repositories():
        local_linked.update(local.linked_blobs(repo))
        local_linked.update(local.linked_manifests(repo))
    cache_linked: set[Digest] = set()
    cache_root = root / "cache"
    for upstream_dir in sorted(cache_root.iterdir()) if cache_root.is_dir() else []:
        if not upstream_dir.is_dir():
            continue
        cache_repos = RepoStore(upstream_dir)
        for repo in cache_repos.repositories():
            cache_linked.update(cache_repos.linked_blobs(repo))
            cache_linked.update(cache_repos.linked_manifests(repo))
    return local_linked, cache_linked


def gc(root: Path, *, dry_run: bool = False, grace_seconds: float = 3600.0) -> GcReport:
    """Mark and sweep for local repositories.

    Kept: manifests a tag points to, their children (indexes), manifests whose subject is kept
    (referrers), and every blob those reference. Removed: untagged manifests nothing keeps, repository
    links to blobs no kept manifest references, and blob files nothing links (local or cache) and
    nothing pins. Anything younger than `grace_seconds` stays: it may belong to a push in progress.
    Cached upstream content is the evictor's business and is never collected here.
    A dry run reports exactly what a real run would remove (links it would remove count as gone).
    """
    blobs = BlobStore(root)
    local = RepoStore(root / "repositories")
    index = BlobIndex(root / "index")
    report = GcReport(dry_run=dry_run)
    cutoff = time.time() - grace_seconds
    try:
        unlinked: set[tuple[str, Digest]] = set()  # (repo, digest) links removed (or, dry, to be removed)
        for repo in local.repositories():
            unlinked |= _collect_repository(local, blobs, repo, cutoff, report, dry_run)
        local_linked, cache_linked = _all_links(root, local)
        if dry_run:
            # What a real run would have unlinked by now no longer holds its blob.
            still = {d for repo in local.repositories()
                     for d in (*local.linked_blobs(repo), *local.linked_manifests(repo))
                     if (repo, d) not in unlinked}
            local_linked = still
        linked = local_linked | cache_linked
        for digest in blobs.iter_digests_sync():
            record = index.get(str(digest))
            if digest in linked or (record is not None and PINNED in record.holders):
                continue
            path = blobs.path_for(digest)
            # Checked last, right before removing: a push that reuses an old blob touches it first.
            if not _older_than(path, cutoff):
                continue
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            report.blobs_removed.append(str(digest))
            report.bytes_freed += size
            if not dry_run:
                blobs.delete_sync(digest)
                index.remove(str(digest))
        if not dry_run:
            # Blobs still on disk but no longer linked locally stop counting as local; those a cached
            # repository links become cached (evictable) rather than counting nowhere.
            local_now = {str(d) for d in local_linked}
            cached_now = {str(d) for d in cache_linked}
            repositories = local.repositories()
            for key, record in list(index.items()):
                if LOCAL in record.holders and key not in local_now:
                    # Looked at again right now: a push may have linked it since the scan, and a blob that
                    # lost `local` wrongly would be evictable, i.e. a pushed image could lose a layer.
                    digest = Digest.parse(key)
                    if any(local.has_blob(repo, digest) or local.manifest_link(repo, digest) is not None
                           for repo in repositories):
                        continue
                    if key in cached_now and CACHED not in record.holders:
                        index.add_holder(key, record.size, CACHED, record.last_access)
                    index.remove_holder(key, LOCAL)
            _record_stats(root, {"gc_runs": 1, "gc_bytes_freed": report.bytes_freed})
    finally:
        index.close()
    return report


def _load_manifests(repos: RepoStore, blobs: BlobStore, repo: str, digests: list[Digest]) -> dict[Digest, Any]:
    parsed: dict[Digest, Any] = {}
    for digest in digests:
        link = repos.manifest_link(repo, digest)
        body = blobs.path_for(digest)
        try:
            parsed[digest] = parse_manifest(body.read_bytes(), link.media_type) if link is not None else None
        except (FileNotFoundError, RegistryError):
            parsed[digest] = None
    return parsed


def _collect_repository(
    repos: RepoStore, blobs: BlobStore, repo: str, cutoff: float, report: GcReport, dry_run: bool
) -> set[tuple[str, Digest]]:
    manifest_digests = repos.linked_manifests(repo)
    loaded = _load_manifests(repos, blobs, repo, manifest_digests)
    parsed = {d: m for d, m in loaded.items() if m is not None}
    kept: set[Digest] = set()
    frontier = [link.digest for tag in repos.tags(repo) if (link := repos.tag(repo, tag)) is not None]
    # Young manifests stay whatever points at them: a push may tag them in a moment.
    frontier += [d for d in manifest_digests
                 if not _older_than(repos.root / repo / "_manifests" / d.algorithm / d.hex, cutoff)]
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
            referenced.update(blob.digest for blob in parsed[digest].references)
    removed: set[tuple[str, Digest]] = set()
    for digest in manifest_digests:
        if digest in kept:
            continue
        report.manifests_removed.append(f"{repo}@{digest}")
        removed.add((repo, digest))
        if not dry_run:
            subject = parsed[digest].subject if digest in parsed else None
            if subject is not None:
                repos.remove_referrer(repo, subject.digest, digest)
            repos.unlink_manifest(repo, digest)
    # Manifests pushed while we looked (young, so kept) may reuse old blob links: keep what they reference.
    # This narrows gc's one race with a push (see docs/behaviour.md) to the moment between here and unlink.
    new = [d for d in repos.linked_manifests(repo) if d not in loaded]
    pending = list(new)
    while pending:
        for digest, manifest in _load_manifests(repos, blobs, repo, pending).items():
            pending.remove(digest)
            if manifest is None:
                continue
            referenced.update(blob.digest for blob in manifest.references)
            pending.extend(c.digest for c in manifest.manifests if c.digest not in loaded and c.digest not in new)
            new.extend(c.digest for c in manifest.manifests)
    for digest in repos.linked_blobs(repo):
        link_path = repos.root / repo / "_layers" / digest.algorithm / digest.hex
        if digest in referenced or not _older_than(link_path, cutoff):
            continue
        report.links_removed.append(f"{repo}@{digest}")
        removed.add((repo, digest))
        if not dry_run:
            repos.unlink_blob(repo, digest)
    return removed


def report_json(report: VerifyReport | GcReport) -> str:
    return json.dumps(asdict(report), indent=2)
