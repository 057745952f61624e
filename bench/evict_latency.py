"""Latency of warm blob requests while eviction and `mirror gc` run, and while the index database is held.

    python -m bench.evict_latency --checkout /tmp/mirror-main --checkout .

A mirror process (127.0.0.1) with a small `storage.max_size` over the fake upstream. One prober thread
sends HEAD (and every fourth time GET) for blobs already cached, on a keep-alive connection, and records
each latency. First quietly; then while six clients pull blobs nobody pulled before (every fill evicts),
`mirror gc` runs in a loop, and another process holds the index database's write lock for 2 s out of
every 3 (what a long gc transaction, a backup or a slow disk does to SQLite). Printed: p50/p99/max of
warm HEADs and GETs, quiet and loaded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.checkout import THIS_CHECKOUT, CheckoutMirror
from tests.cache_helpers import ThreadedServer
from tests.fake_upstream import FakeUpstream, upstream_config

KiB = 1 << 10
MiB = 1 << 20


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.5) * 1000, 2),
        "p99_ms": round(percentile(values, 0.99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2) if values else float("nan"),
        "mean_ms": round(statistics.fmean(values) * 1000, 2) if values else float("nan"),
    }


class Prober(threading.Thread):
    def __init__(self, port: int, warm: list[str]) -> None:
        super().__init__(daemon=True)
        self.port, self.warm = port, warm
        self.stop = threading.Event()
        self.heads: list[float] = []
        self.gets: list[float] = []
        self.errors = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        n = 0
        while not self.stop.is_set():
            digest = self.warm[n % len(self.warm)]
            method = "GET" if n % 4 == 3 else "HEAD"
            began = time.perf_counter()
            try:
                conn.request(method, f"/v2/library/warm/blobs/{digest}")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.errors += 1
            except (OSError, http.client.HTTPException):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                continue
            (self.gets if method == "GET" else self.heads).append(time.perf_counter() - began)
            n += 1
            time.sleep(0.002)
        conn.close()


def missing_pulls(port: int, digests: list[str], stop: threading.Event, counter: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while not stop.is_set() and digests:
        digest = digests.pop()
        try:
            conn.request("GET", f"/v2/library/cold/blobs/{digest}")
            conn.getresponse().read()
            counter[0] += 1
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)


def gc_loop(checkout: Path, config: Path, stop: threading.Event, runs: list[float]) -> None:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(checkout)
    while not stop.is_set():
        began = time.monotonic()
        subprocess.run([sys.executable, "-m", "mirror", "gc", "--config", str(config), "--grace", "1h"],
                       cwd=checkout, env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
        runs.append(time.monotonic() - began)


def hold_database(index_dir: Path, stop: threading.Event, holds: list[int]) -> None:
    """Another process's long write transaction on the index (here: a thread with its own connection)."""
    names = ("blobs.sqlite3", "cache.db")
    path = next((index_dir / n for n in names if (index_dir / n).exists()), None)
    if path is None:
        return
    db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
    while not stop.wait(1.0):
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            continue
        stop.wait(2.0)
        db.execute("COMMIT")
        holds[0] += 1
    db.close()


def run(checkout: Path, *, quiet_seconds: float, load_seconds: float) -> dict[str, Any]:
    rng = random.Random(3)
    fake = FakeUpstream()
    warm = [fake.add_blob(rng.randbytes(64 * KiB)) for _ in range(20)]
    cold = [fake.add_blob(rng.randbytes(256 * KiB)) for _ in range(2000)]
    upstream = ThreadedServer(fake.app()).start()
    workdir = Path(tempfile.mkdtemp(prefix="evict-latency-"))
    data = workdir / "data"
    mirror = CheckoutMirror(checkout, {
        "storage": {"path": str(data), "max_size": 8 * MiB},
        "upstreams": [upstream_config(upstream.url, library_prefix=True, tag_ttl="1h")],
        "local": {"repositories": ["local/**"]},
    }, workdir)
    stop = threading.Event()
    try:
        mirror.start()
        for digest in warm:  # cached, then read again (and again by the prober's GETs)
            for _ in range(3):
                conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=30)
                conn.request("GET", f"/v2/library/warm/blobs/{digest}")
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
                conn.close()
        time.sleep(2.5)  # the accesses are flushed
        quiet = Prober(mirror.port, warm)
        quiet.start()
        time.sleep(quiet_seconds)
        quiet.stop.set()
        quiet.join()

        loaded = Prober(mirror.port, warm)
        filled, gc_runs, holds = [0], [], [0]
        workers = [threading.Thread(target=missing_pulls, args=(mirror.port, cold, stop, filled), daemon=True)
                   for _ in range(6)]
        workers.append(threading.Thread(target=gc_loop, args=(checkout, mirror.config_path, stop, gc_runs),
                                        daemon=True))
        workers.append(threading.Thread(target=hold_database, args=(data / "index", stop, holds), daemon=True))
        for worker in workers:
            worker.start()
        loaded.start()
        time.sleep(load_seconds)
        loaded.stop.set()
        stop.set()
        loaded.join()
        for worker in workers:
            worker.join(60)
        evictions = mirror.metric("mirror_evictions_total")
    finally:
        stop.set()
        mirror.stop()
        upstream.stop()
    return {
        "checkout": str(checkout),
        "quiet_head": summary(quiet.heads),
        "quiet_get": summary(quiet.gets),
        "loaded_head": summary(loaded.heads),
        "loaded_get": summary(loaded.gets),
        "probe_errors": quiet.errors + loaded.errors,
        "fills": filled[0],
        "evictions": evictions,
        "gc_runs": len(gc_runs),
        "database_holds_2s": holds[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, action="append", help="checkout(s) to run (default: this one)")
    parser.add_argument("--quiet-seconds", type=float, default=6.0)
    parser.add_argument("--load-seconds", type=float, default=20.0)
    args = parser.parse_args()
    results = []
    for checkout in args.checkout or [THIS_CHECKOUT]:
        result = run(checkout, quiet_seconds=args.quiet_seconds, load_seconds=args.load_seconds)
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"{'checkout':32} {'HEAD p99 quiet':>14} {'HEAD p99 load':>13} {'HEAD max load':>13} "
          f"{'GET p99 load':>12} {'GET max load':>12} {'fills':>6} {'gc runs':>7}")
    for r in results:
        print(f"{r['checkout'][-32:]:32} {r['quiet_head']['p99_ms']:>12}ms {r['loaded_head']['p99_ms']:>11}ms "
              f"{r['loaded_head']['max_ms']:>11}ms {r['loaded_get']['p99_ms']:>10}ms {r['loaded_get']['max_ms']:>10}ms "
              f"{r['fills']:>6} {r['gc_runs']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
