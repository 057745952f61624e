"""`mirror export` and `mirror import`: the command bodies (argument parsing stays in mirror/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from mirror.config import Config, ConfigError, parse_size
from mirror.errors import RegistryError
from mirror.replication.bundles import BundleError, app_target, export_bundle, import_bundles, rule_images
from mirror.replication.standalone import open_app
from mirror.state import ROUTER


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
