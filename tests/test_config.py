"""Configuration: defaults, YAML loading, ${ENV} expansion, and errors that name the key at fault."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.config import Config, ConfigError, load_config, load_config_data, parse_duration, parse_size

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "mirror.yml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def config_errors(data: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config_data(data)
    return caught.value.errors


def config_error(data: Any) -> str:
    """The one problem of `data`: one mistake is one message, never a cascade of follow-on errors."""
    errors = config_errors(data)
    assert len(errors) == 1, errors
    return errors[0]


# -- defaults -------------------------------------------------------------------------------------
def test_no_file_runs_the_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKERHUB_USER", raising=False)
    monkeypatch.delenv("DOCKERHUB_TOKEN", raising=False)
    config = load_config(None)
    assert str(config.listen) == "0.0.0.0:5000"
    assert config.storage.path == Path("./data")
    assert config.storage.delete is True
    assert config.storage.max_size is None
    assert config.limits.manifest_bytes == 4 * 1024 * 1024
    assert config.limits.page_size_max == 1000
    assert [u.name for u in config.upstreams] == ["docker.io", "ghcr.io", "quay.io"]
    assert config.default_upstream is not None and config.default_upstream.name == "docker.io"
    assert config.default_upstream.url == "https://registry-1.docker.io"
    assert config.default_upstream.library_prefix is True
    # Credentials come from the environment; unset means anonymous, not the empty string.
    assert config.default_upstream.username is None and config.default_upstream.password is None
    assert config.local.repositories == ("local/**",)


def test_default_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKERHUB_USER", "alice")
    monkeypatch.setenv("DOCKERHUB_TOKEN", "s3cret")
    upstream = load_config(None).default_upstream
    assert upstream is not None
    assert (upstream.username, upstream.password) == ("alice", "s3cret")


def test_an_empty_mapping_is_a_private_registry() -> None:
    config = load_config_data({})
    assert config.upstreams == ()
    assert config.default_upstream is None
    assert config.local.repositories == ()


# -- loading --------------------------------------------------------------------------------------
def test_yaml_file_is_loaded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen: 127.0.0.1:5555
storage:
  path: /srv/mirror
  delete: false
  max_size: 500MiB
  high_watermark: 0.9
  low_watermark: 0.5
  temp_grace: 5m
limits:
  manifest_bytes: 8MiB
  page_size_max: 50
upstreams:
  - name: docker.io
    url: https://registry-1.docker.io/
    default: true
    tag_ttl: 60s
    timeout: 10s
  - name: ghcr.io
    url: https://ghcr.io
    auth_hosts: [auth.example.com]
    offline: true
local:
  repositories: ["team/**", "infra/*"]
""",
    )
    config = load_config(path)
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 5555)
    assert config.storage.path == Path("/srv/mirror")
    assert config.storage.delete is False
    assert config.storage.max_size == 500 * 1024 * 1024
    assert (config.storage.high_watermark, config.storage.low_watermark) == (0.9, 0.5)
    assert config.storage.temp_grace == 300.0
    assert config.limits.manifest_bytes == 8 * 1024 * 1024
    assert config.limits.page_size_max == 50
    hub, ghcr = config.upstreams
    assert hub.url == "https://registry-1.docker.io"  # trailing slash dropped
    assert hub.default and hub.library_prefix
    assert (hub.tag_ttl, hub.timeout) == (60.0, 10.0)
    assert ghcr.auth_hosts == ("auth.example.com",)
    assert ghcr.offline and not ghcr.default and not ghcr.library_prefix
    assert config.local.repositories == ("team/**", "infra/*")


def test_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRROR_TEST_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("MIRROR_TEST_PORT", "6001")
    monkeypatch.setenv("MIRROR_TEST_USER", "bob")
    monkeypatch.delenv("MIRROR_TEST_UNSET", raising=False)
    path = write(
        tmp_path,
        {
            "listen": "127.0.0.1:${MIRROR_TEST_PORT}",
            "storage": {"path": "${MIRROR_TEST_DATA}/store", "max_size": "${MIRROR_TEST_UNSET}4MB"},
            "upstreams": [
                {
                    "name": "ghcr.io",
                    "url": "https://ghcr.io",
                    "username": "${MIRROR_TEST_USER}",
                    "password": "${MIRROR_TEST_UNSET}",
                }
            ],
        },
    )
    config = load_config(path)
    assert config.listen.port == 6001
    assert config.storage.path == tmp_path / "d" / "store"
    assert config.storage.max_size == 4_000_000
    assert config.upstreams[0].username == "bob"
    assert config.upstreams[0].password is None  # unset variable: no credential at all


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500MiB", 500 * 2**20), ("4MB", 4 * 10**6), ("1GiB", 2**30), ("2kb", 2000), ("10", 10), ("1.5KiB", 1536),
     ("7 B", 7), (1234, 1234), ("50GiB", 50 * 2**30)],
)
def test_sizes(text: Any, expected: int) -> None:
    assert parse_size(text, "storage.max_size") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("60s", 60.0), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0), ("250ms", 0.25), ("1.5m", 90.0), (30, 30.0),
     ("45", 45.0)],
)
def test_durations(text: Any, expected: float) -> None:
    assert parse_duration(text, "storage.temp_grace") == expected


@pytest.mark.parametrize("bad", ["lots", "5 parsecs", "-1MB", "", "MB", True, [], 1.5, -3])
def test_bad_sizes_name_the_key(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^storage\.max_size:"):
        parse_size(bad, "storage.max_size")
    assert "storage.max_size" in config_error({"storage": {"max_size": bad}})


@pytest.mark.parametrize("bad", ["soon", "5 minutes", "-5s", "", "m", True, {}, -1])
def test_bad_durations_name_the_key(bad: Any) -> None:
    assert config_error({"storage": {"temp_grace": bad}}).startswith("storage.temp_grace:")
    upstream = {"name": "ghcr.io", "url": "https://ghcr.io", "tag_ttl": bad}
    assert config_error({"upstreams": [upstream]}).startswith("upstreams[0].tag_ttl:")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"colour": "blue"}, "colour"),
        ({"storage": {"pth": "/x"}}, "storage.pth"),
        ({"limits": {"manifest_size": 1}}, "limits.manifest_size"),
        ({"local": {"repos": []}}, "local.repos"),
        ({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "passwd": "x"}]}, "upstreams[0].passwd"),
        ({"listen": "nohost"}, "listen"),
        ({"listen": 5000}, "listen"),
        ({"listen": ":5000"}, "listen"),
        ({"listen": "127.0.0.1:99999"}, "listen"),
        ({"listen": "127.0.0.1:http"}, "listen"),
        ({"storage": "/data"}, "storage"),
        ({"storage": {"max_size": "huge"}}, "storage.max_size"),
        ({"storage": {"delete": "yes please"}}, "storage.delete"),
        ({"storage": {"path": 5}}, "storage.path"),
        ({"storage": {"high_watermark": 1.5}}, "storage.high_watermark"),
        ({"storage": {"low_watermark": 0}}, "storage.low_watermark"),
        ({"storage": {"high_watermark": 0.5, "low_watermark": 0.6}}, "storage.low_watermark"),
        ({"limits": {"page_size_max": 0}}, "limits.page_size_max"),
        ({"limits": {"page_size_max": "many"}}, "limits.page_size_max"),
        ({"limits": {"manifest_bytes": "10B"}}, "limits.manifest_bytes"),
        ({"upstreams": {"name": "x"}}, "upstreams"),
        ({"upstreams": [{"name": "ghcr.io", "url": "ftp://ghcr.io"}]}, "upstreams[0].url"),
        ({"upstreams": [{"name": "ghcr.io", "url": "https://"}]}, "upstreams[0].url"),
        ({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io/v2/"}]}, "upstreams[0].url"),
        ({"upstreams": [{"name": "ghcr.io"}]}, "upstreams[0].url"),
        ({"upstreams": [{"name": "GHCR", "url": "https://ghcr.io"}]}, "upstreams[0].name"),
        ({"upstreams": [{"name": "a/b", "url": "https://ghcr.io"}]}, "upstreams[0].name"),
        ({"upstreams": [{"url": "https://ghcr.io"}]}, "upstreams[0].name"),
        ({"upstreams": ["ghcr.io"]}, "upstreams[0]"),
        (
            {"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io"}, {"name": "quay.io", "url": "ftp://q"}]},
            "upstreams[1].url",
        ),
        (
            {"upstreams": [{"name": "ghcr.io", "url": "https://a"}, {"name": "ghcr.io", "url": "https://b"}]},
            "upstreams[1].name",
        ),
        ({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "timeout": 0}]}, "upstreams[0].timeout"),
        ({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "auth_hosts": "x"}]}, "upstreams[0].auth_hosts"),
        ({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "default": "true"}]}, "upstreams[0].default"),
        ({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "ca_file": "/no/such/ca.pem"}]},
         "upstreams[0].ca_file"),
        ({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "ca_file": 5}]}, "upstreams[0].ca_file"),
        ({"local": {"repositories": "team/**"}}, "local.repositories"),
        ({"local": {"repositories": [""]}}, "local.repositories"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, Any], key: str) -> None:
    message = config_error(data)
    assert message.startswith(f"{key}:") or message.startswith(f"{key} "), message


def test_two_defaults_are_refused() -> None:
    message = config_error(
        {
            "upstreams": [
                {"name": "ghcr.io", "url": "https://ghcr.io", "default": True},
                {"name": "quay.io", "url": "https://quay.io", "default": True},
            ]
        }
    )
    assert message.startswith("upstreams")


# The issue 9 example: a file with a bad listen, a bad max_size, a bad upstream URL, a bad tag_ttl and an
# unknown key. Before, only the first (listen) was reported; fixing a file took one run per mistake.
FIVE_MISTAKES = """
listen: everywhere
storage:
  path: /tmp/mirror-five-mistakes
  max_size: lots
upstreams:
  - name: docker.io
    url: gopher://registry-1.docker.io
    tag_ttl: soon
colour: blue
"""
FIVE_KEYS = ["listen", "storage.max_size", "upstreams[0].url", "upstreams[0].tag_ttl", "colour"]


def test_every_error_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, FIVE_MISTAKES))
    assert [message.split(":")[0] for message in caught.value.errors] == FIVE_KEYS
    assert str(caught.value).splitlines() == list(caught.value.errors)


@pytest.mark.parametrize(
    ("data", "keys"),
    [
        # A section that is not a mapping is one error; its siblings are still read.
        ({"storage": "/data", "limits": {"page_size_max": 0}, "local": 5},
         ["storage", "limits.page_size_max", "local"]),
        # An upstream that cannot be used does not stop the next one from being checked.
        ({"upstreams": ["ghcr.io", {"name": "quay.io", "url": "ftp://q"}, {"name": "Bad", "url": "https://b"}]},
         ["upstreams[0]", "upstreams[1].url", "upstreams[2].name"]),
        # Every unknown key, not only the first.
        ({"colour": 1, "storage": {"pth": "/x", "max_size": "1GiB", "size": 2}, "zzz": 0},
         ["storage.pth", "storage.size", "colour", "zzz"]),
        # A bad watermark is reported once, without a made-up comparison against its default.
        ({"storage": {"high_watermark": 1.5, "low_watermark": 0.96}}, ["storage.high_watermark"]),
        ({"uploads": {"expire": "0s", "max_bytes": "lots", "extra": 1}, "limits": {"page_size_max": 0},
          "log": {"level": "loud", "format": "xml"}},
         ["limits.page_size_max", "uploads.expire", "uploads.max_bytes", "uploads.extra", "log.level", "log.format"]),
        # Sections parsed elsewhere (replication rules) and secrets are collected with the rest.
        ({"listen": "x", "upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "password": 5,
                                        "ratelimit_floor": -1}], "replication": "nope"},
         ["listen", "upstreams[0].password", "upstreams[0].ratelimit_floor", "replication"]),
        ({"upstreams": [{"name": "ghcr.io", "url": "https://a", "timeout": 0, "default": "yes", "passwd": "x"},
                        {"name": "ghcr.io", "url": "https://b"}]},
         ["upstreams[0].default", "upstreams[0].timeout", "upstreams[0].passwd", "upstreams[1].name"]),
    ],
)
def test_errors_are_collected_without_follow_on_errors(data: dict[str, Any], keys: list[str]) -> None:
    assert [message.split(":")[0] for message in config_errors(data)] == keys


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "storage: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a list\n- not a mapping\n"))


def test_effective_config_round_trips(tmp_path: Path) -> None:
    """What check-config prints is itself a valid config that means the same thing."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    original = load_config_data(
        {
            "listen": "127.0.0.1:5001",
            "storage": {"path": str(tmp_path), "max_size": "1GiB", "temp_grace": "10m"},
            "upstreams": [
                {"name": "ghcr.io", "url": "https://ghcr.io", "default": True, "username": "u"},
                {"name": "registry.internal", "url": "https://registry.internal", "ca_file": str(ca_file)},
            ],
            "local": {"repositories": ["team/**"]},
        }
    )
    assert original.upstreams[1].ca_file == ca_file
    again = load_config_data(yaml.safe_load(yaml.safe_dump(original.to_dict())))
    assert isinstance(again, Config)
    assert again == original
    # The defaults print nulls (no max_size, no credentials, no CA file): those read back as the defaults.
    private = load_config_data({})
    assert load_config_data(yaml.safe_load(yaml.safe_dump(private.to_dict()))) == private
    unbounded = load_config_data({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io"}]})
    assert load_config_data(yaml.safe_load(yaml.safe_dump(unbounded.to_dict()))) == unbounded


def test_password_is_masked_in_the_effective_config() -> None:
    config = load_config_data({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "password": "hunter2"}]})
    assert config.upstreams[0].password == "hunter2"
    assert "hunter2" not in yaml.safe_dump(config.to_dict())


def test_password_is_in_no_repr() -> None:
    """A config (or an upstream's) in a log line, an assertion message or a traceback's locals."""
    config = load_config_data({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "username": "bot",
                                              "password": "hunter2"}]})
    for shown in (repr(config), str(config), repr(config.upstreams[0]), f"{config.upstreams!r}"):
        assert "hunter2" not in shown
        assert "ghcr.io" in shown  # the rest is still there to read
    assert "username='bot'" in repr(config.upstreams[0])


@pytest.mark.parametrize("password", [123456789, True, ["hunter2"]])
def test_a_password_of_the_wrong_type_is_not_repeated_in_the_error(password: Any) -> None:
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.password: expected a string") as caught:
        load_config_data({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "password": password}]})
    assert str(password) not in str(caught.value)
    assert "hunter2" not in str(caught.value)


# -- the CLI --------------------------------------------------------------------------------------
def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "listen": "127.0.0.1:5999",
            "storage": {"path": str(tmp_path / "data"), "max_size": "500MiB"},
            "upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io", "password": "${MIRROR_TEST_SECRET}"}],
        },
    )
    result = run_cli("check-config", "--config", str(path), env={"MIRROR_TEST_SECRET": "topsecret"})
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["listen"] == "127.0.0.1:5999"
    assert printed["storage"]["path"] == str(tmp_path / "data")
    assert printed["storage"]["max_size"] == 500 * 2**20
    assert printed["limits"]["page_size_max"] == 1000  # defaults are filled in
    assert printed["upstreams"][0]["url"] == "https://ghcr.io"
    assert "topsecret" not in result.stdout


def test_check_config_without_a_file_prints_the_defaults() -> None:
    result = run_cli("check-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert [u["name"] for u in printed["upstreams"]] == ["docker.io", "ghcr.io", "quay.io"]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"storage": {"max_size": "lots"}}, "storage.max_size"),
        ({"upstreams": [{"name": "ghcr.io", "url": "gopher://x"}]}, "upstreams[0].url"),
        ({"listen": "everywhere"}, "listen"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_check_config_rejects_a_bad_file_naming_the_key(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    result = run_cli("check-config", "--config", str(write(tmp_path, data)))
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_config_reports_every_error_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FIVE_MISTAKES)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"mirror: 5 config errors in {path}:"
    assert [line.strip().split(":")[0] for line in lines[1:]] == FIVE_KEYS
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_file_reports_every_error_and_exits(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(write(tmp_path, FIVE_MISTAKES)))
    assert result.returncode == 2
    assert [line.strip().split(":")[0] for line in result.stderr.splitlines()[1:]] == FIVE_KEYS


def test_check_config_on_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "nope.yml"))
    assert result.returncode == 2
    assert "nope.yml" in result.stderr


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"uploads": {"expire": 0}}, "uploads.expire"),
        ({"uploads": {"expire": "soon"}}, "uploads.expire"),
        ({"uploads": {"max_bytes": "lots"}}, "uploads.max_bytes"),
        ({"uploads": {"max_bytes": 0}}, "uploads.max_bytes"),
        ({"uploads": {"expires": "1h"}}, "uploads.expires"),
        ({"uploads": "24h"}, "uploads"),
    ],
)
def test_bad_upload_settings_name_the_key(data: dict[str, Any], key: str) -> None:
    message = config_error(data)
    assert message.startswith(f"{key}:"), message


def test_upload_settings_default_to_a_day_and_20_gib() -> None:
    from mirror.config import UploadsConfig

    assert load_config_data({}).uploads == UploadsConfig(expire=86400.0, max_bytes=20 * 2**30)
    uploads = load_config_data({"uploads": {"expire": "30m", "max_bytes": "5GiB"}}).uploads
    assert (uploads.expire, uploads.max_bytes) == (1800.0, 5 * 2**30)
    effective = load_config_data({"uploads": {"expire": "2h"}}).to_dict()
    assert load_config_data(yaml.safe_load(yaml.safe_dump(effective))).uploads.expire == 7200.0
