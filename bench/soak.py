"""A small soak of the bounded cache: many clients, a hot set, large layers, one-time pulls, pushes.

    python -m bench.soak                                  # this checkout
    python -m bench.soak --checkout /tmp/mirror-main      # another version (git archive main | tar -x -C ...)

The mirror is a real process with `storage.max_size` well below what the clients pull; its upstream is the
fake upstream (tests/fake_upstream.py) served from a thread of this process on 127.0.0.1. Clients:
- pull one of 12 "popular" images (Zipf popularity) that all share one 1 MiB base layer;
- pull one of 3 "large" images (a 12 MiB layer each), reading slowly, so large blobs are in use a while;
- pull an image nobody pulled before (a one-time scan of new content);
- push a small image to a local repository.
Reported: hit ratio (client blob GETs answered without an upstream GET of their own), upstream re-fills
(blob GETs upstream beyond the first per digest), how often the shared base layer was fetched, and the
peak of cached bytes on disk (and with temp files) against the bound, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.checkout import THIS_CHECKOUT, CheckoutMirror
from tests.cache_helpers import Image, ThreadedServer, add_to_upstream, make_image
from tests.fake_upstream import OCI_MANIFEST, FakeUpstream, digest_of, upstream_config

MiB = 1 << 20


@dataclass
class Workload:
    seed: int = 7
    max_size: int = 48 * MiB
    clients: int = 40
    seconds: float = 45.0
    popular: list[Image] = field(default_factory=list)
    large: list[Image] = field(default_factory=list)
    unique: list[Image] = field(default_factory=list)
    base: bytes = b""

    def build(self, fake: FakeUpstream) -> None:
        rng = random.Random(self.seed)
        self.base = rng.randbytes(1 * MiB)
        self.popular = [make_image(f"library/app{i}", "1", [self.base, rng.randbytes(3 * MiB // 2)]) for i in range(12)]
        self.large = [make_image(f"library/big{i}", "1", [rng.randbytes(16 * MiB)]) for i in range(4)]
        self.unique = [make_image(f"library/once{i}", "1", [rng.randbytes(1 * MiB)]) for i in range(200)]
        for image in (*self.popular, *self.large, *self.unique):
            add_to_upstream(fake, image)


@dataclass
class Tally:
    blob_gets: int = 0
    errors: int = 0
    pulls: int = 0
    pushes: int = 0
    seconds_by_kind: dict[str, float] = field(default_factory=dict)
    pulls_by_kind: dict[str, int] = field(default_factory=dict)
    local_digests: set[str] = field(default_factory=set)
    peak_cached: int = 0
    peak_with_temp: int = 0


def zipf_pick(rng: random.Random, items: list[Image]) -> Image:
    weights = [1 / (rank + 1) for rank in range(len(items))]
    return rng.choices(items, weights)[0]


async def pull(session: aiohttp.ClientSession, url: str, image: Image, tally: Tally, *, slow: bool) -> None:
    async with session.get(f"{url}/v2/{image.repo}/manifests/{image.tag}", headers={"Accept": OCI_MANIFEST}) as r:
        if r.status != 200:
            tally.errors += 1
            return
        await r.read()
    for blob in (image.config, *image.layers):
        tally.blob_gets += 1
        hasher = hashlib.sha256()
        async with session.get(f"{url}/v2/{image.repo}/blobs/{digest_of(blob)}") as r:
            if r.status != 200:
                tally.errors += 1
                continue
            async for chunk in r.content.iter_chunked(256 << 10):
                hasher.update(chunk)
                if slow:
                    await asyncio.sleep(0.008)  # ~30 MB/s: a large layer stays in use for a while
        if f"sha256:{hasher.hexdigest()}" != digest_of(blob):
            tally.errors += 1
    tally.pulls += 1


async def push(session: aiohttp.ClientSession, url: str, rng: random.Random, n: int, tally: Tally) -> None:
    image = make_image(f"local/pushed{n % 20}", f"v{n}", [rng.randbytes(512 << 10)])
    for blob in (image.config, *image.layers):
        async with session.post(f"{url}/v2/{image.repo}/blobs/uploads/", params={"digest": digest_of(blob)},
                                data=blob) as r:
            if r.status != 201:
                tally.errors += 1
                return
    async with session.put(f"{url}/v2/{image.repo}/manifests/{image.tag}", data=image.manifest,
                           headers={"Content-Type": OCI_MANIFEST}) as r:
        if r.status != 201:
            tally.errors += 1
            return
    tally.local_digests.update(image.all_digests)
    tally.pushes += 1


async def clients(url: str, work: Workload, tally: Tally) -> None:
    deadline = time.monotonic() + work.seconds
    next_unique = iter(work.unique)
    pushes = iter(range(1 << 30))

    async def client(number: int) -> None:
        rng = random.Random(work.seed * 1000 + number)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            while time.monotonic() < deadline:
                roll = rng.random()
                began = time.monotonic()
                kind = "popular" if roll < 0.70 else "large" if roll < 0.85 else "once" if roll < 0.97 else "push"
                try:
                    if kind == "popular":
                        await pull(session, url, zipf_pick(rng, work.popular), tally, slow=False)
                    elif kind == "large":
                        await pull(session, url, zipf_pick(rng, work.large), tally, slow=True)
                    elif kind == "once":
                        image = next(next_unique, None)
                        await pull(session, url, image or zipf_pick(rng, work.popular), tally, slow=False)
                    else:
                        await push(session, url, rng, next(pushes), tally)
                except (aiohttp.ClientError, TimeoutError):
                    tally.errors += 1
                tally.pulls_by_kind[kind] = tally.pulls_by_kind.get(kind, 0) + 1
                tally.seconds_by_kind[kind] = tally.seconds_by_kind.get(kind, 0.0) + time.monotonic() - began

    await asyncio.gather(*(client(i) for i in range(work.clients)))


def sample_store(data: Path, tally: Tally, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        cached = temp = 0
        for path in (data / "blobs").glob("*/*/*"):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if f"{path.parent.parent.name}:{path.name}" not in tally.local_digests:
                cached += size
        for path in (data / "tmp").glob("*"):
            try:
                temp += path.stat().st_size
            except FileNotFoundError:
                continue
        tally.peak_cached = max(tally.peak_cached, cached)
        tally.peak_with_temp = max(tally.peak_with_temp, cached + temp)


def run(checkout: Path, work: Workload) -> dict[str, Any]:
    fake = FakeUpstream()
    work.build(fake)
    upstream = ThreadedServer(fake.app()).start()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    data = workdir / "data"
    mirror = CheckoutMirror(checkout, {
        "storage": {"path": str(data), "max_size": work.max_size},
        "upstreams": [upstream_config(upstream.url, library_prefix=True, tag_ttl="1h")],
        "local": {"repositories": ["local/**"]},
    }, workdir)
    tally = Tally()
    stop = threading.Event()
    try:
        mirror.start()
        sampler = threading.Thread(target=sample_store, args=(data, tally, stop), daemon=True)
        sampler.start()
        started = time.monotonic()
        asyncio.run(clients(mirror.url, work, tally))
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join(5)
    finally:
        stop.set()
        mirror.stop()
        upstream.stop()
    blob_digests = set(fake.blobs)
    fetches = {d: n for (method, path), n in fake.requests.items() if method == "GET"
               for d in [path.rsplit("/", 1)[-1]] if d in blob_digests}
    upstream_gets = sum(fetches.values())
    return {
        "checkout": str(checkout),
        "seconds": round(elapsed, 1),
        "clients": work.clients,
        "pulls": tally.pulls,
        "pushes": tally.pushes,
        "client_blob_gets": tally.blob_gets,
        "errors": tally.errors,
        "upstream_blob_gets": upstream_gets,
        "hit_ratio": round(1 - upstream_gets / tally.blob_gets, 4) if tally.blob_gets else None,
        "refills": sum(n - 1 for n in fetches.values() if n > 1),
        "refills_by_kind": {
            kind: sum(fetches.get(d, 0) - 1 for d in {d for image in images for d in image.blob_digests}
                      if fetches.get(d, 0) > 1)
            for kind, images in (("popular", work.popular), ("large", work.large), ("once", work.unique))
        },
        "base_layer_fetches": fetches.get(digest_of(work.base), 0),
        "max_size": work.max_size,
        "peak_cached_vs_bound": round(tally.peak_cached / work.max_size, 3),
        "peak_with_temp_vs_bound": round(tally.peak_with_temp / work.max_size, 3),
        "mean_seconds_by_kind": {k: round(tally.seconds_by_kind[k] / n, 3) for k, n in tally.pulls_by_kind.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, action="append",
                        help="checkout(s) to run, in order (default: this one)")
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--clients", type=int, default=40)
    args = parser.parse_args()
    results = []
    for checkout in args.checkout or [THIS_CHECKOUT]:
        result = run(checkout, Workload(seconds=args.seconds, clients=args.clients))
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"{'checkout':40} {'hit ratio':>9} {'re-fills':>8} {'base fetched':>12} {'peak/bound':>10} "
          f"{'+temp':>6} {'errors':>6}")
    for r in results:
        print(f"{r['checkout'][-40:]:40} {r['hit_ratio']:>9} {r['refills']:>8} {r['base_layer_fetches']:>12} "
              f"{r['peak_cached_vs_bound']:>10} {r['peak_with_temp_vs_bound']:>6} {r['errors']:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
