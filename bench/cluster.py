"""`python -m bench.cluster`: cold clients spread over three nodes, the mirror's cluster against three
distribution proxies, on one upstream (the distribution registry) in the same run; then warm throughput
with 1, 2 and 3 mirror nodes (a scaling ratio on this machine).

The mirror's three nodes share one Redis (`cluster:` with `advertise` and `secret`): one node downloads,
the others stream from it. The three distribution proxies know nothing of one another (that is how
distribution's proxy cache is run: one cache per instance), and each of them makes one upstream GET per
client that misses. What is compared: upstream blob GETs and bytes, and the wall time until every client
has the whole blob. `--storage s3` puts both sides on one bucket of a real Ceph RGW started for the run
(the mirror's nodes: `storage.backend: s3`, the shared tier; the proxies: distribution's s3 driver, all
three on the same bucket); the default keeps each node's storage on its own disk.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench.run import _curl, _upstream_gets
from bench.seed import seed_big_image
from tests.support.distribution import DistributionRegistry
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.rgw import RadosGateway, new_bucket

SECRET = "bench-cluster-secret-0123456789"


class BucketMaker:
    """A fresh bucket on the run's RGW per call (as `storage.s3` config)."""

    def __init__(self, gateway: RadosGateway) -> None:
        self.gateway = gateway

    def __call__(self) -> dict[str, Any]:
        return asyncio.run(new_bucket(self.gateway))


class MirrorCluster:
    name = "mirror"

    def __init__(self, upstream_url: str, redis_url: str, nodes: int, bucket: BucketMaker | None = None) -> None:
        self.upstream_url, self.redis_url, self.count = upstream_url, redis_url, nodes
        self.bucket = bucket
        self.nodes: list[MirrorProcess] = []
        self.data = Path(tempfile.mkdtemp(prefix="bench-cluster-"))

    def start(self) -> None:
        s3 = self.bucket() if self.bucket is not None else None  # a fresh bucket: a cold start for both
        prefix = f"b{uuid.uuid4().hex[:10]}"  # a fresh cluster: nothing of the last round in Redis
        self.nodes = []
        for index in range(self.count):
            port = free_port()
            config = {
                "listen": f"127.0.0.1:{port}",
                "storage": {"path": str(self.data / f"node{index}" / "data"),
                            **({"backend": "s3", "s3": s3} if s3 is not None else {})},
                "upstreams": [{"name": "docker.io", "url": self.upstream_url, "default": True, "prefetch": False}],
                "cluster": {"redis": self.redis_url, "prefix": prefix, "advertise": f"http://127.0.0.1:{port}",
                            "secret": SECRET},
            }
            self.nodes.append(MirrorProcess(config, workdir=self.data / f"node{index}").start())

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir()


class PeerProxies:
    name = "peer"

    def __init__(self, upstream_url: str, nodes: int, bucket: BucketMaker | None = None) -> None:
        self.upstream_url, self.count = upstream_url, nodes
        self.bucket = bucket
        self.nodes: list[DistributionRegistry] = []

    def start(self) -> None:
        s3 = self.bucket() if self.bucket is not None else None  # one bucket for the three proxies
        self.nodes = [DistributionRegistry.proxy_of(self.upstream_url, s3=s3).start() for _ in range(self.count)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()


def concurrent_gets(urls: list[str], path: str, clients: int) -> tuple[list[dict[str, float]], float]:
    """`clients` curl GETs of `path` at once, spread round-robin over `urls` (following redirects); their
    outcomes and the wall time until the last one ended."""
    outcomes: list[dict[str, float]] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        outcome = _curl(f"{urls[index % len(urls)]}{path}", follow=True)
        with lock:
            outcomes.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - started


def cold_round(side: MirrorCluster | PeerProxies, upstream: DistributionRegistry, repo: str, digest: str,
               size: int, clients: int) -> dict[str, float]:
    side.start()
    try:
        log_before = len(upstream.log_text(tail=None))
        outcomes, wall = concurrent_gets(side.urls, f"/v2/{repo}/blobs/{digest}", clients)
        gets, upstream_bytes = _upstream_gets(upstream.log_text(tail=None)[log_before:], digest)
        failed = [o for o in outcomes if o["status"] != 200 or o["size"] != size]
        if failed:
            kinds = Counter(f"{o['status']:.0f}" if o["status"] != 200 else f"200 cut at {o['size']:.0f} B"
                            for o in failed)
            print(f"      {side.name}: {len(failed)} clients failed: {dict(kinds)}")
        ttfb = sorted(o["ttfb"] for o in outcomes)
        return {"wall": wall, "gets": gets, "bytes": upstream_bytes, "bad": len(failed), "ttfb_max": ttfb[-1]}
    finally:
        side.stop()


def warm_round(side: MirrorCluster, repo: str, digest: str, size: int, clients: int) -> dict[str, float]:
    """Aggregate warm throughput: the blob is on every node's disk, then `clients` GETs spread over the
    nodes at once, each `curl` a process of its own (as build machines are)."""
    side.start()
    try:
        for url in side.urls:  # warm every node (the first one fills, the others stream and keep it)
            assert _curl(f"{url}/v2/{repo}/blobs/{digest}")["status"] == 200
        outcomes, wall = concurrent_gets(side.urls, f"/v2/{repo}/blobs/{digest}", clients)
        bad = sum(1 for o in outcomes if o["status"] != 200 or o["size"] != size)
        return {"wall": wall, "mbps": clients * size / wall / 1e6, "bad": bad}
    finally:
        side.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blob-mb", type=int, default=50)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--storage", choices=["disk", "s3"], default="disk",
                        help="s3: both sides on one bucket of a Ceph RGW started for the run")
    parser.add_argument("--warm-clients", type=int, default=24, help="GETs at once in the warm scaling rounds")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-work-"))
    upstream = DistributionRegistry.open().start()
    redis = RedisServer().start()
    gateway = RadosGateway().start() if args.storage == "s3" else None
    try:
        image = seed_big_image(upstream.url, work, args.blob_mb)
        bucket = BucketMaker(gateway) if gateway is not None else None
        sides: list[MirrorCluster | PeerProxies] = [MirrorCluster(upstream.url, redis.url, args.nodes, bucket),
                                                    PeerProxies(upstream.url, args.nodes, bucket)]
        print(f"{args.clients} cold clients over {args.nodes} nodes, one {args.blob_mb} MB blob, "
              f"storage: {'one S3 bucket (Ceph RGW)' if bucket else 'a disk per node'}")
        print(f"{'round':>5} {'side':>6} {'wall s':>8} {'GETs':>5} {'upstream MB':>12} {'max ttfb s':>11} {'bad':>4}")
        results: dict[str, list[dict[str, float]]] = {"mirror": [], "peer": []}
        for round_ in range(1, args.rounds + 1):
            for side in sides:  # alternate: drift on a noisy machine hits both
                r = cold_round(side, upstream, image.repo, image.blob_digest, image.blob_size, args.clients)
                results[side.name].append(r)
                print(f"{round_:>5} {side.name:>6} {r['wall']:>8.2f} {r['gets']:>5.0f} {r['bytes'] / 1e6:>12.1f} "
                      f"{r['ttfb_max']:>11.2f} {r['bad']:>4.0f}", flush=True)
        m = min(r["wall"] for r in results["mirror"])
        p = min(r["wall"] for r in results["peer"])
        print(f"wall time ratio mirror/peer (best rounds): {m / p:.2f}")

        print(f"\nwarm: {args.warm_clients} GETs at once spread over 1..{args.nodes} mirror nodes")
        print(f"{'nodes':>5} {'wall s':>8} {'MB/s':>8} {'bad':>4}")
        best: dict[int, float] = {}
        for count in range(1, args.nodes + 1):
            for _ in range(args.rounds):
                w = warm_round(MirrorCluster(upstream.url, redis.url, count, bucket), image.repo,
                               image.blob_digest, image.blob_size, args.warm_clients)
                best[count] = max(best.get(count, 0.0), w["mbps"])
                print(f"{count:>5} {w['wall']:>8.2f} {w['mbps']:>8.0f} {w['bad']:>4.0f}", flush=True)
        print("warm scaling (best rounds): " + ", ".join(
            f"{count} nodes {best[count] / best[1]:.2f}x" for count in sorted(best)))
    finally:
        if gateway is not None:
            gateway.stop()
        redis.stop()
        upstream.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
