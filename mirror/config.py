"""Typed, frozen configuration: YAML with ${ENV} expansion, validated before the server starts.

`mirror serve` with no file runs on the embedded defaults (`default_config()`); every error names the
key that is wrong, so an operator can fix a file without reading code.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from mirror.oci.names import is_valid_name

if TYPE_CHECKING:
    from mirror.replication.rules import Rule


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 5000

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path = Path("./data")
    delete: bool = True  # DELETE of local manifests, tags and blobs
    max_size: int | None = None  # bytes of cached upstream content; None = unbounded
    high_watermark: float = 0.95  # eviction starts above this fraction of max_size
    low_watermark: float = 0.85  # and removes least recently used blobs down to this fraction
    temp_grace: float = 3600.0  # seconds; temp files older than this are removed at start-up


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    manifest_bytes: int = 4 * 1024 * 1024
    page_size_max: int = 1000  # cap on `n` for _catalog and tags/list (CVE-2023-2253)


@dataclass(frozen=True, slots=True)
class UploadsConfig:
    expire: float = 86400.0  # seconds without a byte received before a push session is removed
    max_bytes: int = 20 * 2**30  # bytes all unfinished push sessions may hold together


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str
    default: bool = False
    username: str | None = None
    # Never in a repr (a config logged or printed in a traceback); to_dict() masks it.
    password: str | None = field(default=None, repr=False)
    tag_ttl: float = 60.0
    auth_hosts: tuple[str, ...] = ()
    offline: bool = False
    timeout: float = 30.0  # connect + first byte; streaming bodies are not bounded by it
    # Docker Hub keeps official images under library/; only that registry gets the implicit prefix.
    library_prefix: bool = False
    # PEM bundle of CAs to trust for this upstream instead of the system's (a registry behind a private CA).
    ca_file: Path | None = None
    # Replication's GETs pause while this upstream announces this many pulls left or fewer
    # (`ratelimit-remaining`): what remains of the budget is kept for pull-through clients.
    ratelimit_floor: int = 5

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


@dataclass(frozen=True, slots=True)
class LocalConfig:
    repositories: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    local: LocalConfig = field(default_factory=LocalConfig)
    replication: tuple[Rule, ...] = ()  # mirror/replication/rules.py
    replication_concurrency: int = 4  # rules run at once (mirror serve's scheduler and mirror sync)

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.default), None)

    def to_dict(self) -> dict[str, Any]:
        """The effective config as plain data (for `check-config`); passwords are masked."""
        data = asdict(self)
        data["replication"] = [rule.to_dict() for rule in self.replication]
        data["listen"] = str(self.listen)
        data["storage"]["path"] = str(self.storage.path)
        for upstream in data["upstreams"]:
            if upstream["password"]:
                upstream["password"] = "***"
            upstream["auth_hosts"] = list(upstream["auth_hosts"])
            upstream["ca_file"] = str(upstream["ca_file"]) if upstream["ca_file"] else None
        data["upstreams"] = list(data["upstreams"])
        data["local"]["repositories"] = list(self.local.repositories)
        return data


DEFAULT_LOCAL_NAMESPACES = ("local/**",)


def default_config() -> Config:
    """What `mirror serve` runs with no file: Docker Hub as the default upstream, GHCR and Quay by prefix
    or `?ns=`, and `local/**` for pushes."""
    return load_config_data(
        {
            "upstreams": [
                {
                    "name": "docker.io",
                    "url": "https://registry-1.docker.io",
                    "default": True,
                    "username": "${DOCKERHUB_USER}",
                    "password": "${DOCKERHUB_TOKEN}",
                    # Docker Hub hands out tokens from another host than the registry's.
                    "auth_hosts": ["auth.docker.io"],
                },
                {"name": "ghcr.io", "url": "https://ghcr.io"},
                {"name": "quay.io", "url": "https://quay.io"},
            ],
            "local": {"repositories": list(DEFAULT_LOCAL_NAMESPACES)},
        }
    )


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def _expand_env(value: Any) -> Any:
    """Replace ${VAR} in every string; an unset variable becomes empty (optional credentials)."""
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


def parse_duration(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if not match:
        raise ConfigError(f"{key}: expected a duration like 60s, 5m or 1h, got {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        raise ConfigError(f"{key}: expected a size like 500MiB or 50GiB, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


class _Section:
    """Reads one mapping of the file, remembering its key path for error messages."""

    def __init__(self, data: Any, key: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.key = key
        self.used: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.data

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path(name)}: expected true or false, got {value!r}")
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.get(name, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{self.path(name)}: expected a string, got {value!r}")
        return value

    def fraction(self, name: str, default: float) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f"{self.path(name)}: expected a number in (0, 1], got {value!r}")
        return float(value)

    def section(self, name: str) -> _Section:
        return _Section(self.get(name), self.path(name))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.path(unknown[0])}: unknown key")


def _parse_listen(value: Any) -> Listen:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"listen: expected host:port, got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535 or not host:
        raise ConfigError(f"listen: expected host:port with a port from 0 to 65535, got {value!r}")
    return Listen(host, int(port_text))


def _parse_upstream(raw: Any, index: int) -> UpstreamConfig:
    section = _Section(raw, f"upstreams[{index}]")
    name = section.string("name")
    if not name or not is_valid_name(name) or "/" in name:
        raise ConfigError(f"{section.path('name')}: expected a registry host name like docker.io, got {name!r}")
    url = section.string("url")
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError(f"{section.path('url')}: expected http(s)://host[:port], got {url!r}")
    auth_hosts = section.get("auth_hosts", [])
    if not isinstance(auth_hosts, list) or not all(isinstance(h, str) and h for h in auth_hosts):
        raise ConfigError(f"{section.path('auth_hosts')}: expected a list of host names")
    timeout = parse_duration(section.get("timeout", 30), section.path("timeout"))
    if timeout <= 0:
        raise ConfigError(f"{section.path('timeout')}: must be more than 0")
    ca_text = section.string("ca_file")
    ca_file = Path(ca_text) if ca_text else None
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(f"{section.path('ca_file')}: no such file: {ca_text}")
    upstream = UpstreamConfig(
        name=name,
        url=(url or "").rstrip("/"),
        default=section.boolean("default", False),
        username=section.string("username") or None,
        password=_secret(section, "password"),
        tag_ttl=parse_duration(section.get("tag_ttl", 60), section.path("tag_ttl")),
        auth_hosts=tuple(auth_hosts),
        offline=section.boolean("offline", False),
        timeout=timeout,
        library_prefix=section.boolean("library_prefix", name == "docker.io"),
        ca_file=ca_file,
        ratelimit_floor=_non_negative_int(section.get("ratelimit_floor", 5), section.path("ratelimit_floor")),
    )
    section.finish()
    return upstream


def _non_negative_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: expected a whole number, 0 or more, got {value!r}")
    return value


def _secret(section: _Section, name: str) -> str | None:
    """A string whose value an error message must not repeat (it is printed and logged)."""
    value = section.get(name)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{section.path(name)}: expected a string, got a {type(value).__name__} (value not shown)")
    return value or None


def _parse_local_patterns(section: _Section) -> tuple[str, ...]:
    patterns = section.get("repositories", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"{section.path('repositories')}: expected a list of name patterns like team/**")
    return tuple(patterns)


def _parse_uploads(section: _Section) -> UploadsConfig:
    defaults = UploadsConfig()
    expire = parse_duration(section.get("expire", defaults.expire), section.path("expire"))
    if expire <= 0:
        raise ConfigError(f"{section.path('expire')}: must be more than 0")
    max_bytes = parse_size(section.get("max_bytes", defaults.max_bytes), section.path("max_bytes"))
    if max_bytes < 1:
        raise ConfigError(f"{section.path('max_bytes')}: must be at least 1 byte")
    section.finish()
    return UploadsConfig(expire=expire, max_bytes=max_bytes)


def load_config_data(data: Any) -> Config:
    """Build a Config from parsed YAML (after ${ENV} expansion); raises ConfigError naming the key."""
    root = _Section(_expand_env(data), "")
    listen = _parse_listen(root.get("listen", "0.0.0.0:5000"))

    storage_section = root.section("storage")
    max_size_raw = storage_section.get("max_size")
    storage = StorageConfig(
        path=Path(storage_section.string("path", "./data") or "./data"),
        delete=storage_section.boolean("delete", True),
        max_size=None if max_size_raw is None else parse_size(max_size_raw, storage_section.path("max_size")),
        high_watermark=storage_section.fraction("high_watermark", 0.95),
        low_watermark=storage_section.fraction("low_watermark", 0.85),
        temp_grace=parse_duration(
            storage_section.get("temp_grace", 3600), storage_section.path("temp_grace")
        ),
    )
    if storage.low_watermark >= storage.high_watermark:
        raise ConfigError("storage.low_watermark: must be below storage.high_watermark")
    storage_section.finish()

    limits_section = root.section("limits")
    manifest_bytes = parse_size(limits_section.get("manifest_bytes", 4 * 1024 * 1024), "limits.manifest_bytes")
    page_size_max = limits_section.get("page_size_max", 1000)
    if isinstance(page_size_max, bool) or not isinstance(page_size_max, int) or page_size_max < 1:
        raise ConfigError(f"limits.page_size_max: expected a positive integer, got {page_size_max!r}")
    if manifest_bytes < 1024:
        raise ConfigError("limits.manifest_bytes: must be at least 1KiB")
    limits = LimitsConfig(manifest_bytes=manifest_bytes, page_size_max=page_size_max)
    limits_section.finish()

    uploads = _parse_uploads(root.section("uploads"))

    raw_upstreams = root.get("upstreams", [])
    if raw_upstreams is None:
        raw_upstreams = []
    if not isinstance(raw_upstreams, list):
        raise ConfigError("upstreams: expected a list")
    upstreams = tuple(_parse_upstream(raw, i) for i, raw in enumerate(raw_upstreams))
    names = [u.name for u in upstreams]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"upstreams[{i}].name: {name!r} is configured twice")
    if sum(u.default for u in upstreams) > 1:
        raise ConfigError("upstreams: only one upstream may be default: true")

    local_section = root.section("local")
    local = LocalConfig(repositories=_parse_local_patterns(local_section))
    local_section.finish()
    from mirror.replication.rules import parse_rules  # imports this module: loaded once it is complete

    replication = parse_rules(root.get("replication"), upstreams)
    replication_concurrency = _non_negative_int(root.get("replication_concurrency", 4), "replication_concurrency")
    if replication_concurrency < 1:
        raise ConfigError("replication_concurrency: must be at least 1")
    root.finish()
    return Config(
        listen=listen, storage=storage, limits=limits, uploads=uploads, upstreams=upstreams, local=local,
        replication=replication, replication_concurrency=replication_concurrency,
    )


def load_config(path: Path | None) -> Config:
    """Load a YAML file, or the embedded defaults when `path` is None."""
    if path is None:
        return default_config()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    return load_config_data(data)
