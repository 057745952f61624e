"""One registry-to-registry copy run as its own process, for tests that must kill a sync (SIGKILL) halfway.

    python -m tests.support.sync_once --source URL --dest URL --dest-creds USER:PASS --journal DIR \\
        [--source-creds USER:PASS] [--pace SECONDS] [--chunk-bytes N] SRC_REPO:TAG=DEST_REPO ...

It drives the copier directly (source and destination RemoteRegistry, the upload journal in DIR), the
same pieces a replication rule runs. `--pace` waits that long before every blob GET at the source (through
the before_get hook), so a test can stop it at a point of its choosing. Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.oci.manifest import Descriptor
from mirror.replication.copier import Copier, CopyOptions, CopyStats
from mirror.replication.remote import RemoteSpec, UploadJournal, open_remote
from mirror.storage.interface import Manifest, ManifestInfo, Registry


def _creds(value: str | None) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    user, _, password = value.partition(":")
    return user, password


PACE_PIECE_BYTES = 128 << 10


class PacedSource(Registry):
    """A source read slowly: `pace` seconds before every piece of a blob."""

    def __init__(self, inner: Registry, pace: float) -> None:
        self.inner, self.pace = inner, pace

    async def stat_manifest(self, repo: str, reference: str) -> ManifestInfo:
        return await self.inner.stat_manifest(repo, reference)

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        return await self.inner.get_manifest(repo, reference)

    async def list_tags(self, repo: str) -> list[str]:
        return await self.inner.list_tags(repo)

    async def referrers(self, repo: str, subject: Digest) -> list[Descriptor]:
        return await self.inner.referrers(repo, subject)

    async def read_blob(self, repo: str, digest: Digest, *, start: int = 0) -> AsyncIterator[bytes]:
        async for piece in self.inner.read_blob(repo, digest, start=start):
            for offset in range(0, len(piece), PACE_PIECE_BYTES):
                await asyncio.sleep(self.pace)
                yield piece[offset : offset + PACE_PIECE_BYTES]


async def run(args: argparse.Namespace) -> int:
    source_user, source_password = _creds(args.source_creds)
    dest_user, dest_password = _creds(args.dest_creds)
    metrics = Metrics()
    totals = CopyStats()
    async with open_remote(RemoteSpec(args.source, source_user, source_password), metrics, push=False) as remote, \
            open_remote(RemoteSpec(args.dest, dest_user, dest_password), metrics,
                        journal=UploadJournal(Path(args.journal)), chunk_bytes=args.chunk_bytes) as dest:
        source: Registry = PacedSource(remote, args.pace) if args.pace else remote
        copier = Copier(CopyOptions(referrers=args.referrers, blob_concurrency=args.concurrency))
        for image in args.images:
            source_ref, _, dest_repo = image.partition("=")
            source_repo, _, tag = source_ref.rpartition(":")
            outcome = await copier.copy(source, source_repo, tag, dest, dest_repo or source_repo, dest_tag=tag)
            totals.add(outcome.stats)
            print(json.dumps({"image": image, "digest": str(outcome.dest_digest), "unchanged": outcome.unchanged}),
                  flush=True)
    print(json.dumps({"summary": {name: getattr(totals, name) for name in totals.__slots__}}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="sync_once")
    parser.add_argument("--source", required=True)
    parser.add_argument("--source-creds")
    parser.add_argument("--dest", required=True)
    parser.add_argument("--dest-creds")
    parser.add_argument("--journal", required=True)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--chunk-bytes", type=int, default=16 << 20)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--referrers", action="store_true")
    parser.add_argument("images", nargs="+")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
