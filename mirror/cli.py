"""Command line: `mirror serve`, `check-config`, `verify`, `gc`, `sync`, `export`, `import`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from mirror import __version__
from mirror.auth.robot_cli import add_robot_parser, run_robot_command
from mirror.cache.maintenance import gc, report_json, verify
from mirror.config import Config, ConfigError, load_config, parse_duration
from mirror.observe.logs import configure_logging
from mirror.observe.requests import ACCESS_LOGGER, RequestLogger

# How long `mirror serve` lets in-flight requests finish after SIGTERM/SIGINT before cancelling them.
SHUTDOWN_GRACE_SECONDS = 5.0
# Read when --config is not given.
CONFIG_ENV = "MIRROR_CONFIG"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Container registry mirror")
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the registry (embedded defaults without --config)")
    serve.add_argument("--config", type=Path, help="YAML config file")
    serve.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: log.level, INFO)")

    health = commands.add_parser("healthcheck", help="exit 0 when the server on this config's port answers /livez")
    health.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")

    check = commands.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")

    verify = commands.add_parser(
        "verify", help="re-hash stored blobs; quarantine any whose bytes no longer match (exit 1 if any)"
    )
    verify.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")
    verify.add_argument("--sample", type=int, help="check this many randomly chosen blobs instead of all")

    gc = commands.add_parser("gc", help="remove local manifests and blobs nothing references (safe while serving)")
    gc.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")
    gc.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    gc.add_argument(
        "--grace", default=None,
        help="leave anything younger than this alone (a push may be in flight); default storage.temp_grace",
    )
    add_robot_parser(commands)

    sync = commands.add_parser("sync", help="run replication rules once now (exit 1 unless everything was copied)")
    sync.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")
    sync.add_argument("--rule", help="only this rule (default: every rule)")
    sync.add_argument("--dry-run", action="store_true", help="show what would be copied; write nothing")
    _add_bundle_commands(commands)
    return parser


def _add_bundle_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Defined here, not beside the command bodies (mirror/replication/bundle_commands.py): parsing any
    # command's arguments, `mirror serve`'s too, must not import what export and import run on.
    export = commands.add_parser(
        "export", help="write images into an air-gap bundle (an OCI layout folder or FILE.tar)"
    )
    export.add_argument("images", nargs="*", metavar="IMAGE",
                        help="images as clients name them: alpine:3.20, docker.io/library/alpine:3.20, team/app:1")
    export.add_argument("--rule", help="export what the replication rule NAME selects")
    export.add_argument("--to", required=True, type=Path, help="a new folder, or FILE.tar for an archive")
    export.add_argument("--since", type=Path,
                        help="an earlier bundle (or its mirror-bundle.json): leave out what it carried")
    export.add_argument("--split", help="cut the archive into pieces of this size (e.g. 4GB)")
    export.add_argument("--platform", action="append", dest="platforms",
                        help="keep only this platform of multi-platform images (repeatable; default all)")
    export.add_argument("--no-referrers", action="store_true", help="leave out signatures, SBOMs, attestations")
    export.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")

    imports = commands.add_parser(
        "import", help="verify air-gap bundles and store their images (all of an image or none)"
    )
    imports.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE",
                         help="bundle folders, archives or pieces (bases before or after their deltas)")
    imports.add_argument("--repository",
                         help="repository for images a layout names by bare tag only (e.g. skopeo's oci:DIR:1)")
    imports.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")


def _load(path: Path | None) -> Config:
    """The config, or every problem of the file on stderr and exit status 2 (serve, check-config, ...)."""
    # Containers and service managers pass the config file's path in the environment.
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    try:
        return load_config(path)
    except ConfigError as exc:
        if len(exc.errors) == 1:
            print(f"mirror: config error: {exc.errors[0]}", file=sys.stderr)
        else:
            print(f"mirror: {len(exc.errors)} config errors in {path}:", file=sys.stderr)
            for message in exc.errors:
                print(f"  {message}", file=sys.stderr)
        raise SystemExit(2) from exc


def _check_cluster(config: Config) -> int:
    """A configured Redis must answer: a cluster node that cannot reach it cannot coordinate anything."""
    if config.cluster is None:
        return 0
    import asyncio

    from mirror.coordination.redis import check_redis

    try:
        asyncio.run(check_redis(config.cluster.redis, display=config.cluster.redis_display))
    except ConnectionError as exc:
        print(f"mirror: cluster.redis: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_storage(config: Config) -> int:
    """With `storage.backend: s3`, the bucket must answer a HEAD with the configured keys."""
    s3 = config.storage.s3
    if config.storage.backend != "s3" or s3 is None:
        return 0
    import asyncio

    try:
        from mirror.storage.s3 import S3BlobBackend, S3Unavailable, settings_from_config
    except ImportError as exc:  # aiobotocore is the optional `s3` extra
        print(f"mirror: storage.backend: s3 needs the s3 extra (pip install 'mirror[s3]'): {exc}", file=sys.stderr)
        return 1

    async def check() -> None:
        backend = await S3BlobBackend.open(settings_from_config(s3))
        try:
            await backend.check()
        finally:
            await backend.close()

    try:
        asyncio.run(check())
    except S3Unavailable as exc:
        print(f"mirror: storage.s3: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        config = _load(args.config)
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return _check_cluster(config) or _check_storage(config)
    if args.command == "serve":
        config = _load(args.config)
        configure_logging(args.log_level or config.log.level, config.log.format)
        from mirror.api.server import run_app
        from mirror.app import create_app
        from mirror.auth.tls import serve_options
        from mirror.coordination.interface import CoordinatorUnavailable
        from mirror.storage.s3 import S3Unavailable  # imports aiobotocore only when a backend opens

        app = create_app(config)
        # aiohttp's run_app, but with connections that answer even unparseable requests as a registry.
        try:
            run_app(
                app,
                host=config.listen.host,
                port=config.listen.port,
                access_log=logging.getLogger(ACCESS_LOGGER),
                access_log_class=RequestLogger,
                # aiohttp waits 60 s by default for in-flight handlers after SIGTERM: one client stalled in the
                # middle of a PATCH (or slowly pulling a big blob) then holds shutdown past `docker stop`'s 10 s
                # and Kubernetes' 30 s, so the process always ended SIGKILLed and the cleanup context (index
                # close, last-access flush) never ran. After this grace, handlers are cancelled; an upload keeps
                # the bytes it received and the client resumes it (tests/test_real_registry.py).
                shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
                print_line=lambda text: print(text, flush=True),
                **serve_options(app, config.security),  # TLS (reloaded on SIGHUP) and request-size caps
            )
        except CoordinatorUnavailable as exc:  # a cluster node must not serve on its own
            print(f"mirror: cluster.redis: {exc}", file=sys.stderr)
            return 1
        except S3Unavailable as exc:  # the bucket does not answer (the message names it, never the secret)
            print(f"mirror: storage.s3: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "healthcheck":
        return _healthcheck(_load(args.config), args.timeout)
    if args.command == "verify":
        config = _load(args.config)
        if args.sample is not None and args.sample < 0:
            print("mirror: --sample must be 0 or more", file=sys.stderr)
            return 2
        logging.basicConfig(level="INFO", format="%(levelname)s %(message)s")
        report = verify(config.storage.path, sample=args.sample)
        print(report_json(report))
        return 1 if report.quarantined else 0
    if args.command == "gc":
        config = _load(args.config)
        logging.basicConfig(level="INFO", format="%(levelname)s %(message)s")
        try:
            grace = config.storage.temp_grace if args.grace is None else parse_duration(args.grace, "--grace")
        except ConfigError as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            return 2
        print(report_json(gc(config.storage.path, dry_run=args.dry_run, grace_seconds=grace)))
        return 0
    if args.command == "robot":
        return run_robot_command(args, _load(args.config))
    if args.command in ("export", "import"):
        from mirror.replication import bundle_commands

        run = bundle_commands.run_export if args.command == "export" else bundle_commands.run_import
        return run(args, _load(args.config))
    if args.command == "sync":
        config = _load(args.config)
        logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
        from mirror.replication.sync_cli import run_sync

        return run_sync(config, args.rule, args.dry_run)
    return 2


def _healthcheck(config: Config, timeout: float) -> int:
    """For a container's HEALTHCHECK: no shell, no curl in the image, the port from the config itself."""
    host = config.listen.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{config.listen.port}/livez"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own loopback URL
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"mirror healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1
