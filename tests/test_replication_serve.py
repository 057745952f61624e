"""Replication inside a real `mirror serve` process and through the `mirror sync` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.registry_helpers import files_under, push_image
from tests.replication_helpers import http_json, wait_for
from tests.support.fixtures import MirrorFactory
from tests.support.mirror_proc import REPO_ROOT


def _rule(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": "team/app", "destinations": [{"local": f"copy/{name}"}], **extra}


async def _tags(session: aiohttp.ClientSession, base: str, repo: str) -> list[str]:
    async with session.get(f"{base}/v2/{repo}/tags/list") as response:
        return sorted((await response.json())["tags"]) if response.status == 200 else []


async def test_an_interval_rule_runs_again_and_again_inside_mirror_serve(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    mirror = mirror_factory({"storage": {"path": str(tmp_path / "data")},
                             "replication": [_rule("every", interval="1s", jitter="0s")]})
    async with aiohttp.ClientSession(base_url=mirror.url) as session:
        await push_image(session, "team/app", "1")

        async def runs() -> int:
            _, body = await http_json(session, "GET", f"{mirror.url}/api/replication")
            return int(body["rules"][0]["runs"])

        await wait_for(lambda: _at_least(runs, 3), 20, "three runs of the interval rule")
        assert await _tags(session, mirror.url, "copy/every") == ["1"]
        await push_image(session, "team/app", "2", layers=(b"later",))
        await wait_for(lambda: _has(session, mirror.url, "copy/every", "2"), 10, "the next run to copy tag 2")
        _, body = await http_json(session, "GET", f"{mirror.url}/api/replication")
    state = body["rules"][0]
    assert body["scheduling"] and state["result"] == "ok" and state["next_run"] is not None


async def _at_least(count: Any, wanted: int) -> bool:
    return int(await count()) >= wanted


async def _has(session: aiohttp.ClientSession, base: str, repo: str, tag: str) -> bool:
    return tag in await _tags(session, base, repo)


async def test_an_on_push_rule_replicates_a_pushed_tag_within_seconds(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    mirror = mirror_factory({"storage": {"path": str(tmp_path / "data")},
                             "replication": [_rule("pushed", on_push=True)]})
    async with aiohttp.ClientSession(base_url=mirror.url) as session:
        _, body = await http_json(session, "GET", f"{mirror.url}/api/replication")
        assert body["rules"][0]["runs"] == 0  # no schedule: nothing ran before the push
        await push_image(session, "team/app", "v1")
        pushed = time.monotonic()
        await wait_for(lambda: _has(session, mirror.url, "copy/pushed", "v1"), 5, "the pushed tag replicated")
        assert time.monotonic() - pushed < 5


async def test_an_interrupted_run_is_resumed_at_start_up(mirror_factory: MirrorFactory, tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = {"storage": {"path": str(data)}, "replication": [_rule("manual")]}
    mirror = mirror_factory(config)
    async with aiohttp.ClientSession(base_url=mirror.url) as session:
        await push_image(session, "team/app", "1")
    mirror.stop()
    # What a run killed halfway leaves behind: its state still says running.
    state_file = data / "replication" / "manual" / "state.json"
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"name": "manual", "result": "running", "last_run_started": time.time() - 60}))
    mirror.start()
    async with aiohttp.ClientSession(base_url=mirror.url) as session:
        await wait_for(lambda: _has(session, mirror.url, "copy/manual", "1"), 10, "the resumed run to copy")
        _, body = await http_json(session, "GET", f"{mirror.url}/api/replication")
    assert body["rules"][0]["resumed"] is True
    assert "resuming it" in mirror.log_text()


# -- mirror sync ---------------------------------------------------------------------------------------
def _sync(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "150"}
    return subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(config_path), *args],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


async def test_mirror_sync_exit_status_says_whether_everything_was_copied(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    rules = [_rule("good"), {"name": "broken", "source": "no/such", "destinations": [{"local": "copy/x"}]}]
    config = {"listen": "127.0.0.1:1", "storage": {"path": str(data)}, "replication": rules}
    seeder = mirror_factory({"storage": {"path": str(data)}})
    async with aiohttp.ClientSession(base_url=seeder.url) as session:
        await push_image(session, "team/app", "1")
    seeder.stop()
    path = _write(tmp_path / "sync.yml", config)

    dry = _sync(path, "--rule", "good", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "good: would copy 1 (" in dry.stdout and not (data / "repositories" / "copy").exists()
    assert not (data / "replication" / "good" / "state.json").exists()

    good = _sync(path, "--rule", "good")
    assert good.returncode == 0, good.stderr
    assert "good" in good.stdout and "ok" in good.stdout
    assert (data / "repositories" / "copy" / "good" / "_tags" / "1").exists()

    everything = _sync(path)
    assert everything.returncode == 1  # `broken` copied nothing
    assert "broken" in everything.stdout and "failed" in everything.stdout

    unknown = _sync(path, "--rule", "nope")
    assert unknown.returncode == 2 and "no replication rule named 'nope'" in unknown.stderr


async def test_mirror_sync_beside_a_running_server_goes_through_its_api(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    mirror = mirror_factory({"storage": {"path": str(data)}, "replication": [_rule("beside")]})
    async with aiohttp.ClientSession(base_url=mirror.url) as session:
        await push_image(session, "team/app", "1")
    path = _write(tmp_path / "sync.yml", mirror.config)
    before = files_under(data / "repositories")
    dry = _sync(path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "through its API" in dry.stderr and "beside: would copy 1 (" in dry.stdout
    assert files_under(data / "repositories") == before

    synced = _sync(path)
    assert synced.returncode == 0, synced.stderr + synced.stdout
    assert "through its API" in synced.stderr
    async with aiohttp.ClientSession(base_url=mirror.url) as session:
        assert await _has(session, mirror.url, "copy/beside", "1")
        _, body = await http_json(session, "GET", f"{mirror.url}/api/replication")
    assert body["rules"][0]["runs"] == 1  # the server ran it: the state is the server's


async def test_mirror_sync_runs_rules_side_by_side_up_to_replication_concurrency(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    seeder = mirror_factory({"storage": {"path": str(data)}})
    async with aiohttp.ClientSession(base_url=seeder.url) as session:
        for tag in ("1", "2", "3"):
            await push_image(session, "team/app", tag, layers=(tag.encode() * 4096,))
    seeder.stop()

    def intervals() -> list[tuple[float, float]]:
        states = [json.loads((data / "replication" / name / "state.json").read_text()) for name in ("a", "b")]
        return [(s["last_run_started"], s["last_run_finished"]) for s in states]

    for concurrency, overlap in ((2, True), (1, False)):
        # Fresh destinations each time: the bound is on rules that copy (one found up to date takes no slot).
        rules = [{**_rule(name), "destinations": [{"local": f"copy/{name}{concurrency}"}]} for name in ("a", "b")]
        config = {"listen": "127.0.0.1:1", "storage": {"path": str(data)}, "replication_concurrency": concurrency,
                  "replication": rules}
        synced = _sync(_write(tmp_path / "sync.yml", config))
        assert synced.returncode == 0, synced.stderr + synced.stdout
        (a_start, a_end), (b_start, b_end) = intervals()
        assert (a_start < b_end and b_start < a_end) is overlap, (concurrency, intervals())


async def test_a_run_asked_to_wait_answers_with_its_report_and_the_destination_shows_in_the_metrics(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    """A registry destination's requests are counted in the app's metrics, under the destination's host."""
    dest = mirror_factory({"storage": {"path": str(tmp_path / "dest")}})
    rule = {"name": "out", "source": "team/app", "destinations": [{"registry": dest.url, "repository": "copy/app"}]}
    mirror = mirror_factory({"storage": {"path": str(tmp_path / "data")}, "replication": [rule]})
    async with aiohttp.ClientSession(base_url=mirror.url) as session:
        await push_image(session, "team/app", "1")
        status, report = await http_json(session, "POST", f"{mirror.url}/api/replication/out/run?wait=1")
        assert status == 200 and report["result"] == "ok" and report["copied"] == 1, report
        assert await _has(session, dest.url, "copy/app", "1")  # done when answered, not some time later
        async with session.get("/metrics") as response:
            metrics = await response.text()
    counted = [line for line in metrics.splitlines()
               if line.startswith("mirror_upstream_requests_total{") and f'upstream="{dest.host}"' in line]
    assert any('method="PUT"' in line for line in counted), counted or metrics[-3000:]
