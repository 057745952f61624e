"""`mirror robot create NAME [--group G] [--expires 90d]`: a CI account with a long random secret.

The secret is printed once and stored only as a bcrypt hash in the robots file (default
`<storage.path>/auth/robots.json`, mode 0600), which a running server picks up within a second.
The account logs in as `robot$NAME`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mirror.auth.settings import ROBOT_PREFIX
from mirror.config import Config, ConfigError, parse_duration

_ROBOT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def add_robot_parser(commands: argparse._SubParsersAction) -> None:
    robot = commands.add_parser("robot", help="manage robot accounts (CI logins with long random secrets)")
    actions = robot.add_subparsers(dest="robot_command", required=True)
    create = actions.add_parser("create", help="create (or replace) a robot and print its secret once")
    create.add_argument("name", help="lower-case letters, digits, - _ . (logs in as robot$NAME)")
    create.add_argument("--group", action="append", default=[], help="a group it belongs to (repeatable)")
    create.add_argument("--expires", help="lifetime such as 90d or 12h (default: no expiry)")
    create.add_argument("--config", type=Path, help="YAML config file (embedded defaults without it)")
    actions.add_parser("list", help="list robots (never their secrets)").add_argument("--config", type=Path)


def robots_file(config: Config) -> Path:
    return config.security.auth.robots_file or config.storage.path / "auth" / "robots.json"


def run_robot_command(args: argparse.Namespace, config: Config) -> int:
    path = robots_file(config)
    if args.robot_command == "list":
        data = json.loads(path.read_text()) if path.exists() else {"robots": {}}
        for name, entry in sorted(data["robots"].items()):
            expires = entry.get("expires")
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)) if expires else "never"
            print(f"{ROBOT_PREFIX}{name}\tgroups={','.join(entry.get('groups', [])) or '-'}\texpires={when}")
        return 0
    name = args.name
    if not name or not set(name) <= _ROBOT_NAME_CHARS or len(name) > 64:
        print("mirror: robot name: lower-case letters, digits, - _ . only (at most 64)", file=sys.stderr)
        return 2
    expires = None
    if args.expires:
        try:
            expires = time.time() + parse_duration(args.expires, "--expires")
        except ConfigError as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            return 2
    from mirror.auth.users import create_robot  # here: bcrypt is loaded only by the command that hashes

    secret = create_robot(path, name, args.group, expires)
    print(f"username: {ROBOT_PREFIX}{name}")
    print(f"secret:   {secret}")
    print("(the secret is shown only now; it is stored as a bcrypt hash in " + str(path) + ")", file=sys.stderr)
    return 0
