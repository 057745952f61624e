"""Typed, frozen configuration: YAML with ${ENV} expansion, validated before the server starts.

`mirror serve` with no file runs on the embedded defaults (`default_config()`); every error names the
key that is wrong, so an operator can fix a file without reading code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import yaml

from mirror.oci.names import is_valid_name

if TYPE_CHECKING:
    from mirror.auth.settings import SecurityConfig
    from mirror.replication.rules import Rule

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or values that cannot be used: every problem found, each naming its key."""

    def __init__(self, *errors: str) -> None:
        super().__init__("\n".join(errors))
        self.errors: tuple[str, ...] = errors


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 5000

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


STORAGE_BACKENDS = ("fs", "s3")


@dataclass(frozen=True, slots=True)
class S3Config:
    """`storage.s3`: the bucket blob bytes go to with `storage.backend: s3` (mirror/storage/s3.py)."""

    bucket: str
    endpoint: str | None = None  # http(s)://host[:port] of an S3-compatible server; None: AWS
    region: str = "us-east-1"
    access_key: str | None = None  # None: botocore's own chain (environment, ~/.aws, instance role)
    secret_key: str | None = field(default=None, repr=False)  # never printed: check-config shows ***
    path_style: bool = True  # http://endpoint/bucket/key (what S3-compatible servers need); false: virtual-host
    presign: bool = False  # blob GETs may be answered with a redirect to a presigned URL
    presign_expires: float = 900.0  # seconds a presigned URL stays valid
    # Bytes the pull-through cache's shared tier may hold in the bucket, for the whole cluster (one LRU in
    # the coordinator: Redis with cluster.redis); None = unbounded.
    cache_max_size: int | None = None


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path = Path("./data")
    backend: str = "fs"  # where blob bytes live: fs (under `path`) or s3 (`s3`)
    s3: S3Config | None = None
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
    # Serving an image manifest fetched from this upstream starts downloads of its config and layers at
    # once, at most `prefetch_concurrency` at a time (blob GETs only: no pull budget is spent).
    prefetch: bool = True
    prefetch_concurrency: int = 8

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


@dataclass(frozen=True, slots=True)
class LocalConfig:
    repositories: tuple[str, ...] = ()


def _no_security() -> SecurityConfig:
    from mirror.auth.settings import SecurityConfig  # not at the top: that module reads sections with ours

    return SecurityConfig()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("plain", "json")


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "INFO"
    format: str = "plain"  # plain or json (one object per line)


def _parse_log_level(value: Any, key: str) -> str:
    level = str(value).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{key}: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def _parse_log_format(value: Any, key: str) -> str:
    fmt = str(value).lower()
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"{key}: expected one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    return fmt


def _parse_log(section: _Section) -> LogConfig:
    return LogConfig(
        level=section.value("level", "INFO", _parse_log_level),
        format=section.value("format", "plain", _parse_log_format),
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    created_series: bool = False  # prometheus-client's `_created` samples: doubles the series, no panel uses them


def _parse_metrics(section: _Section) -> MetricsConfig:
    return MetricsConfig(created_series=section.boolean("created_series", False))


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Several mirror nodes coordinated through one Redis (mirror/coordination/redis.py)."""

    redis: str  # redis://host:port/db, rediss://... or unix:///path
    prefix: str = "mirror"  # every key this cluster writes starts with `<prefix>:`
    # This node's address for the other nodes (http://host:port, no path): the name in its fill leases,
    # where followers stream a fill in progress from. With `secret`, fills are single-flight cluster-wide;
    # without both, each node downloads for itself (the rest is still coordinated).
    advertise: str | None = None
    secret: str | None = field(default=None, repr=False)  # shared by every node; guards /_mirror/fills
    lease_ttl: float = 90.0  # a fill lease lives this long unless renewed (every third of it)

    @property
    def shares_fills(self) -> bool:
        return self.advertise is not None and self.secret is not None

    @property
    def redis_display(self) -> str:
        """The URL without its password (for check-config and error messages)."""
        parts = urlsplit(self.redis)
        if parts.password is None:
            return self.redis
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    local: LocalConfig = field(default_factory=LocalConfig)
    security: SecurityConfig = field(default_factory=_no_security)  # `auth:`, `tls:`, `http:`
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    replication: tuple[Rule, ...] = ()  # mirror/replication/rules.py
    cluster: ClusterConfig | None = None  # None: one node, coordinated in-process
    replication_concurrency: int = 4  # rules run at once (mirror serve's scheduler and mirror sync)

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.default), None)

    def to_dict(self) -> dict[str, Any]:
        """The effective config as plain data (for `check-config`); passwords are masked."""
        data = asdict(self)
        data.pop("security")
        data.update(self.security.to_dict())
        data["replication"] = [rule.to_dict() for rule in self.replication]
        data["listen"] = str(self.listen)
        data["storage"]["path"] = str(self.storage.path)
        if self.storage.s3 is not None and self.storage.s3.secret_key:
            data["storage"]["s3"]["secret_key"] = "***"
        for upstream in data["upstreams"]:
            if upstream["password"]:
                upstream["password"] = "***"
            upstream["auth_hosts"] = list(upstream["auth_hosts"])
            upstream["ca_file"] = str(upstream["ca_file"]) if upstream["ca_file"] else None
        data["upstreams"] = list(data["upstreams"])
        data["local"]["repositories"] = list(self.local.repositories)
        if self.cluster is not None:
            data["cluster"]["redis"] = self.cluster.redis_display
            if self.cluster.secret is not None:
                data["cluster"]["secret"] = "***"
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


class _Errors:
    """Every problem of one file, in the order found: an operator fixes them all in one round."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def reported(self, *keys: str) -> bool:
        """Whether a problem with any of these keys is already recorded."""
        return any(message.startswith(f"{key}:") for message in self.messages for key in keys)


class _Section:
    """Reads one mapping of the file, remembering its key path for error messages.

    A value that cannot be used is recorded (naming its key) and its default taken instead, so parsing goes
    on and one run reports every problem of the file.
    """

    def __init__(self, data: dict[str, Any], key: str, errors: _Errors) -> None:
        self.data = data
        self.key = key
        self.errors = errors
        self.used: set[str] = set()
        self.finished = False

    @classmethod
    def of(cls, data: Any, key: str, errors: _Errors) -> _Section | None:
        """The mapping at `key` (absent: empty); None, recorded, when it is not a mapping."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            errors.add(f"{key or 'config'}: expected a mapping, got {type(data).__name__}")
            return None
        return cls(data, key, errors)

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def error(self, name: str, message: str) -> None:
        self.errors.add(f"{self.path(name)}: {message}")

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.data

    def value(self, name: str, default: Any, parse: Callable[[Any, str], Any], *, required: bool = False) -> Any:
        """`parse(value, key)` of the value at `name` (absent: `default`, or when `required` parse(None));
        its ConfigError is recorded and `default` returned."""
        if not self.has(name) and not required:
            self.used.add(name)
            return default
        try:
            return parse(self.get(name), self.path(name))
        except ConfigError as exc:
            for message in exc.errors:
                self.errors.add(message)
            return default

    def boolean(self, name: str, default: bool) -> bool:
        return bool(self.value(name, default, _boolean))

    def string(self, name: str, default: str | None = None) -> str | None:
        return self.value(name, default, _string)

    def fraction(self, name: str, default: float) -> float:
        return float(self.value(name, default, _fraction))

    def size(self, name: str, default: int | None) -> int | None:
        """A size; an explicit null is the default (check-config prints an unbounded max_size so)."""
        return self.value(name, default, lambda value, key: default if value is None else parse_size(value, key))

    def duration(self, name: str, default: float) -> float:
        return float(self.value(name, default, parse_duration))

    def section(self, name: str, parse: Callable[[_Section], T], default: T) -> T:
        """Parse the mapping at `name` with `parse`, then report its unknown keys; `default` if it is unusable.

        A `parse` that raises ConfigError instead of recording loses only the rest of its own section."""
        section = _Section.of(self.get(name), self.path(name), self.errors)
        if section is None:
            return default
        try:
            result = parse(section)
        except ConfigError as exc:
            for message in exc.errors:
                self.errors.add(message)
            section.finished = True  # the keys it did not get to are not unknown
            return default
        section.finish()
        return result

    def finish(self) -> None:
        """Report the keys nothing read (once, however often called)."""
        if self.finished:
            return
        self.finished = True
        for name in sorted(set(self.data) - self.used, key=str):
            self.error(str(name), "unknown key")


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _string(value: Any, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{key}: expected a number in (0, 1], got {value!r}")
    return float(value)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _names(value: Any, key: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"{key}: expected a list of {what}")
    return tuple(value)


def _parse_listen(value: Any, key: str) -> Listen:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535 or not host:
        raise ConfigError(f"{key}: expected host:port with a port from 0 to 65535, got {value!r}")
    return Listen(host, int(port_text))


def _parse_upstream_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not is_valid_name(value) or "/" in value:
        raise ConfigError(f"{key}: expected a registry host name like docker.io, got {value!r}")
    return value


def _parse_upstream_url(value: Any, key: str) -> str:
    parts = urlsplit(value if isinstance(value, str) else "")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError(f"{key}: expected http(s)://host[:port], got {value!r}")
    return str(value).rstrip("/")


def _parse_timeout(value: Any, key: str) -> float:
    timeout = parse_duration(value, key)
    if timeout <= 0:
        raise ConfigError(f"{key}: must be more than 0")
    return timeout


def _parse_ca_file(value: Any, key: str) -> Path | None:
    text = _string(value, key)
    if not text:
        return None
    if not Path(text).is_file():
        raise ConfigError(f"{key}: no such file: {text}")
    return Path(text)


def _storage_backend(value: Any, key: str) -> str:
    if value not in STORAGE_BACKENDS:
        raise ConfigError(f"{key}: expected one of {', '.join(STORAGE_BACKENDS)}, got {value!r}")
    return str(value)


# S3's bucket naming rules (the strict ones every provider accepts): 3-63 of a-z, 0-9, '.', '-'.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _bucket(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: required with storage.backend: s3")
    if not _BUCKET.fullmatch(value) or ".." in value:
        raise ConfigError(f"{key}: expected an S3 bucket name (3-63 of a-z, 0-9, '.', '-'), got {value!r}")
    return value


def _region(value: Any, key: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9-]{1,32}", value):
        raise ConfigError(f"{key}: expected a region name like us-east-1, got {value!r}")
    return value


def _parse_presign_expires(value: Any, key: str) -> float:
    seconds = parse_duration(value, key)
    # SigV4 presigned URLs live at most 7 days; under a second a client could not follow the redirect.
    if not 1 <= seconds <= 7 * 86400:
        raise ConfigError(f"{key}: must be between 1s and 7d")
    return seconds


def _parse_s3(section: _Section) -> S3Config | None:
    bucket = section.value("bucket", None, _bucket, required=True)
    endpoint = section.value("endpoint", None, lambda v, k: None if v is None else _parse_upstream_url(v, k))
    s3 = S3Config(
        bucket=bucket or "",
        endpoint=endpoint,
        region=section.value("region", "us-east-1", _region),
        access_key=section.string("access_key") or None,
        secret_key=section.value("secret_key", None, _secret),
        path_style=section.boolean("path_style", True),
        presign=section.boolean("presign", False),
        presign_expires=section.value("presign_expires", 900.0, _parse_presign_expires),
        cache_max_size=section.size("cache_max_size", None),
    )
    if (s3.access_key is None) != (s3.secret_key is None) and not section.errors.reported(section.path("secret_key")):
        section.error("secret_key" if s3.secret_key is None else "access_key", "set access_key and secret_key together")
    return None if bucket is None else s3


def _parse_storage(section: _Section) -> StorageConfig:
    backend = section.value("backend", "fs", _storage_backend)
    s3 = section.section("s3", _parse_s3, None) if section.get("s3") is not None else None
    s3_reported = any(m.startswith(section.path("s3")) for m in section.errors.messages)
    if backend == "s3" and s3 is None and not s3_reported:
        section.error("s3", "required with storage.backend: s3 (at least bucket)")
    storage = StorageConfig(
        path=Path(section.string("path", "./data") or "./data"),
        backend=backend,
        s3=s3,
        delete=section.boolean("delete", True),
        max_size=section.size("max_size", None),
        high_watermark=section.fraction("high_watermark", 0.95),
        low_watermark=section.fraction("low_watermark", 0.85),
        temp_grace=section.duration("temp_grace", 3600.0),
    )
    # Compared only as written: a watermark already reported is its default here.
    watermarks = (section.path("high_watermark"), section.path("low_watermark"))
    if storage.low_watermark >= storage.high_watermark and not section.errors.reported(*watermarks):
        section.error("low_watermark", f"must be below {section.path('high_watermark')}")
    return storage


def _parse_manifest_limit(value: Any, key: str) -> int:
    size = parse_size(value, key)
    if size < 1024:
        raise ConfigError(f"{key}: must be at least 1KiB")
    return size


def _parse_limits(section: _Section) -> LimitsConfig:
    return LimitsConfig(
        manifest_bytes=section.value("manifest_bytes", 4 * 1024 * 1024, _parse_manifest_limit),
        page_size_max=section.value("page_size_max", 1000, _positive_int),
    )


def _parse_upstream(section: _Section) -> UpstreamConfig | None:
    """The upstream, or None when a value it cannot do without (name, url) is unusable."""
    name = section.value("name", None, _parse_upstream_name, required=True)
    url = section.value("url", None, _parse_upstream_url, required=True)
    upstream = UpstreamConfig(
        name=name or "",
        url=url or "",
        default=section.boolean("default", False),
        username=section.string("username") or None,
        password=section.value("password", None, _secret),
        tag_ttl=section.duration("tag_ttl", 60.0),
        auth_hosts=section.value("auth_hosts", (), lambda v, k: _names(v, k, "host names")),
        offline=section.boolean("offline", False),
        timeout=section.value("timeout", 30.0, _parse_timeout),
        library_prefix=section.boolean("library_prefix", name == "docker.io"),
        ca_file=section.value("ca_file", None, _parse_ca_file),
        ratelimit_floor=section.value("ratelimit_floor", 5, _non_negative_int),
        prefetch=section.boolean("prefetch", True),
        prefetch_concurrency=section.value("prefetch_concurrency", 8, _positive_int),
    )
    return None if name is None or url is None else upstream


def _parse_concurrency(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: expected a whole number, 1 or more, got {value!r}")
    return value


def _non_negative_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: expected a whole number, 0 or more, got {value!r}")
    return value


def _secret(value: Any, key: str) -> str | None:
    """A string whose value an error message must not repeat (it is printed and logged)."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got a {type(value).__name__} (value not shown)")
    return value or None


def _parse_upstreams(root: _Section) -> tuple[UpstreamConfig, ...]:
    raw_upstreams = root.get("upstreams")
    if raw_upstreams is None:
        return ()
    if not isinstance(raw_upstreams, list):
        root.error("upstreams", "expected a list")
        return ()
    upstreams: list[UpstreamConfig] = []
    for i, raw in enumerate(raw_upstreams):
        section = _Section.of(raw, f"upstreams[{i}]", root.errors)
        if section is None:
            continue
        upstream = _parse_upstream(section)
        section.finish()
        if upstream is None:
            continue
        if any(u.name == upstream.name for u in upstreams):
            section.error("name", f"{upstream.name!r} is configured twice")
            continue
        upstreams.append(upstream)
    if sum(u.default for u in upstreams) > 1:
        root.error("upstreams", "only one upstream may be default: true")
    return tuple(upstreams)


def _parse_local(section: _Section) -> LocalConfig:
    patterns = section.value("repositories", (), lambda v, k: _names(v, k, "name patterns like team/**"))
    return LocalConfig(repositories=patterns)


def _parse_replication(root: _Section, upstreams: tuple[UpstreamConfig, ...]) -> tuple[Rule, ...]:
    """The `replication:` rules (mirror/replication/rules.py, which reports the first problem of the list).

    Rules name upstreams: only those that parsed are known here (one that did not is reported already)."""

    def parse(value: Any, key: str) -> tuple[Rule, ...]:
        # Imported here: that module imports this one, and a config without rules need not load it (nor
        # cron and version parsing).
        from mirror.replication.rules import parse_rules

        return parse_rules(value, upstreams)

    return root.value("replication", (), parse)


def _parse_upload_expiry(value: Any, key: str) -> float:
    expire = parse_duration(value, key)
    if expire <= 0:
        raise ConfigError(f"{key}: must be more than 0")
    return expire


def _parse_upload_bytes(value: Any, key: str) -> int:
    max_bytes = parse_size(value, key)
    if max_bytes < 1:
        raise ConfigError(f"{key}: must be at least 1 byte")
    return max_bytes


def _parse_uploads(section: _Section) -> UploadsConfig:
    defaults = UploadsConfig()
    return UploadsConfig(
        expire=section.value("expire", defaults.expire, _parse_upload_expiry),
        max_bytes=section.value("max_bytes", defaults.max_bytes, _parse_upload_bytes),
    )


def load_config_data(data: Any) -> Config:
    """Build a Config from parsed YAML (after ${ENV} expansion).

    Raises one ConfigError carrying every problem found (`.errors`), each message starting with its key.
    """
    errors = _Errors()
    root = _Section.of(_expand_env(data), "", errors)
    if root is None:
        raise ConfigError(*errors.messages)
    try:
        listen = root.value("listen", Listen(), _parse_listen)
        storage = root.section("storage", _parse_storage, StorageConfig())
        limits = root.section("limits", _parse_limits, LimitsConfig())
        uploads = root.section("uploads", _parse_uploads, UploadsConfig())
        upstreams = _parse_upstreams(root)
        local = root.section("local", _parse_local, LocalConfig())
        log = root.section("log", _parse_log, LogConfig())
        metrics = root.section("metrics", _parse_metrics, MetricsConfig())
        replication = _parse_replication(root, upstreams)
        cluster = root.section("cluster", _parse_cluster, None) if root.get("cluster") is not None else None
        from mirror.auth.settings import parse_security  # here: that module reads sections with this one's

        security = parse_security(root)
        replication_concurrency = root.value("replication_concurrency", 4, _parse_concurrency)
        root.finish()
    except ConfigError as exc:  # a check that raises instead of recording: still shown with the others
        raise ConfigError(*errors.messages, *exc.errors) from exc
    if errors.messages:
        raise ConfigError(*errors.messages)
    return Config(
        listen=listen, storage=storage, limits=limits, uploads=uploads, upstreams=upstreams, local=local,
        log=log, metrics=metrics, replication=replication, replication_concurrency=replication_concurrency,
        cluster=cluster, security=security,
    )


_CLUSTER_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _redis_url(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: required (redis://host:port/db) when cluster is configured")
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{key}: expected a redis://, rediss:// or unix:// URL, got {value!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{key}: no host in {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{key}: bad port in {value!r}") from exc
    return value


def _cluster_prefix(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _CLUSTER_PREFIX.fullmatch(value):
        raise ConfigError(
            f"{key}: expected 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit), got {value!r}"
        )
    return value


def _advertise_url(value: Any, key: str) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected this node's http://host:port for the other nodes, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{key}: bad port in {value!r}") from exc
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{key}: expected scheme://host:port only (no path, query or credentials), got {value!r}")
    return f"{parts.scheme}://{parts.netloc}"


_MIN_SECRET = 16


def _cluster_secret(value: Any, key: str) -> str:
    if not isinstance(value, str) or len(value) < _MIN_SECRET:
        raise ConfigError(
            f"{key}: expected a string of at least {_MIN_SECRET} characters (${{ENV}} keeps it out of the file)"
        )
    return value


def _lease_ttl(value: Any, key: str) -> float:
    ttl = parse_duration(value, key)
    if ttl < 1.0:
        raise ConfigError(f"{key}: must be at least 1s, got {value!r}")
    return ttl


def _parse_cluster(section: _Section) -> ClusterConfig | None:
    url = section.value("redis", None, _redis_url, required=True)
    prefix = section.value("prefix", "mirror", _cluster_prefix)
    advertise = section.value("advertise", None, _advertise_url)
    secret = section.value("secret", None, _cluster_secret)
    lease_ttl = section.value("lease_ttl", 90.0, _lease_ttl)
    if (advertise is None) != (secret is None) and not section.errors.reported(
        section.path("advertise"), section.path("secret")
    ):
        missing = "secret" if secret is None else "advertise"
        section.error(missing, "required together with "
                      f"cluster.{'advertise' if missing == 'secret' else 'secret'} (cluster-wide fills need both)")
    if url is None:
        return None
    return ClusterConfig(redis=url, prefix=prefix, advertise=advertise, secret=secret, lease_ttl=lease_ttl)


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
