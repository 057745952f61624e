"""Replication registry to registry: the mirror's rules against `skopeo sync`, same data, same run.

    python3 -m bench.replication [--repos 20] [--tags 3] [--rounds 1] [--via serve|copier|sync]
                                 [--concurrency N] [--verify-interval D] [--json FILE]

A distribution registry with token auth (like Docker Hub) holds REPOS x TAGS images: each a config, a base
layer shared by every image, and an application layer of its own. Each round gives each tool a fresh,
empty distribution registry as destination and measures:

- the first run: every tag of every repository listed and copied;
- a rerun with nothing changed: its wall time, and the requests it made at the source, counted in the
  source's access log (manifest and blob GETs are what Docker Hub's rate limit and bandwidth bill), and
  at its destination; and the CPU seconds the tool, the source and its destination spent on it (on a
  shared 2-core machine a rerun's wall time follows what the whole exchange costs in CPU).

The mirror's side (`--via`):
- `serve` (default): one rule per repository inside a running `mirror serve`, as production runs them;
  every rule is triggered at once with `POST /api/replication/<rule>/run?wait=1` and timed until the
  last answers (the server's start-up is not timed: it is running before anyone triggers a rule). The
  round also times `mirror sync --config` beside that server (it goes through the API), start-up of its
  own Python process included. skopeo is a one-shot process either way: that is how it is run.
- `copier`: the copier driven directly in a one-shot process (`bench/replication_worker.py`).
- `sync`: a one-shot `mirror sync --config` with no server (it opens the stores itself).
Goals (issue 10): first run <= 0.6x skopeo's wall time; rerun <= 0.2x skopeo's wall time with zero
manifest/blob GETs at the source.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import yaml

from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.replication.remote import RemoteSpec, open_remote
from tests.support.distribution import DistributionRegistry
from tests.support.mirror_proc import REPO_ROOT, MirrorProcess
from tests.support.procs import free_port, require_tool
from tests.support.skopeo import _env as skopeo_env
from tests.support.skopeo import _global_args as skopeo_args
from tests.support.token_server import TokenServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BASE_LAYER_BYTES = 1 << 20
APP_LAYER_BYTES = 256 << 10


# -- the data ------------------------------------------------------------------------------------
def _repo(number: int) -> str:
    return f"bench/app{number:02d}"


async def _seed(url: str, creds: tuple[str, str], repos: int, tags: int) -> None:
    """Push the images through the RemoteRegistry itself (the source is a token-auth registry)."""
    base = os.urandom(BASE_LAYER_BYTES)
    async with open_remote(RemoteSpec(url, *creds), Metrics()) as registry:

        async def push_blob(repo: str, data: bytes) -> dict[str, object]:
            digest = Digest.of(data)
            await registry.put_blob(repo, digest, _once(data), size=len(data))
            return {"digest": str(digest), "size": len(data)}

        async def push(repo: str, tag: int) -> None:
            config = json.dumps({"architecture": "amd64", "os": "linux", "repo": repo, "tag": tag}).encode()
            descriptors = [await push_blob(repo, data) for data in (config, base, os.urandom(APP_LAYER_BYTES))]
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **descriptors[0]},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **d} for d in descriptors[1:]],
            }).encode()
            await registry.put_manifest(repo, f"1.{tag}.0", manifest, OCI_MANIFEST)

        slots = asyncio.Semaphore(8)

        async def push_repo(repo: str) -> None:
            # One repository's tags one after another: distribution can answer DIGEST_INVALID while two
            # uploads of one blob into one repository write its link file at the same moment.
            async with slots:
                for tag in range(tags):
                    await push(repo, tag)

        await asyncio.gather(*(push_repo(_repo(r)) for r in range(repos)))


async def _once(data: bytes):  # type: ignore[no-untyped-def]
    yield data


# -- the mirror's side: one run, as its own process (bench/replication_worker.py) --------------------
def _run_mirror(source: str, dest: str, repos: list[str]) -> tuple[float, dict[str, object]]:
    argv = [sys.executable, "-m", "bench.replication_worker", "--source", source, "--dest", dest, *repos]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=env, cwd=REPO_ROOT, timeout=600, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"mirror worker failed: {result.stderr.decode()[-3000:]}")
    return elapsed, json.loads(result.stdout.decode().strip().splitlines()[-1])


def _run_sync(source: str, dest: str, repos: list[str], workdir: Path, options: MirrorOptions
              ) -> tuple[float, dict[str, object]]:
    """`mirror sync --config`: one rule per repository (a rule has one source repository), every tag."""
    config = _rules_config(source, dest, repos, workdir / f"sync-data-{urlsplit(dest).port}", options)
    config_path = workdir / "sync.yaml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "mirror", "sync", "--config", str(config_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=env, cwd=REPO_ROOT, timeout=900, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"mirror sync failed: {result.stdout.decode()[-2000:]} {result.stderr.decode()[-2000:]}")
    return elapsed, {"images": 0, "inside_s": float("nan")}  # its own table went to stderr


@dataclass(frozen=True)
class MirrorOptions:
    concurrency: int | None = None  # replication_concurrency; None: the config's default
    verify_interval: str | None = None  # each rule's verify_interval; None: the config's default (24h)


def _rules_config(source: str, dest: str, repos: list[str], data: Path, options: MirrorOptions = MirrorOptions()
                  ) -> dict[str, object]:
    """One rule per repository (a rule has one source repository), every tag, on demand only."""
    extra = {"verify_interval": options.verify_interval} if options.verify_interval is not None else {}
    return {
        **({"replication_concurrency": options.concurrency} if options.concurrency else {}),
        "storage": {"path": str(data)},
        "upstreams": [{"name": "src", "url": source}],
        "replication": [{"name": f"r{number:02d}", "source": f"src/{repo}",
                         "destinations": [{"registry": dest, "repository": f"mirror/{repo}"}], **extra}
                        for number, repo in enumerate(repos)],
    }


class _ServeSide:
    """The rules inside a running `mirror serve`, as production runs them: each run is asked for with
    `POST /api/replication/<rule>/run?wait=1` (answered when the run has ended), all rules at once; the
    server runs `replication_concurrency` of them at a time. The server's own start-up is not timed:
    it is already running when a schedule or a user triggers a rule."""

    def __init__(self, source: str, dest: str, repos: list[str], workdir: Path, options: MirrorOptions) -> None:
        port = free_port()
        self.rules = [f"r{number:02d}" for number in range(len(repos))]
        config = {**_rules_config(source, dest, repos, workdir / f"serve-data-{port}", options),
                  "listen": f"127.0.0.1:{port}"}
        self.process = MirrorProcess(config, workdir=workdir / f"serve-{port}")
        (workdir / f"serve-{port}").mkdir(parents=True, exist_ok=True)
        self.process.start()

    def run(self) -> tuple[float, dict[str, object]]:
        return asyncio.run(self._run())

    async def _run(self) -> tuple[float, dict[str, object]]:
        async with aiohttp.ClientSession() as session:

            async def run_rule(name: str) -> dict[str, object]:
                async with session.post(f"{self.process.url}/api/replication/{name}/run",
                                        params={"wait": "1"}) as response:
                    assert response.status == 200, await response.text()
                    report: dict[str, object] = await response.json()
                    return report

            started = time.perf_counter()
            reports = await asyncio.gather(*(run_rule(name) for name in self.rules))
            elapsed = time.perf_counter() - started
        failed = [r for r in reports if r["result"] != "ok"]
        if failed:
            raise RuntimeError(f"rules failed inside mirror serve: {failed[:3]}")
        images = sum(int(r["copied"]) + int(r["unchanged"]) for r in reports)  # type: ignore[call-overload]
        return elapsed, {"images": images, "inside_s": elapsed}

    def run_sync_command(self) -> float:
        """`mirror sync --config` beside the running server: it goes through the server's API (start-up
        of the command's own Python process included)."""
        argv = [sys.executable, "-m", "mirror", "sync", "--config", str(self.process.config_path)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        started = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, env=env, cwd=REPO_ROOT, timeout=900, check=False)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"mirror sync failed: {result.stdout.decode()[-2000:]} {result.stderr.decode()[-2000:]}")
        return elapsed

    def stop(self) -> None:
        self.process.cleanup()


def _run_skopeo(source: DistributionRegistry, dest: DistributionRegistry, repos: list[str], workdir: Path) -> float:
    spec = {source.host: {"tls-verify": False, "images-by-tag-regex": {repo: ".*" for repo in repos}}}
    spec_path = workdir / "skopeo-sync.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    argv = [*skopeo_args(), "sync", "--src", "yaml", "--dest", "docker", "--dest-tls-verify=false",
            "--src-no-creds", "--dest-no-creds", "--preserve-digests", str(spec_path),
            f"{dest.host}/skopeo"]
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=skopeo_env(), timeout=600, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"skopeo sync failed: {result.stderr.decode()[-3000:]}")
    return elapsed


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    """CPU seconds of this process's children that have ended (skopeo, a one-shot mirror)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pid(registry: DistributionRegistry) -> int:
    assert registry.proc is not None, "the registry is not running"
    return registry.proc.pid


class _CpuMeter:
    """CPU seconds spent during one run by the tool and by each registry: on a machine where every
    process competes for 2 cores, a run's wall time follows the CPU the whole exchange costs."""

    def __init__(self, tool_pid: int | None, source: DistributionRegistry, dest: DistributionRegistry) -> None:
        self.tool_pid, self.pids = tool_pid, {"source": _pid(source), "dest": _pid(dest)}

    def __enter__(self) -> _CpuMeter:
        self.start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        self.used = {name: round(end[name] - self.start[name], 3) for name in end}

    def _read(self) -> dict[str, float]:
        tool = _process_cpu(self.tool_pid) if self.tool_pid is not None else _children_cpu()
        return {"tool": tool, **{name: _process_cpu(pid) for name, pid in self.pids.items()}}


def _dest_counts(requests: list[tuple[str, str, int]]) -> dict[str, int]:
    return {"requests": len(requests), "heads": sum(1 for r in requests if r[0] == "HEAD"),
            "gets": sum(1 for r in requests if r[0] == "GET")}


def _source_counts(requests: list[tuple[str, str, int]]) -> dict[str, int]:
    reads = [r for r in requests if r[0] == "GET" and ("/manifests/" in r[1] or "/blobs/" in r[1])]
    return {"requests": len(requests), "manifest_blob_gets": len(reads),
            "heads": sum(1 for r in requests if r[0] == "HEAD")}


@dataclass
class Round:
    mirror_first_s: float
    skopeo_first_s: float
    mirror_rerun_s: float
    skopeo_rerun_s: float
    mirror_rerun_source: dict[str, int]
    skopeo_rerun_source: dict[str, int]
    mirror_first_source: dict[str, int]
    skopeo_first_source: dict[str, int]
    mirror_images: int
    mirror_first_inside_s: float  # the same runs without interpreter and import start-up
    mirror_rerun_inside_s: float
    sync_command_rerun_s: float  # serve only: `mirror sync` through the running server, process start-up included
    load_average: tuple[float, float, float]  # when the round ended
    mirror_rerun_dest: dict[str, int]  # requests at each tool's own destination during the rerun
    skopeo_rerun_dest: dict[str, int]
    mirror_rerun_cpu: dict[str, float]  # CPU seconds during the rerun: the tool, the source, its destination
    skopeo_rerun_cpu: dict[str, float]


def _round(source: DistributionRegistry, repos: list[str], workdir: Path, via: str, options: MirrorOptions
           ) -> Round:
    mirror_dest = DistributionRegistry.open().start()
    skopeo_dest = DistributionRegistry.open().start()
    serve = _ServeSide(source.url, mirror_dest.url, repos, workdir, options) if via == "serve" else None

    def run_mirror() -> tuple[float, dict[str, object]]:
        if serve is not None:
            return serve.run()
        if via == "sync":
            return _run_sync(source.url, mirror_dest.url, repos, workdir, options)
        return _run_mirror(source.url, mirror_dest.url, repos)

    sync_command_rerun = float("nan")
    try:
        mark = source.log_mark()
        mirror_first, first_stats = run_mirror()
        mirror_first_source = _source_counts(source.requests(mark))
        mark = source.log_mark()
        skopeo_first = _run_skopeo(source, skopeo_dest, repos, workdir)
        skopeo_first_source = _source_counts(source.requests(mark))
        mark, dest_mark = source.log_mark(), mirror_dest.log_mark()
        with _CpuMeter(serve.process.pid if serve is not None else None, source, mirror_dest) as mirror_cpu:
            mirror_rerun, rerun_stats = run_mirror()
        mirror_rerun_source = _source_counts(source.requests(mark))
        mirror_dest_requests = mirror_dest.requests(dest_mark)
        writes = [r for r in mirror_dest_requests if r[0] in ("POST", "PATCH", "PUT", "DELETE")]
        assert not writes, f"the no-change rerun wrote at the destination: {writes[:5]}"
        mark, dest_mark = source.log_mark(), skopeo_dest.log_mark()
        with _CpuMeter(None, source, skopeo_dest) as skopeo_cpu:
            skopeo_rerun = _run_skopeo(source, skopeo_dest, repos, workdir)
        skopeo_rerun_source = _source_counts(source.requests(mark))
        skopeo_dest_requests = skopeo_dest.requests(dest_mark)
        if serve is not None:
            sync_command_rerun = serve.run_sync_command()
    finally:
        if serve is not None:
            serve.stop()
        mirror_dest.cleanup()
        skopeo_dest.cleanup()
    return Round(mirror_first, skopeo_first, mirror_rerun, skopeo_rerun, mirror_rerun_source, skopeo_rerun_source,
                 mirror_first_source, skopeo_first_source, int(first_stats["images"]),  # type: ignore[call-overload]
                 float(first_stats["inside_s"]), float(rerun_stats["inside_s"]),  # type: ignore[arg-type]
                 sync_command_rerun, os.getloadavg(), _dest_counts(mirror_dest_requests),
                 _dest_counts(skopeo_dest_requests), mirror_cpu.used, skopeo_cpu.used)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.replication")
    parser.add_argument("--repos", type=int, default=20)
    parser.add_argument("--tags", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="replication_concurrency of the mirror's config (default: the config's default)")
    parser.add_argument("--verify-interval", default=None,
                        help="each rule's verify_interval (default: the config's, 24h, so the rerun reads the "
                             "destination's tag lists; 0: the rerun HEADs every tag there)")
    parser.add_argument("--via", choices=("serve", "copier", "sync"), default="serve",
                        help="the mirror side: rules inside a running `mirror serve` triggered through its API "
                             "(default, how production runs them), the copier driven directly in a one-shot "
                             "process, or a one-shot `mirror sync --config` (a rule per repository)")
    args = parser.parse_args(argv)

    require_tool("skopeo")
    require_tool("docker-registry")
    workdir = Path(tempfile.mkdtemp(prefix="bench-replication-"))
    tokens = TokenServer().start()
    source = DistributionRegistry.token_auth(tokens).start()
    try:
        repos = [_repo(n) for n in range(args.repos)]
        asyncio.run(_seed(source.url, tokens.creds, args.repos, args.tags))
        options = MirrorOptions(args.concurrency, args.verify_interval)
        rounds = [_round(source, repos, workdir, args.via, options) for _ in range(args.rounds)]
    finally:
        source.cleanup()
        tokens.stop()

    def median(name: str) -> float:
        return statistics.median(getattr(r, name) for r in rounds)

    last = rounds[-1]
    first_ratio = median("mirror_first_s") / median("skopeo_first_s")
    rerun_ratio = median("mirror_rerun_s") / median("skopeo_rerun_s")
    print(f"replication: {args.repos} repositories x {args.tags} tags, mirror side via {args.via}, "
          f"replication_concurrency {args.concurrency or 'default'}, verify_interval "
          f"{args.verify_interval or 'default'}, {args.rounds} round(s), medians")
    print(f"{'':28} {'mirror':>10} {'skopeo sync':>12} {'ratio':>7}  goal")
    print(f"{'first run, wall s':28} {median('mirror_first_s'):10.2f} {median('skopeo_first_s'):12.2f} "
          f"{first_ratio:7.2f}  <= 0.6")
    print(f"{'no-change rerun, wall s':28} {median('mirror_rerun_s'):10.2f} {median('skopeo_rerun_s'):12.2f} "
          f"{rerun_ratio:7.2f}  <= 0.2")
    if args.via == "serve":
        command = median("sync_command_rerun_s")
        print(f"{'  mirror sync via the server':28} {command:10.2f} (rerun, one-shot command, Python start-up "
              f"included): ratio {command / median('skopeo_rerun_s'):.2f}")
    if args.via == "copier":
        inside_first, inside_rerun = median("mirror_first_inside_s"), median("mirror_rerun_inside_s")
        print(f"{'  mirror without start-up':28} {inside_first:10.2f} (first) {inside_rerun:.2f} (rerun): ratios "
              f"{inside_first / median('skopeo_first_s'):.2f} / {inside_rerun / median('skopeo_rerun_s'):.2f}")
    for label, key in (("rerun source requests", "requests"), ("rerun manifest/blob GETs", "manifest_blob_gets"),
                       ("rerun source HEADs", "heads")):
        print(f"{label:28} {last.mirror_rerun_source[key]:10d} {last.skopeo_rerun_source[key]:12d}"
              + ("           0" if key == "manifest_blob_gets" else ""))
    for label, key in (("rerun destination requests", "requests"), ("rerun destination HEADs", "heads"),
                       ("rerun destination GETs", "gets")):
        print(f"{label:28} {last.mirror_rerun_dest[key]:10d} {last.skopeo_rerun_dest[key]:12d}")
    print(f"{'first run source requests':28} {last.mirror_first_source['requests']:10d} "
          f"{last.skopeo_first_source['requests']:12d}")

    def median_cpu(name: str, part: str) -> float:
        return statistics.median(getattr(r, name)[part] for r in rounds)

    totals = []
    for name in ("mirror_rerun_cpu", "skopeo_rerun_cpu"):
        totals.append(statistics.median(sum(getattr(r, name).values()) for r in rounds))
    print(f"{'rerun CPU s: the tool':28} {median_cpu('mirror_rerun_cpu', 'tool'):10.2f} "
          f"{median_cpu('skopeo_rerun_cpu', 'tool'):12.2f}")
    print(f"{'  the source registry':28} {median_cpu('mirror_rerun_cpu', 'source'):10.2f} "
          f"{median_cpu('skopeo_rerun_cpu', 'source'):12.2f}")
    print(f"{'  its destination registry':28} {median_cpu('mirror_rerun_cpu', 'dest'):10.2f} "
          f"{median_cpu('skopeo_rerun_cpu', 'dest'):12.2f}")
    print(f"{'  all three':28} {totals[0]:10.2f} {totals[1]:12.2f} {totals[0] / totals[1]:7.2f}")
    loads = ", ".join(" ".join(f"{x:.2f}" for x in r.load_average) for r in rounds)
    print(f"load average (1, 5, 15 min) at the end of each round: {loads}")
    if args.json:
        args.json.write_text(json.dumps({"repos": args.repos, "tags": args.tags,
                                         "rounds": [asdict(r) for r in rounds]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
