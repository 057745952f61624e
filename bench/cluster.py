"""`python -m bench.cluster`: cold clients spread over three nodes, the mirror's cluster against three
distribution proxies, on one upstream (the distribution registry) in the same run.

The mirror's three nodes share one Redis (`cluster:` with `advertise` and `secret`) and keep their own
disks: one node downloads, the others stream from it. The three distribution proxies know nothing of one
another (that is how distribution's proxy cache is run: one cache per instance), and each of them makes
one upstream GET per client that misses. What is compared: upstream blob GETs and bytes, and the wall
time until every client has the whole blob. Shared storage (S3) is not in this run: it is not built yet.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.run import _curl, _upstream_gets
from bench.seed import seed_big_image
from tests.support.distribution import DistributionRegistry
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer

SECRET = "bench-cluster-secret-0123456789"


class MirrorCluster:
    name = "mirror"

    def __init__(self, upstream_url: str, redis_url: str, nodes: int) -> None:
        self.upstream_url, self.redis_url, self.count = upstream_url, redis_url, nodes
        self.nodes: list[MirrorProcess] = []
        self.data = Path(tempfile.mkdtemp(prefix="bench-cluster-"))

    def start(self) -> None:
        prefix = f"b{uuid.uuid4().hex[:10]}"  # a fresh cluster: nothing of the last round in Redis
        self.nodes = []
        for index in range(self.count):
            port = free_port()
            config = {
                "listen": f"127.0.0.1:{port}",
                "storage": {"path": str(self.data / f"node{index}" / "data")},
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

    def __init__(self, upstream_url: str, nodes: int) -> None:
        self.upstream_url, self.count = upstream_url, nodes
        self.nodes: list[DistributionRegistry] = []

    def start(self) -> None:
        self.nodes = [DistributionRegistry.proxy_of(self.upstream_url).start() for _ in range(self.count)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()


def cold_round(side: MirrorCluster | PeerProxies, upstream: DistributionRegistry, repo: str, digest: str,
               size: int, clients: int) -> dict[str, float]:
    side.start()
    try:
        log_before = len(upstream.log_text(tail=None))
        outcomes: list[dict[str, float]] = []
        lock = threading.Lock()
        urls = side.urls

        def one(index: int) -> None:
            outcome = _curl(f"{urls[index % len(urls)]}/v2/{repo}/blobs/{digest}")
            with lock:
                outcomes.append(outcome)

        started = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        gets, upstream_bytes = _upstream_gets(upstream.log_text(tail=None)[log_before:], digest)
        bad = sum(1 for o in outcomes if o["status"] != 200 or o["size"] != size)
        ttfb = sorted(o["ttfb"] for o in outcomes)
        return {"wall": wall, "gets": gets, "bytes": upstream_bytes, "bad": bad, "ttfb_max": ttfb[-1]}
    finally:
        side.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blob-mb", type=int, default=50)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-work-"))
    upstream = DistributionRegistry.open().start()
    redis = RedisServer().start()
    try:
        image = seed_big_image(upstream.url, work, args.blob_mb)
        sides: list[MirrorCluster | PeerProxies] = [MirrorCluster(upstream.url, redis.url, args.nodes),
                                                    PeerProxies(upstream.url, args.nodes)]
        print(f"{args.clients} cold clients over {args.nodes} nodes, one {args.blob_mb} MB blob")
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
    finally:
        redis.stop()
        upstream.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
