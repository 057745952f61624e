"""One mirror-side replication run for bench/replication.py, as its own process (start-up included, as for
`skopeo sync`): list every tag of each repository at the source, copy each to the destination.

    python3 -m bench.replication_worker --source URL --dest URL [--prefix mirror] REPO...

Imports only what a `mirror sync` would (no test harness), and prints one JSON line of copy statistics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict

from mirror.metrics import Metrics
from mirror.replication.copier import Copier, CopyOptions, CopyStats
from mirror.replication.remote import RemoteRegistry, RemoteSpec, open_remote

IMAGE_CONCURRENCY = 16  # images in flight: a rerun is HEADs only, cheap to overlap


async def _worker(source_url: str, dest_url: str, dest_prefix: str, repos: list[str]) -> dict[str, object]:
    totals = CopyStats()
    images = 0
    async with open_remote(RemoteSpec(source_url), Metrics(), push=False) as source, \
            open_remote(RemoteSpec(dest_url), Metrics()) as dest:
        copier = Copier(CopyOptions(blob_concurrency=4))
        slots = asyncio.Semaphore(IMAGE_CONCURRENCY)

        async def copy(src: RemoteRegistry, repo: str, tag: str) -> None:
            nonlocal images
            async with slots:
                outcome = await copier.copy(src, repo, tag, dest, f"{dest_prefix}/{repo}", dest_tag=tag)
            totals.add(outcome.stats)
            images += 1

        tag_lists = await asyncio.gather(*(source.list_tags(repo) for repo in repos))
        jobs = [(repo, tag) for repo, tags in zip(repos, tag_lists, strict=True) for tag in tags]
        await asyncio.gather(*(copy(source, repo, tag) for repo, tag in jobs))
    return {"images": images, **asdict(totals)}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.replication_worker")
    parser.add_argument("--source", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--prefix", default="mirror")
    parser.add_argument("repos", nargs="+")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = asyncio.run(_worker(args.source, args.dest, args.prefix, args.repos))
    # Split from outside's wall time: how much of it is interpreter and import start-up.
    result["inside_s"] = round(time.perf_counter() - started, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
