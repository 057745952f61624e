"""Replication rules in-process: tag filters, config errors, runs and reruns, the API, the rate-limit gate."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.app import create_app
from mirror.config import ConfigError, load_config_data
from mirror.replication import engine as engine_module
from mirror.replication.engine import ReplicationEngine, next_run_at
from mirror.replication.hosting import REPLICATION
from mirror.replication.planner import select_tags
from mirror.replication.rules import TagFilter
from mirror.replication.standalone import open_app
from mirror.replication.status import RuleState
from mirror.state import CONFIG
from tests.fake_upstream import FakeUpstream, Fault
from tests.registry_helpers import DOCKER_MANIFEST, files_under, push_image
from tests.replication_helpers import upstream_source_factory, wait_for

TAGS = ["3.17", "3.18", "3.18.4", "3.19", "3.19.0-rc1", "3.20", "3.9", "edge", "latest", "3.20-rc",
        "sha256-" + "a" * 64 + ".sig"]


# -- tag filters -------------------------------------------------------------------------------------
def test_include_and_exclude_are_anchored_at_both_ends() -> None:
    assert select_tags(TAGS, TagFilter(include=r"3\.\d+")) == ["3.20", "3.19", "3.18", "3.17", "3.9"]
    # Not anchored, `3\.1` would have matched 3.17, 3.18, 3.18.4 and 3.19 too.
    assert select_tags(TAGS, TagFilter(include=r"3\.1")) == []
    assert select_tags(TAGS, TagFilter(include=r"3\..*", exclude=r".*rc.*")) == [
        "3.20", "3.19", "3.18.4", "3.18", "3.17", "3.9"]
    assert select_tags(TAGS, TagFilter(exclude="rc")) == select_tags(TAGS, TagFilter())  # whole tag only


def test_semver_ranges_leave_out_pre_releases_and_non_versions() -> None:
    assert select_tags(TAGS, TagFilter(semver=">=3.18,<3.20")) == ["3.19", "3.18.4", "3.18"]
    assert "3.19.0-rc1" in select_tags(TAGS, TagFilter(semver=">=3.19.0rc1"))  # a range naming one admits them


def test_latest_keeps_the_newest_versions_in_version_order() -> None:
    # 3.9 is older than 3.17 (a string sort would say otherwise); non-versions rank below versions.
    assert select_tags(TAGS, TagFilter(include=r"3\.\d+", latest=2)) == ["3.20", "3.19"]
    assert select_tags(["2024-01-09", "2024-01-10", "nightly"], TagFilter(latest=1)) == ["2024-01-10"]
    assert select_tags(TAGS, TagFilter(include=r"3\.\d+", semver=">=3.18", latest=5)) == ["3.20", "3.19", "3.18"]


def test_cosign_signature_tags_are_never_selected_as_images() -> None:
    assert not any(tag.endswith(".sig") for tag in select_tags(TAGS, TagFilter()))


# -- config ------------------------------------------------------------------------------------------
UPSTREAM = {"name": "docker.io", "url": "https://registry-1.docker.io"}


def _config(rule: dict[str, Any], **extra: Any) -> Any:
    base = {"name": "r", "source": "docker.io/library/alpine", "destinations": ["cache"], **rule}
    return load_config_data({"upstreams": [UPSTREAM], "replication": [base], **extra})


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"tags": {"include": "(unclosed"}}, "replication[0].tags.include"),
        ({"tags": {"semver": "3.18 or later"}}, "replication[0].tags.semver"),
        ({"tags": {"latest": 0}}, "replication[0].tags.latest"),
        ({"tags": {"newest": 3}}, "replication[0].tags.newest"),
        ({"schedule": "every monday"}, "replication[0].schedule"),
        ({"schedule": "0 * * * *", "interval": "5m"}, "replication[0].interval"),
        ({"interval": "soon"}, "replication[0].interval"),
        ({"on_push": True}, "replication[0].on_push"),
        ({"platforms": ["amd64"]}, "replication[0].platforms[0]"),
        ({"destinations": []}, "replication[0].destinations"),
        ({"destinations": [{"registry": "ftp://x"}]}, "replication[0].destinations[0].registry"),
        ({"destinations": [{"archive": "/srv/x.zip"}]}, "replication[0].destinations[0].archive"),
        ({"destinations": [{"registry": "https://x", "passwd": "y"}]}, "replication[0].destinations[0].passwd"),
        ({"source": "quay.io/coreos/etcd"}, "replication[0].source"),
        ({"name": "Base Images"}, "replication[0].name"),
        ({"bandwidth": "fast"}, "replication[0].bandwidth"),
        ({"verify_interval": "daily"}, "replication[0].verify_interval"),
        ({"verify_interval": -1}, "replication[0].verify_interval"),
    ],
)
def test_config_errors_name_the_key(rule: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(rule)
    assert str(caught.value).startswith(key + ":"), str(caught.value)


def test_ratelimit_floor_is_validated_per_upstream() -> None:
    with pytest.raises(ConfigError, match=r"^upstreams\[0\]\.ratelimit_floor:"):
        load_config_data({"upstreams": [{**UPSTREAM, "ratelimit_floor": -1}]})
    config = load_config_data({"upstreams": [{**UPSTREAM, "ratelimit_floor": 20}]})
    assert config.upstreams[0].ratelimit_floor == 20


def test_a_rule_as_the_issue_writes_it_is_accepted() -> None:
    config = _config({
        "tags": {"include": r"^3\.\d+$", "exclude": "rc", "semver": ">=3.18", "latest": 5},
        "platforms": ["linux/amd64", "linux/arm64"],
        "referrers": True,
        "destinations": ["cache", {"registry": "https://dc2.example:5000", "repository": "mirror/alpine",
                                   "username": "u", "password": "p"},
                         {"oci_layout": "/srv/airgap/base"}, {"archive": "/srv/airgap/base.tar"}],
        "schedule": "0 */6 * * *",
        "prune": False,
        "bandwidth": "50MB/s",
    })
    rule = config.replication[0]
    assert rule.source.upstream == "docker.io" and rule.source.repository == "library/alpine"
    assert rule.bandwidth == 50_000_000 and rule.platforms == frozenset({"linux/amd64", "linux/arm64"})
    assert config.to_dict()["replication"][0]["destinations"][1]["password"] == "***"
    assert rule.verify_interval == 24 * 3600  # unsaid: a registry destination is HEADed tag by tag daily
    assert _config({"verify_interval": "30m"}).replication[0].verify_interval == 1800


def test_interval_runs_are_spaced_by_the_interval_plus_jitter() -> None:
    rule = _config({"interval": "10m", "jitter": "30s"}).replication[0]
    import random

    rng = random.Random(1)
    state = RuleState("r", last_run_started=1000.0)
    due = [next_run_at(rule, state, 1000.0, rng) for _ in range(50)]
    assert all(1600.0 <= d <= 1630.0 for d in due if d is not None) and len(set(due)) > 1
    cron = _config({"schedule": "0 */6 * * *"}).replication[0]
    at = next_run_at(cron, RuleState("r"), 1_700_000_000.0, rng)  # 2023-11-14 22:13:20 UTC
    assert at == 1_700_006_400.0  # the next 00:00 UTC


# -- runs between two local repositories -----------------------------------------------------------------
async def _app_with_rules(aiohttp_client: Any, tmp_path: Path, rules: list[dict[str, Any]], **extra: Any) -> TestClient:
    config = load_config_data({"storage": {"path": str(tmp_path / "data")}, "replication": rules, **extra})
    return await aiohttp_client(create_app(config))


async def test_a_rule_copies_the_selected_tags_and_a_rerun_writes_nothing(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await _app_with_rules(aiohttp_client, tmp_path, [{
        "name": "team", "source": "team/app", "tags": {"semver": ">=1.1"},
        "destinations": [{"local": "copy/app"}],
    }])
    for tag, layer in (("1.0", b"old"), ("1.1", b"mid"), ("2.0", b"new"), ("2.1-rc1", b"rc")):
        await push_image(client, "team/app", tag, layers=(layer,), media_type=DOCKER_MANIFEST)
    engine = client.app[REPLICATION]
    first = await engine.run_rule("team")
    assert (first.result, first.copied, first.unchanged) == ("ok", 2, 0)
    async with client.get("/v2/copy/app/tags/list") as response:
        assert sorted((await response.json())["tags"]) == ["1.1", "2.0"]
    repos = tmp_path / "data" / "repositories" / "copy"
    before = files_under(repos)
    second = await engine.run_rule("team")
    assert (second.result, second.copied, second.unchanged) == ("ok", 0, 2)
    assert files_under(repos) == before

    async with client.get("/api/replication") as response:
        listed = (await response.json())["rules"]
    assert listed[0]["name"] == "team" and listed[0]["result"] == "ok" and listed[0]["skipped"] == 2
    assert listed[0]["runs"] == 2 and listed[0]["last_success"] is not None


async def test_the_api_starts_a_rule_and_reports_it(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await _app_with_rules(aiohttp_client, tmp_path, [{
        "name": "team", "source": "team/app", "destinations": [{"local": "copy/app"}],
    }])
    await push_image(client, "team/app", "1")
    async with client.post("/api/replication/team/run") as response:
        assert response.status == 202 and (await response.json())["rule"] == "team"

    async def copied() -> bool:
        async with client.get("/v2/copy/app/manifests/1") as response:
            return response.status == 200

    await wait_for(copied, 10, "the rule started through the API to copy the image")
    await wait_for(lambda: client.app[REPLICATION].state("team").result == "ok", 10, "the run to finish")
    async with client.post("/api/replication/nope/run") as response:
        assert response.status == 404 and (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    async with client.get("/metrics") as response:
        text = await response.text()
    assert 'mirror_replication_runs_total{result="ok",rule="team"} 1.0' in text
    assert 'mirror_replication_last_success_timestamp_seconds{rule="team"}' in text


async def test_a_dry_run_reports_what_it_would_copy_and_writes_nothing(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await _app_with_rules(aiohttp_client, tmp_path, [{
        "name": "team", "source": "team/app", "destinations": [{"local": "copy/app"}],
    }])
    await push_image(client, "team/app", "1")
    async with client.post("/api/replication/team/run", params={"dry_run": "1"}) as response:
        plan = await response.json()
    assert plan["dry_run"] and [i["outcome"] for i in plan["images"]] == ["would-copy"]
    assert not (tmp_path / "data" / "repositories" / "copy").exists()
    assert not (tmp_path / "data" / "replication" / "team" / "state.json").exists()


async def test_a_failing_source_is_a_failed_run_and_counted(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await _app_with_rules(aiohttp_client, tmp_path, [{
        "name": "ghost", "source": "no/such", "destinations": [{"local": "copy/app"}],
    }])
    report = await client.app[REPLICATION].run_rule("ghost")
    assert report.result == "failed" and report.errors
    async with client.get("/metrics") as response:
        assert 'mirror_replication_failures_total{rule="ghost"} 1.0' in await response.text()


async def test_prune_removes_only_tags_the_rule_wrote_that_left_the_source(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await _app_with_rules(aiohttp_client, tmp_path, [{
        "name": "team", "source": "team/app", "prune": True, "destinations": [{"local": "copy/app"}],
    }])
    await push_image(client, "team/app", "1")
    await push_image(client, "team/app", "2", layers=(b"two",))
    await push_image(client, "copy/app", "mine", layers=(b"theirs",))  # not written by the rule
    engine = client.app[REPLICATION]
    await engine.run_rule("team")
    async with client.delete("/v2/team/app/manifests/2") as response:
        assert response.status == 202
    report = await engine.run_rule("team")
    assert report.pruned == 1
    async with client.get("/v2/copy/app/tags/list") as response:
        assert sorted((await response.json())["tags"]) == ["1", "mine"]


async def test_prune_removes_a_tag_that_fell_out_of_the_selection(aiohttp_client: Any, tmp_path: Path) -> None:
    """`latest: 2` and a newer tag pushed: with prune the destination holds the two newest, like the rule."""
    client = await _app_with_rules(aiohttp_client, tmp_path, [{
        "name": "team", "source": "team/app", "prune": True, "tags": {"latest": 2},
        "destinations": [{"local": "copy/app"}],
    }])
    for number in (1, 2):
        await push_image(client, "team/app", f"1.{number}", layers=(f"v{number}".encode(),))
    engine = client.app[REPLICATION]
    await engine.run_rule("team")
    await push_image(client, "team/app", "1.3", layers=(b"v3",))
    report = await engine.run_rule("team")
    assert report.pruned == 1 and report.copied == 1
    async with client.get("/v2/copy/app/tags/list") as response:
        assert sorted((await response.json())["tags"]) == ["1.2", "1.3"]
    async with client.get("/v2/team/app/tags/list") as response:  # the source keeps everything
        assert sorted((await response.json())["tags"]) == ["1.1", "1.2", "1.3"]


async def test_an_on_push_rule_starts_within_seconds_of_a_push(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await _app_with_rules(aiohttp_client, tmp_path, [{
        "name": "team", "source": "team/app", "on_push": True, "tags": {"include": r"v\d+"},
        "destinations": [{"local": "copy/app"}],
    }])
    await push_image(client, "team/app", "v1")
    started = time.monotonic()

    async def copied() -> bool:
        async with client.get("/v2/copy/app/manifests/v1") as response:
            return response.status == 200

    await wait_for(copied, 5, "the pushed tag at the destination")
    assert time.monotonic() - started < 5
    await push_image(client, "team/app", "scratch", layers=(b"x",))  # not selected: no run
    await asyncio.sleep(0.5)
    assert client.app[REPLICATION].state("team").runs == 1


# -- an upstream source: rate limits -----------------------------------------------------------------
async def _upstream_setup(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, fake: FakeUpstream, **rule: Any
) -> tuple[TestClient, ReplicationEngine]:
    server = await aiohttp_server(fake.app())
    config = load_config_data({
        "storage": {"path": str(tmp_path / "data")},
        "upstreams": [{"name": "fake.io", "url": str(server.make_url("")).rstrip("/"), "ratelimit_floor": 5}],
        "local": {"repositories": ["copy/**"]},
        "replication": [{"name": "hub", "source": "fake.io/library/alpine", "destinations": [{"local": "copy/alpine"}],
                         **rule}],
    })
    client = await aiohttp_client(create_app(config))
    engine = ReplicationEngine(client.app, remote=upstream_source_factory(), recheck=0.2, retry_wait=0.05)
    await engine.load()
    return client, engine


def _api_for(engine: ReplicationEngine) -> web.Application:
    from mirror.api.replication import add_replication_routes

    api = web.Application()
    api[REPLICATION] = engine
    add_replication_routes(api)
    return api


async def test_low_ratelimit_remaining_pauses_the_rule_until_the_window_allows(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [b"layer" * 1000])
    fake.ratelimit_remaining = 3  # below the floor of 5
    client, engine = await _upstream_setup(aiohttp_client, aiohttp_server, tmp_path, fake)
    api = await aiohttp_client(_api_for(engine))
    run = asyncio.create_task(engine.run_rule("hub"))
    try:
        await wait_for(lambda: engine.state("hub").paused, 10, "the rule to pause")
        async with api.get("/api/replication") as response:
            state = (await response.json())["rules"][0]
        assert state["paused"]["reason"] == "ratelimit" and state["paused"]["remaining"] == 3
        assert state["paused"]["floor"] == 5 and state["running"]
        async with client.get("/metrics") as response:
            assert 'mirror_replication_paused{reason="ratelimit",rule="hub"} 1.0' in await response.text()
        await asyncio.sleep(0.6)  # a few re-checks, all still at the floor
        assert fake.count("GET", "/manifests/") == 0 and fake.count("GET", "/blobs/") == 0
        assert fake.count("HEAD", "/manifests/") >= 2  # re-checks are HEADs: free under Docker Hub's rules
        # The budget left is the pull-through clients': they are served while replication waits.
        async with client.get("/v2/fake.io/library/alpine/manifests/3.20") as response:
            assert response.status == 200
        assert engine.state("hub").paused is not None
        fake.ratelimit_remaining = 60
        report = await asyncio.wait_for(run, 10)
    finally:
        run.cancel()
    assert report.result == "ok" and report.copied == 1
    assert engine.state("hub").paused is None
    async with client.get("/metrics") as response:
        assert 'mirror_replication_paused{reason="ratelimit",rule="hub"} 0.0' in await response.text()
    async with client.get("/v2/copy/alpine/manifests/3.20") as response:
        assert response.status == 200


async def test_a_429_is_honoured_for_its_retry_after(aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> None:
    fake = FakeUpstream()
    _, body = fake.add_image("library/alpine", "3.20", [b"layer" * 1000])
    fake.faults["/blobs/"] = Fault("429", times=1, retry_after="2")
    client, engine = await _upstream_setup(aiohttp_client, aiohttp_server, tmp_path, fake)
    started = time.monotonic()
    run = asyncio.create_task(engine.run_rule("hub"))
    try:
        pause = await wait_for(lambda: engine.state("hub").paused, 10, "the rule to wait for Retry-After")
        assert pause["reason"] == "retry-after" and pause["until"] >= time.time() + 0.5
        report = await asyncio.wait_for(run, 10)
    finally:
        run.cancel()
    assert report.result == "ok" and report.copied == 1
    assert time.monotonic() - started >= 2.0  # not retried before the upstream said it may be
    assert fake.faults["/blobs/"].times == 0


async def test_an_unchanged_upstream_image_costs_no_get_on_a_rerun(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [b"one", b"two"])
    fake.add_image("library/alpine", "3.19", [b"three"])
    client, engine = await _upstream_setup(aiohttp_client, aiohttp_server, tmp_path, fake)
    assert (await engine.run_rule("hub")).copied == 2
    fake.requests.clear()
    again = await engine.run_rule("hub")
    assert again.result == "ok" and again.unchanged == 2 and again.copied == 0
    assert fake.count("GET", "/manifests/") == 0 and fake.count("GET", "/blobs/") == 0


def test_a_rule_cannot_copy_a_local_repository_onto_itself() -> None:
    with pytest.raises(ConfigError, match=r"^replication\[0\]\.destinations\[0\]\.local:"):
        load_config_data({"replication": [{"name": "loop", "source": "team/app",
                                           "destinations": [{"local": "team/app"}]}]})


async def test_bandwidth_paces_reads_to_the_cap() -> None:
    from mirror.replication.throttle import Bucket

    bucket = Bucket(100_000)  # 100 kB/s, 50 kB of burst
    started = time.monotonic()
    for _ in range(6):
        await bucket.take(50_000)
    elapsed = time.monotonic() - started
    assert elapsed >= 2.4  # 300 kB, 50 kB of it burst: 2.5 s at the cap
    assert elapsed < 10  # generous: only a stall would take this long


async def test_one_rule_runs_once_at_a_time_and_a_trigger_during_a_run_queues(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [b"x" * (1 << 20)])
    fake.blob_delay = 0.05  # 16 pieces of 64 KiB: the first run takes most of a second
    _, engine = await _upstream_setup(aiohttp_client, aiohttp_server, tmp_path, fake)
    first = asyncio.create_task(engine.run_rule("hub"))
    await wait_for(lambda: engine.state("hub").result == "running", 5, "the first run to start")
    assert engine.trigger("hub") == "queued"
    second = asyncio.create_task(engine.run_rule("hub"))
    await asyncio.sleep(0.2)
    assert not second.done() and engine.state("hub").runs == 0
    reports = await asyncio.gather(first, second)
    assert [r.copied for r in reports] == [1, 0]  # the second ran after the first, and found it all there
    await wait_for(lambda: engine.state("hub").runs == 3, 10, "the queued run")
    assert fake.count("GET", "/blobs/") == 2  # config and layer, each sent once, whatever ran after


def test_the_example_rule_in_config_example_yaml_is_valid() -> None:
    import yaml

    text = (Path(__file__).resolve().parents[1] / "config.example.yaml").read_text()
    base = yaml.safe_load(text)
    assert base["replication"] == [] and base["upstreams"][0]["ratelimit_floor"] == 5
    block = text[text.index("# replication:\n"):].split("\n\n", 1)[0]  # the commented rule, to its blank line
    rules = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))
    config = load_config_data({**base, **rules})
    assert config.replication[0].name == "base-images" and len(config.replication[0].destinations) == 5


async def test_at_most_the_bound_of_rules_run_at_once(aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> None:
    fake = FakeUpstream()
    for repo in ("one", "two", "three"):
        fake.add_image(f"library/{repo}", "1", [repo.encode() * (1 << 18)])
    fake.blob_delay = 0.1  # 12+ pieces per image: over a second each
    server = await aiohttp_server(fake.app())
    config = load_config_data({
        "storage": {"path": str(tmp_path / "data")},
        "upstreams": [{"name": "fake.io", "url": str(server.make_url("")).rstrip("/")}],
        "local": {"repositories": ["copy/**"]},
        "replication": [{"name": repo, "source": f"fake.io/library/{repo}", "destinations": [{"local": f"copy/{repo}"}]}
                        for repo in ("one", "two", "three")],
    })
    client = await aiohttp_client(create_app(config))
    engine = ReplicationEngine(client.app, remote=upstream_source_factory(), max_concurrent=2)
    await engine.load()
    runs = [asyncio.create_task(engine.run_rule(name)) for name in ("one", "two", "three")]

    def running() -> int:
        return sum(engine.state(name).result == "running" for name in ("one", "two", "three"))

    await wait_for(lambda: running() == 2, 5, "two rules running")
    most = 0
    while not all(run.done() for run in runs):
        most = max(most, running())
        await asyncio.sleep(0.02)
    assert most == 2
    assert [run.result().result for run in runs] == ["ok", "ok", "ok"]


async def test_a_rule_with_nothing_to_copy_does_not_queue_behind_a_rule_that_copies(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fake = FakeUpstream()
    fake.add_image("library/slow", "1", [b"s" * (1 << 20)])
    fake.add_image("library/done", "1", [b"d" * 4096])
    server = await aiohttp_server(fake.app())
    config = load_config_data({
        "storage": {"path": str(tmp_path / "data")},
        "upstreams": [{"name": "fake.io", "url": str(server.make_url("")).rstrip("/")}],
        "replication": [{"name": repo, "source": f"fake.io/library/{repo}", "destinations": [{"local": f"copy/{repo}"}]}
                        for repo in ("slow", "done")],
    })
    client = await aiohttp_client(create_app(config))
    engine = ReplicationEngine(client.app, remote=upstream_source_factory(), max_concurrent=1)
    await engine.load()
    assert (await engine.run_rule("done")).copied == 1
    fake.blob_delay = 0.2  # 16 pieces of 64 KiB: the slow rule holds the only slot for over 3 s
    slow = asyncio.create_task(engine.run_rule("slow"))
    await wait_for(lambda: engine.state("slow").result == "running", 5, "the slow rule to take the slot")
    rerun = await asyncio.wait_for(engine.run_rule("done"), 2.5)  # it would wait for the slot: 3 s and more
    assert (rerun.result, rerun.unchanged, rerun.copied) == ("ok", 1, 0)
    assert not slow.done()
    assert (await slow).copied == 1


async def test_a_rerun_after_a_quiet_spell_reuses_the_connections_to_the_source(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Past aiohttp's default keep-alive (15 s) every request of a rerun would open a new connection
    (over the internet: a TCP and a TLS handshake each)."""
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [b"layer"])
    fake.add_image("library/alpine", "3.21", [b"other layer"])
    peers: list[tuple[str, object]] = []

    @web.middleware
    async def note_peer(request: web.Request, handler: Any) -> web.StreamResponse:
        peers.append((request.path, request.transport.get_extra_info("peername") if request.transport else None))
        return await handler(request)

    app = fake.app()
    app.middlewares.append(note_peer)
    server = await aiohttp_server(app)
    config = load_config_data({
        "storage": {"path": str(tmp_path / "data")},
        "upstreams": [{"name": "fake.io", "url": str(server.make_url("")).rstrip("/")}],
        "replication": [{"name": "hub", "source": "fake.io/library/alpine",
                         "destinations": [{"local": "copy/alpine"}]}],
    })
    client = await aiohttp_client(create_app(config))
    engine = ReplicationEngine(client.app, remote=upstream_source_factory())
    await engine.load()
    assert (await engine.run_rule("hub")).copied == 2
    first = {peer for _, peer in peers}
    peers.clear()
    await asyncio.sleep(16)
    rerun = await engine.run_rule("hub")
    assert (rerun.result, rerun.unchanged) == ("ok", 2)
    assert peers and all(path.startswith("/v2/") for path, _ in peers)
    assert {peer for _, peer in peers} <= first, "the rerun opened new connections to the source"


async def test_an_interrupted_run_resumes_without_fetching_completed_blobs_again(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    from mirror.oci.digest import Digest
    from mirror.state import ROUTER
    from tests.fake_upstream import digest_of

    small, large = b"small layer", b"L" * (2 << 20)
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3.20", [small, large])
    fake.blob_delay = 0.3  # the large layer takes ~10 s: the run is stopped while it streams, even on a slow machine
    client, engine = await _upstream_setup(aiohttp_client, aiohttp_server, tmp_path, fake)
    local = client.app[ROUTER].local
    run = asyncio.create_task(engine.run_rule("hub"))

    async def small_arrived() -> bool:
        try:
            await local.stat_blob("copy/alpine", Digest.parse(digest_of(small)))
            return True
        except Exception:  # noqa: BLE001 - not there yet
            return False

    async def large_streaming() -> bool:
        return fake.count("GET", f"/blobs/{digest_of(large)}") == 1

    await wait_for(small_arrived, 10, "the small layer at the destination")
    # The layers may be copied one after the other: stop only once the large one is on its way.
    await wait_for(large_streaming, 10, "the large layer's download to start")
    run.cancel()  # what a kill or a shutdown does to a run in the middle
    with pytest.raises(asyncio.CancelledError):
        await run
    assert engine.state("hub").result == "running"

    restarted = ReplicationEngine(client.app, remote=upstream_source_factory(), recheck=0.2)
    await restarted.load()  # reads the state the interrupted run left on disk
    assert restarted.state("hub").result == "running"
    fake.blob_delay = 0.0
    report = await restarted.run_rule("hub")
    assert report.result == "ok" and report.copied == 1 and restarted.state("hub").resumed
    assert fake.count("GET", f"/blobs/{digest_of(small)}") == 1  # not sent again
    assert fake.count("GET", f"/blobs/{digest_of(large)}") == 2  # the unfinished one was


def test_ratelimit_headers_and_retry_after_are_read_as_docker_hub_sends_them() -> None:
    import email.utils

    from mirror.upstream.ratelimit import RateLimitReading, parse_quota, parse_retry_after

    assert parse_quota("76;w=21600") == (76, 21600.0)
    assert parse_quota("") == (None, None) and parse_quota("lots") == (None, None)
    assert parse_retry_after("30") == 30.0 and parse_retry_after(None) == 60.0
    assert parse_retry_after("99999999") == 6 * 3600.0  # bounded
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= parse_retry_after(in_a_minute) <= 61
    reading = RateLimitReading()
    reading.observe(200, {"ratelimit-remaining": "4;w=21600", "ratelimit-limit": "100;w=21600"})
    assert (reading.remaining, reading.limit, reading.window) == (4, 100, 21600.0)
    reading.observe(200, {"ratelimit-remaining": ""})  # sometimes empty: the last reading stands
    assert reading.remaining == 4
    reading.observe(429, {"Retry-After": "5"})
    assert reading.blocked_until >= time.time() + 4


async def test_a_serving_engine_keeps_its_rules_locks_and_another_process_is_told_so(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a server owns the data directory it keeps each rule's run lock from the rule's first run on
    (no lock file taken and given back at every run). Anything else that tries to run the rule there (a
    second server, a `mirror sync` started just before the server) gets a failed run that says where the
    rule runs, not a wait without end."""
    monkeypatch.setattr(engine_module, "SERVER_CHECK_AFTER", 0.5)
    client = await _app_with_rules(aiohttp_client, tmp_path, [{
        "name": "team", "source": "team/app", "destinations": [{"local": "copy/app"}],
    }])
    await push_image(client, "team/app", "1")
    serving = client.app[REPLICATION]
    assert serving.scheduling and (await serving.run_rule("team")).copied == 1
    async with open_app(client.app[CONFIG]) as other:  # the stores a `mirror sync` opens
        report = await asyncio.wait_for(other[REPLICATION].run_rule("team"), 10)
    assert report.result == "failed" and "the mirror serve that owns" in report.errors[0], report
    assert (await serving.run_rule("team")).unchanged == 1  # the server goes on running it
