"""`mirror export` and `mirror import`: the command bodies (argument parsing stays in mirror/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from mirror.config import Config, ConfigError, parse_size
from mirror.errors import RegistryError
from mirror.replication.bundles import BundleError, app_target, export_bundle, import_bundles, rule_images
from mirror.replication.standalone import open_app
from mirror.state import ROUTER


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="images as clients name them: alpine:3.20, docker.io/library/alpine:3.20, team/app:1")
    parser.add_argument("--rule", help="export what the replication rule NAME selects")
    parser.add_argument("--to", required=True, type=Path, help="a new folder, or FILE.tar for an archive")
    parser.add_argument("--since", type=Path,
                        help="an earlier bundle (or its mirror-bundle.json): leave out what it carried")
    parser.add_argument("--split", help="cut the archive into pieces of this size (e.g. 4GB)")
    parser.add_argument("--platform", action="append", dest="platforms",
                        help="keep only this platform of multi-platform images (repeatable; default all)")
    parser.add_argument("--no-referrers", action="store_true", help="leave out signatures, SBOMs, attestations")
    parser.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE",
                        help="bundle folders, archives or pieces (bases before or after their deltas)")
    parser.add_argument("--repository",
                        help="repository for images a layout names by bare tag only (e.g. skopeo's oci:DIR:1)")
    parser.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def run_export(args: argparse.Namespace, config: Config) -> int:
    logging.basicConfig(level="WARNING", format="%(levelname)s %(message)s")
    if bool(args.rule) == bool(args.images):
        print("mirror: export needs IMAGE... or --rule NAME (one of them)", file=sys.stderr)
        return 2
    try:
        split = parse_size(args.split, "--split") if args.split else None
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    if split is not None and split < 10**6:
        print("mirror: --split: pieces must be at least 1MB", file=sys.stderr)
        return 2

    async def run() -> int:
        async with open_app(config) as app:
            images = list(args.images)
            platforms = frozenset(args.platforms) if args.platforms else None
            referrers = not args.no_referrers
            if args.rule:
                images, rule_platforms, rule_referrers = await rule_images(config, app[ROUTER], args.rule)
                platforms = platforms or rule_platforms
                referrers = referrers and rule_referrers
            result = await export_bundle(
                app[ROUTER], images, args.to, since=args.since, split_bytes=split,
                referrers=referrers, platforms=platforms,
            )
        for image in result.bundle.images:
            print(f"{image.name}\t{image.digest}")
        base = ""
        if result.bundle.base:
            base = f", a delta of {result.bundle.base['id']} ({result.blobs_left_out} left out)"
        print(f"bundle {result.bundle.id}: {len(result.bundle.images)} image(s), {result.blobs_written} blob(s), "
              f"{_human(result.bytes_written)}{base} -> {', '.join(str(p) for p in result.files)}")
        return 0

    try:
        return asyncio.run(run())
    except BundleError as exc:
        print(f"mirror: export failed, nothing written: {exc}", file=sys.stderr)
        return 1
    except RegistryError as exc:
        print(f"mirror: export failed, nothing written: {exc.message}", file=sys.stderr)
        return 1


def run_import(args: argparse.Namespace, config: Config) -> int:
    logging.basicConfig(level="WARNING", format="%(levelname)s %(message)s")

    async def run() -> int:
        async with open_app(config) as app:
            results = await import_bundles(app[ROUTER], args.bundles, repository=args.repository,
                                           resolve=app_target(app))
        for result in results:
            for image in result.images:
                print(f"{image.name}\t{image.digest}\tserved as {image.repository}")
            print(f"bundle {result.bundle_id or '(plain OCI layout)'} from {result.path}: "
                  f"{len(result.images)} image(s), {_human(result.bytes_written)} stored")
        return 0

    try:
        return asyncio.run(run())
    except BundleError as exc:
        print(f"mirror: import refused: {exc}", file=sys.stderr)
        return 1
    except RegistryError as exc:
        # Verification passed, so this is the destination failing (disk full...): images whose tags
        # were written are whole, the others are not visible.
        print(f"mirror: import failed: {exc.message}", file=sys.stderr)
        return 1
