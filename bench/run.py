"""`python -m bench`: the mirror against distribution's proxy mode, scenario by scenario, in alternation.

Prints a table of ratios (mirror relative to the peer measured in the same run), writes the numbers as
JSON and a plot of the ratios as PNG. These machines are noisy and small: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import blobload
from bench.seed import TEN_LAYERS, BigImage, seed_big_image, seed_runnable_image
from bench.servers import MirrorServer, PeerServer, Server, TlsDistribution, peak_rss_bytes
from bench.shaper import WAN, Profile, ShapingProxy
from tests.support.distribution import DistributionRegistry
from tests.support.dockerd import DockerDaemon
from tests.support.tls import make_private_ca

ACCEPT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Result:
    scenario: str
    metric: str
    unit: str
    mirror: float
    peer: float
    higher_is_better: bool
    target: float | None = None  # required ratio (mirror/peer when higher is better, else mirror/peer max)
    extra: dict[str, Any] = field(default_factory=dict)
    profile: str = "loopback"  # where the upstream was: bench/shaper.py's profile, or plain loopback

    @property
    def ratio(self) -> float:
        if self.peer == 0:
            return float("inf") if self.mirror else 1.0
        return self.mirror / self.peer

    @property
    def meets_target(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target


# -- measuring tools -----------------------------------------------------------------------------
_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def _wrk(
    url: str, *, threads: int, connections: int, seconds: float, headers: dict[str, str] | None = None
) -> dict[str, float]:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "30s"]
    for key, value in (headers or {}).items():
        argv += ["-H", f"{key}: {value}"]
    completed = subprocess.run(argv + [url], capture_output=True, text=True, timeout=seconds + 60)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed on {url}: {completed.stderr or completed.stdout}")
    output = completed.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", output)
    bytes_per_second = float(transfer.group(1)) * _UNITS[transfer.group(2)] if transfer else 0.0
    latency: dict[str, float] = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M):
        latency[pct] = float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses from {url}")
    return {"rps": rps, "bytes_per_second": bytes_per_second,
            "p50": latency.get("50", 0.0), "p99": latency.get("99", 0.0)}


def _curl(url: str, ca_file: Path | None = None, *, follow: bool = False) -> dict[str, float]:
    """One GET by a curl process of its own; `follow`: redirects too (distribution on S3 answers blob GETs
    with a 307 to the bucket, which Docker follows)."""
    fmt = "%{http_code} %{size_download} %{time_starttransfer} %{time_total} %{speed_download}"
    trust = ["--cacert", str(ca_file)] if ca_file else []
    redirects = ["-L"] if follow else []
    out = subprocess.run(["curl", "-s", *trust, *redirects, "-o", "/dev/null", "-w", fmt, url],
                         capture_output=True, text=True,
                         timeout=600, check=True).stdout.split()
    return {"status": float(out[0]), "size": float(out[1]), "ttfb": float(out[2]), "total": float(out[3]),
            "speed": float(out[4])}


class RssSampler:
    """Peak RSS of a process while a block runs (VmHWM after, checked against samples)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def peak(self) -> int:
        return peak_rss_bytes(self.pid)


def _upstream_gets(log: str, digest: str) -> tuple[int, int]:
    """Blob GETs and bytes the upstream served for `digest`, from distribution's access log."""
    count = total = 0
    for match in re.finditer(rf'"GET /v2/[^ ]*/blobs/{re.escape(digest)} HTTP/[\d.]+" (\d+) (\d+)', log):
        if match.group(1) in ("200", "206"):
            count += 1
            total += int(match.group(2))
    return count, total


# -- scenarios -----------------------------------------------------------------------------------
def warm_blob(servers: list[Server], image: BigImage, seconds: float, rounds: int) -> list[Result]:
    """Throughput of a cached blob, measured with a load generator that discards bodies in the kernel
    (bench/blobload.py: wrk's 8 KiB copy loop was the bottleneck at one client, not the servers). One wrk
    run per server is reported beside it, for comparison with that common tool."""
    results = []
    for connections in (1, 16):
        samples: dict[str, list[float]] = {s.name: [] for s in servers}
        for server in servers:
            _curl(f"{server.url}/v2/{image.repo}/blobs/{image.blob_digest}")  # make it warm
        for _ in range(rounds):
            for server in servers:  # alternate, so drift on a noisy machine hits both
                url = f"{server.url}/v2/{image.repo}/blobs/{image.blob_digest}"
                run = blobload.run(url, connections=connections, seconds=seconds)
                samples[server.name].append(run.bytes_per_second)
        wrk_mbps = {
            server.name: _wrk(f"{server.url}/v2/{image.repo}/blobs/{image.blob_digest}", threads=min(connections, 2),
                              connections=connections, seconds=seconds)["bytes_per_second"] / 1e6
            for server in servers
        }
        target = 1.2 if connections == 1 else 1.0
        results.append(Result("1 warm blob", f"{connections} client(s) throughput", "MB/s",
                              statistics.median(samples["mirror"]) / 1e6, statistics.median(samples["peer"]) / 1e6,
                              True, target,
                              {"samples_mirror_MBps": [round(v / 1e6) for v in samples["mirror"]],
                               "samples_peer_MBps": [round(v / 1e6) for v in samples["peer"]],
                               "wrk_mirror_MBps": wrk_mbps["mirror"], "wrk_peer_MBps": wrk_mbps["peer"]}))
    return results


def cold_many(servers: list[Server], upstream: DistributionRegistry, image: BigImage, clients: int,
              *, label: str = "2 cold blob, 20 clients", rss_label: str = "6 peak RSS during scenario 2",
              target: float | None = 0.5, profile: str = "loopback") -> list[Result]:
    measured: dict[str, dict[str, float]] = {}
    for server in servers:
        server.reset()
        log_before = len(upstream.log_text(tail=None))
        url = f"{server.url}/v2/{image.repo}/blobs/{image.blob_digest}"
        outcomes: list[dict[str, float]] = []
        lock = threading.Lock()

        def one() -> None:
            outcome = _curl(url)  # noqa: B023 - every thread is joined before the loop moves on
            with lock:  # noqa: B023 - as above
                outcomes.append(outcome)  # noqa: B023 - as above

        started = time.perf_counter()
        threads = [threading.Thread(target=one) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        bad = [o for o in outcomes if o["status"] != 200 or o["size"] != image.blob_size]
        gets, upstream_bytes = _upstream_gets(upstream.log_text(tail=None)[log_before:], image.blob_digest)
        measured[server.name] = {"wall": wall, "gets": gets, "bytes": upstream_bytes, "bad": len(bad),
                                 "rss": peak_rss_bytes(server.pid)}
    m, p = measured["mirror"], measured["peer"]
    extra = {"mirror_failed_clients": m["bad"], "peer_failed_clients": p["bad"]}
    return [
        Result(label, "wall time", "s", m["wall"], p["wall"], False, target, extra, profile),
        Result(label, "upstream blob GETs", "count", m["gets"], p["gets"], False, None,
               {"mirror_target": "exactly 1"}, profile),
        Result(label, "upstream bytes", "MB", m["bytes"] / 1e6, p["bytes"] / 1e6, False, None, {}, profile),
        Result(rss_label, "VmHWM", "MB", m["rss"] / 1e6, p["rss"] / 1e6, False, None,
               {"mirror_target": "< 100 MB"}, profile),
    ]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measured_curl(url: str, pids: dict[str, int], ca_file: Path | None = None) -> dict[str, float]:
    """_curl, plus the CPU seconds each process in `pids` and curl itself spent on the transfer."""
    before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    outcome = _curl(url, ca_file)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for name, pid in pids.items():
        outcome[f"cpu_{name}"] = _cpu_seconds(pid) - before[name]
    outcome["cpu_client"] = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return outcome


def cold_single(servers: list[Server], upstream: DistributionRegistry, image: BigImage, rounds: int,
                *, label: str = "3 cold single client", direct_url: str | None = None, ca_file: Path | None = None,
                ttfb_target: float | None = None, profile: str = "loopback") -> list[Result]:
    """One client misses: throughput and time to first byte, against pulling straight from the upstream
    (`direct_url`: the upstream as the servers reach it). CPU seconds per transfer are recorded too: on two
    shared cores they, not the network, set the pace on loopback."""
    assert upstream.proc is not None
    direct = direct_url or upstream.url
    samples: dict[str, list[dict[str, float]]] = {"mirror": [], "peer": [], "upstream": []}
    for _ in range(rounds):
        samples["upstream"].append(_measured_curl(f"{direct}/v2/{image.repo}/blobs/{image.blob_digest}",
                                                  {"upstream": upstream.proc.pid}, ca_file))
        for server in servers:
            server.reset()
            samples[server.name].append(_measured_curl(f"{server.url}/v2/{image.repo}/blobs/{image.blob_digest}",
                                                       {"upstream": upstream.proc.pid, "server": server.pid}))

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    def cpu_total(name: str) -> float:
        return statistics.median(sum(v for k, v in s.items() if k.startswith("cpu_")) for s in samples[name])

    direct_mbps = med("upstream", "speed") / 1e6
    return [
        Result(label, "throughput", "MB/s", med("mirror", "speed") / 1e6, med("peer", "speed") / 1e6,
               True, 1.0, {"direct_from_upstream_MBps": direct_mbps,
                           "mirror_vs_direct": med("mirror", "speed") / 1e6 / direct_mbps if direct_mbps else 0.0,
                           "samples_mirror_MBps": [round(s["speed"] / 1e6) for s in samples["mirror"]],
                           "samples_peer_MBps": [round(s["speed"] / 1e6) for s in samples["peer"]]}, profile),
        Result(label, "time to first byte", "ms", med("mirror", "ttfb") * 1e3,
               med("peer", "ttfb") * 1e3, False, ttfb_target,
               {"direct_from_upstream_ms": med("upstream", "ttfb") * 1e3}, profile),
        Result(label, "server CPU per transfer", "s", med("mirror", "cpu_server"),
               med("peer", "cpu_server"), False, None,
               {"all_processes_cpu_mirror_s": cpu_total("mirror"), "all_processes_cpu_peer_s": cpu_total("peer"),
                "all_processes_cpu_direct_s": cpu_total("upstream")}, profile),
    ]


def manifests(servers: list[Server], image: BigImage, seconds: float, rounds: int) -> list[Result]:
    results = []
    for label, reference, target in (("by tag", image.tag, 10.0), ("by digest", image.manifest_digest, 3.0)):
        runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
        for server in servers:
            _curl(f"{server.url}/v2/{image.repo}/manifests/{reference}")
        for _ in range(rounds):
            for server in servers:
                url = f"{server.url}/v2/{image.repo}/manifests/{reference}"
                runs[server.name].append(_wrk(url, threads=2, connections=20, seconds=seconds,
                                              headers={"Accept": ACCEPT_MANIFEST}))

        def med(name: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[name])  # noqa: B023 - only called in this iteration

        results.append(Result(f"4 manifest {label}", "requests/s", "req/s", med("mirror", "rps"), med("peer", "rps"),
                              True, target))
        results.append(Result(f"4 manifest {label}", "p50 latency", "ms", med("mirror", "p50") * 1e3,
                              med("peer", "p50") * 1e3, False))
        results.append(Result(f"4 manifest {label}", "p99 latency", "ms", med("mirror", "p99") * 1e3,
                              med("peer", "p99") * 1e3, False))
    return results


def docker_pull(servers: list[Server], image_name: str, *, label: str = "5 docker pull, 3 layers",
                cold_target: float | None = None, profile: str = "loopback", rounds: int = 1) -> list[Result]:
    """Cold then warm `docker pull` through each server (a fresh cache and a fresh dockerd every round),
    alternating; the median of `rounds`."""
    times: dict[str, dict[str, list[float]]] = {s.name: {"cold": [], "warm": []} for s in servers}
    for _ in range(rounds):
        for server in servers:
            server.reset()
            daemon = DockerDaemon(mirror_url=server.url).start()
            try:
                for phase in ("cold", "warm"):
                    started = time.perf_counter()
                    daemon.docker("pull", image_name, timeout=600)
                    times[server.name][phase].append(time.perf_counter() - started)
                    daemon.docker("rmi", "-f", image_name)
            finally:
                daemon.stop()
    return [
        Result(label, f"{phase} wall time", "s", statistics.median(times["mirror"][phase]),
               statistics.median(times["peer"][phase]), False, cold_target if phase == "cold" else None,
               {"samples_mirror_s": [round(v, 2) for v in times["mirror"][phase]],
                "samples_peer_s": [round(v, 2) for v in times["peer"][phase]]}, profile)
        for phase in ("cold", "warm")
    ]


_MANIFEST_TYPES = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.distribution.manifest.list.v2+json",
    ACCEPT_MANIFEST, "application/vnd.oci.image.index.v1+json",
))


def _docker_like_pull(base_url: str, repo: str, tag: str) -> float:
    """Docker's requests for a cold pull, without its unpacking: /v2/, HEAD the tag, GET the manifest by
    digest, the config, then the layers three at a time in manifest order (dockerd's default
    max-concurrent-downloads), each body read to its end. Returns the wall time."""
    import http.client
    import queue
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)

    def request(connection: http.client.HTTPConnection, method: str, path: str) -> http.client.HTTPResponse:
        connection.request(method, path, headers={"Accept": _MANIFEST_TYPES})
        response = connection.getresponse()
        while response.read(1 << 20):
            pass
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}")
        return response

    started = time.perf_counter()
    main = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    request(main, "GET", "/v2/")
    digest = request(main, "HEAD", f"/v2/{repo}/manifests/{tag}").getheader("Docker-Content-Digest")
    main.request("GET", f"/v2/{repo}/manifests/{digest}", headers={"Accept": _MANIFEST_TYPES})
    manifest = json.loads(main.getresponse().read())
    request(main, "GET", f"/v2/{repo}/blobs/{manifest['config']['digest']}")
    layers: queue.Queue[str] = queue.Queue()
    for layer in manifest["layers"]:
        layers.put(layer["digest"])
    failures: list[BaseException] = []

    def worker() -> None:
        connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
        try:
            while True:
                try:
                    layer = layers.get_nowait()
                except queue.Empty:
                    return
                request(connection, "GET", f"/v2/{repo}/blobs/{layer}")
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            failures.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if failures:
        raise failures[0]
    return time.perf_counter() - started


def pull_requests(servers: list[Server], repo: str, tag: str, rounds: int, *, label: str,
                  profile: str) -> list[Result]:
    """A cold pull's requests as Docker makes them (_docker_like_pull) through a fresh server, alternating:
    the registries' part of scenario 9, without dockerd's unpacking (which both pay alike, and which
    dominates, and scatters, scenario 9's wall time on a loaded machine)."""
    times: dict[str, list[float]] = {s.name: [] for s in servers}
    for _ in range(rounds):
        for server in servers:
            server.reset()
            times[server.name].append(_docker_like_pull(server.url, repo, tag))
    return [Result(label, "cold wall time", "s", statistics.median(times["mirror"]), statistics.median(times["peer"]),
                   False, None, {"samples_mirror_s": [round(v, 3) for v in times["mirror"]],
                                 "samples_peer_s": [round(v, 3) for v in times["peer"]]}, profile)]


# -- reporting -----------------------------------------------------------------------------------
def print_table(results: list[Result], profiles: dict[str, str]) -> None:
    header = f"{'scenario':38} {'metric':26} {'mirror':>12} {'peer':>12} {'unit':>6} {'ratio':>7} {'target':>8}  ok"
    for profile, description in profiles.items():
        rows = [r for r in results if r.profile == profile]
        if not rows:
            continue
        print(f"\nprofile {description}")
        print(header)
        print("-" * len(header))
        for r in rows:
            target = "" if r.target is None else (f">={r.target:g}x" if r.higher_is_better else f"<={r.target:g}x")
            ok = {True: "yes", False: "NO", None: ""}[r.meets_target]
            print(f"{r.scenario:38} {r.metric:26} {r.mirror:12.2f} {r.peer:12.2f} {r.unit:>6} {r.ratio:7.2f} "
                  f"{target:>8}  {ok}")
            for key, value in r.extra.items():
                print(f"{'':38}   {key}: {value:.3f}" if isinstance(value, float) else f"{'':38}   {key}: {value}")


def write_plot(results: list[Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r.scenario} [{r.profile}]\n{r.metric}" for r in results if r.peer and r.mirror]
    # Plot "how many times better than the peer" so every bar reads the same way.
    values = [r.ratio if r.higher_is_better else 1 / r.ratio for r in results if r.peer and r.mirror]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    ax.barh(labels, values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("mirror vs distribution proxy (x times better; log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _run_steps(steps: list[tuple[str, Callable[[], list[Result]]]], skip: list[str]) -> list[Result]:
    """Each scenario not skipped, in order, with a line saying which runs now (they take minutes)."""
    results: list[Result] = []
    for number, step in steps:
        if number not in skip:
            print(f"scenario {number} ...", flush=True)
            results.extend(step())
    return results


def run_loopback(args: argparse.Namespace, work: Path) -> list[Result]:
    """Scenarios 1-6: the upstream on plain HTTP on loopback, 0.1 ms away."""
    upstream = DistributionRegistry.open().start()
    servers: list[Server] = []
    try:
        print(f"[loopback] seeding the upstream with a {args.blob_mb} MB blob ...", flush=True)
        image = seed_big_image(upstream.url, work, args.blob_mb)
        box = seed_runnable_image(upstream.host, work) if "5" not in args.skip else ""
        servers = [MirrorServer(upstream.url, prefetch=not args.no_prefetch), PeerServer(upstream.url)]
        steps = [
            ("1", lambda: warm_blob(servers, image, args.seconds, args.rounds)),
            ("2", lambda: cold_many(servers, upstream, image, args.clients)),
            ("3", lambda: cold_single(servers, upstream, image, args.rounds)),
            ("4", lambda: manifests(servers, image, args.seconds, args.rounds)),
            ("5", lambda: docker_pull(servers, box, rounds=args.rounds)),
        ]
        return _run_steps(steps, args.skip)
    finally:
        for server in servers:
            server.stop()
        upstream.cleanup()


def run_at_distance(args: argparse.Namespace, work: Path, profile: Profile) -> list[Result]:
    """Scenarios 7-10: the upstream serving TLS from a private CA, behind bench/shaper.py. The mirror
    trusts the CA with upstreams[].ca_file, the peer with SSL_CERT_FILE; both reach it through the proxy."""
    ca = make_private_ca(work / "ca")
    upstream = TlsDistribution(ca).start()
    shaper: ShapingProxy | None = None
    servers: list[Server] = []
    try:
        print(f"[{profile.name}] seeding the TLS upstream with a {args.wan_blob_mb} MB blob and a 10-layer image ...",
              flush=True)
        image = seed_big_image(upstream.url, work, args.wan_blob_mb, repo="bench/far", ca_file=ca.ca_file)
        pulls = "9" not in args.skip or "10" not in args.skip
        box = seed_runnable_image(upstream.host, work, tag="10", extra_layers=TEN_LAYERS) if pulls else ""
        shaper = ShapingProxy("127.0.0.1", upstream.port, profile).start()
        far = f"https://{shaper.host}"
        servers = [MirrorServer(far, ca.ca_file, prefetch=not args.no_prefetch), PeerServer(far, ca.ca_file)]
        label = f"@{profile.name}"
        steps = [
            ("7", lambda: cold_single(servers, upstream, image, args.rounds, label=f"7 cold single client {label}",
                                      direct_url=far, ca_file=ca.ca_file, ttfb_target=1.0, profile=profile.name)),
            ("8", lambda: cold_many(servers, upstream, image, args.clients, label=f"8 cold blob, 20 clients {label}",
                                    rss_label=f"8 peak RSS {label}", target=None, profile=profile.name)),
            ("9", lambda: docker_pull(servers, box, label=f"9 docker pull, 10 layers {label}", cold_target=0.7,
                                      profile=profile.name, rounds=args.rounds)),
            ("10", lambda: pull_requests(servers, "library/benchbox", "10", max(args.rounds, 5),
                                         label=f"10 Docker's requests, 10 layers {label}", profile=profile.name)),
        ]
        return _run_steps(steps, args.skip)
    finally:
        for server in servers:
            server.stop()
        if shaper is not None:
            shaper.stop()
        upstream.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--blob-mb", type=int, default=200)
    parser.add_argument("--wan-blob-mb", type=int, default=100, help="blob size of the scenarios at distance")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per scenario (1: quick look)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients in the cold-miss scenarios")
    parser.add_argument("--profile", choices=("loopback", "wan", "both"), default="both",
                        help="loopback: scenarios 1-6; wan: 7-10, the upstream behind TLS and bench/shaper.py")
    parser.add_argument("--rtt-ms", type=float, default=WAN.rtt * 1e3, help="round trip added by the shaper")
    parser.add_argument("--bandwidth-mbps", type=float, default=WAN.bandwidth / 1e6,
                        help="MB/s per connection through the shaper")
    parser.add_argument("--no-prefetch", action="store_true", help="run the mirror with layer prefetch off")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--skip", action="append", default=[], help="scenario numbers to skip (e.g. 5)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wan = Profile("wan", rtt=args.rtt_ms / 1e3, bandwidth=args.bandwidth_mbps * 1e6)
    prefetch = "mirror prefetch off" if args.no_prefetch else "mirror prefetch on"
    profiles = {"loopback": f"loopback: upstream on plain HTTP, 127.0.0.1; {prefetch}",
                "wan": f"{wan.describe()}, TLS; {prefetch}"}

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    load_before = os.getloadavg()
    try:
        results: list[Result] = []
        if args.profile in ("loopback", "both"):
            results += run_loopback(args, work)
        if args.profile in ("wan", "both"):
            results += run_at_distance(args, work, wan)
        load_after = os.getloadavg()
        print_table(results, profiles)
        print(f"\nload average (1/5/15 min) before: {' '.join(f'{v:.2f}' for v in load_before)}; "
              f"after: {' '.join(f'{v:.2f}' for v in load_after)}")
        data = {"profiles": profiles, "load_before": load_before, "load_after": load_after,
                "results": [dict(vars(r), ratio=r.ratio, meets_target=r.meets_target) for r in results]}
        (args.out / "results.json").write_text(json.dumps(data, indent=2))
        plotted = write_plot(results, args.out / "ratios.png")
        print(f"\nwrote {args.out / 'results.json'}" + (f" and {args.out / 'ratios.png'}" if plotted else
                                                        " (install matplotlib for the plot)"))
        return 0
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
