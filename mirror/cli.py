"""Command line: `mirror serve`, `mirror check-config`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml
from aiohttp import web

from mirror import __version__
from mirror.config import Config, ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Container registry mirror")
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the registry (embedded defaults without --config)")
    serve.add_argument("--config", type=Path, help="YAML config file")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")

    check = commands.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")
    return parser


def _load(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"mirror: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        config = _load(args.config)
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    if args.command == "serve":
        config = _load(args.config)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from mirror.app import create_app

        web.run_app(
            create_app(config),
            host=config.listen.host,
            port=config.listen.port,
            access_log=None,
            print=lambda text: print(text, flush=True),
        )
        return 0
    return 2
