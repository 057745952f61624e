"""Start-up: `mirror serve` loads only what its config uses, and a server without rules still owns its data.

Every library a server does not need costs start-up time before /v2/ answers (issue 9, item 11; the time
itself is measured in bench/startup.py, not here): redis-py without `cluster`, PyJWT, cryptography and
bcrypt without `auth`, the replication engine (and cron, version parsing, OCI archives) without rules,
rich (the progress bars of `mirror sync`) always.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from mirror.replication.serve_lock import serve_lock_held
from tests.support.fixtures import MirrorFactory
from tests.support.mirror_proc import REPO_ROOT

# Parse the command line as `mirror serve` does, build the app and run its start-up (stores, index,
# upstream sessions, replication, access control), then list which of these modules got loaded.
_SERVE_START = """
import asyncio, json, sys
from aiohttp import web
from mirror import cli
from mirror.app import create_app

args = cli._parser().parse_args(["serve", "--config", sys.argv[1]])
app = create_app(cli._load(args.config))

async def start() -> None:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await runner.cleanup()

asyncio.run(start())
print(json.dumps(sorted(name for name in sys.argv[2:] if name in sys.modules)))
"""

OPTIONAL = [
    "redis", "jwt", "cryptography", "bcrypt", "rich", "cronsim", "packaging", "aiocache",
    "mirror.replication.engine", "mirror.replication.copier", "mirror.replication.bundles", "mirror.auth.tokens",
]


def _loaded_at_start(tmp_path: Path, config: dict[str, Any]) -> list[str]:
    path = tmp_path / "mirror.yml"
    path.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path / "data")}, **config}))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _SERVE_START, str(path), *OPTIONAL],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_a_server_without_cluster_auth_or_rules_starts_without_their_libraries(tmp_path: Path) -> None:
    config = {"upstreams": [{"name": "fake.io", "url": "http://127.0.0.1:9", "default": True}]}
    assert _loaded_at_start(tmp_path, config) == []


def test_a_server_with_rules_and_auth_loads_the_engine_and_the_token_libraries(tmp_path: Path) -> None:
    config = {
        "upstreams": [{"name": "fake.io", "url": "http://127.0.0.1:9", "default": True}],
        "local": {"repositories": ["copy/**"]},
        "replication": [{"name": "hub", "source": "fake.io/library/alpine",
                         "destinations": [{"local": "copy/alpine"}]}],
        "auth": {"access": [{"repository": "**", "anonymous": ["pull"]}]},
    }
    loaded = _loaded_at_start(tmp_path, config)
    # What each configured part needs, and still not what none of them does.
    assert {"mirror.replication.engine", "cronsim", "jwt", "cryptography", "bcrypt"} <= set(loaded)
    assert not {"redis", "rich", "aiocache"} & set(loaded)


async def test_a_server_without_rules_still_owns_its_data_directory_for_mirror_sync(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    mirror = mirror_factory({"storage": {"path": str(data)}})
    # `mirror sync` (with a config of its own) sees the lock and goes through this server instead of
    # opening the stores a second time.
    assert serve_lock_held(data)
    async with aiohttp.ClientSession() as session, session.get(f"{mirror.url}/api/replication") as response:
        assert response.status == 200
        assert await response.json() == {"rules": [], "scheduling": True}
    async with aiohttp.ClientSession() as session, session.post(f"{mirror.url}/api/replication/hub/run") as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"
