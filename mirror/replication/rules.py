"""The `replication:` section of the config: each rule a whole job (what, which tags, where, when).

Validated like the rest of the config: every error names its key (`replication[0].tags.include`), so an
operator fixes a file without reading code. Pure data and parsing; the engine decides what to do with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cronsim import CronSim, CronSimError
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from mirror.config import ConfigError, UpstreamConfig, parse_duration, parse_size
from mirror.oci.names import is_valid_name

_RULE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")

CACHE = "cache"
LOCAL = "local"
REGISTRY = "registry"
OCI_LAYOUT = "oci_layout"
ARCHIVE = "archive"
DESTINATION_KINDS = (CACHE, LOCAL, REGISTRY, OCI_LAYOUT, ARCHIVE)
DEFAULT_VERIFY_INTERVAL = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class TagFilter:
    include: str | None = None  # regex, anchored at both ends
    exclude: str | None = None  # regex, anchored at both ends
    semver: str | None = None  # a version range like ">=3.18,<4" (PEP 440 specifiers, see planner)
    latest: int | None = None  # keep only the N newest of what is left


@dataclass(frozen=True, slots=True)
class Source:
    upstream: str | None  # None: a repository of this mirror's local registry
    repository: str  # the name inside that upstream (library/alpine) or the local name

    def __str__(self) -> str:
        return f"{self.upstream}/{self.repository}" if self.upstream else self.repository


@dataclass(frozen=True, slots=True)
class Destination:
    kind: str  # one of DESTINATION_KINDS
    repository: str | None = None  # cache / local / registry: where in it (default: the source's name)
    url: str | None = None  # registry
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line or a traceback
    ca_file: Path | None = None
    tls_verify: bool = True
    path: Path | None = None  # oci_layout folder or archive file

    @property
    def key(self) -> str:
        """Stable name of this destination inside its rule (state, logs, metrics)."""
        if self.kind == REGISTRY:
            return f"registry:{urlsplit(self.url or '').netloc}/{self.repository}"
        if self.kind in (OCI_LAYOUT, ARCHIVE):
            return f"{self.kind}:{self.path}"
        return f"{self.kind}:{self.repository}"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    source: Source
    destinations: tuple[Destination, ...]
    tags: TagFilter = TagFilter()
    platforms: frozenset[str] | None = None  # None: an index is copied whole and untouched
    referrers: bool = True
    schedule: str | None = None  # cron expression (UTC)
    interval: float | None = None  # seconds between runs
    jitter: float = 0.0  # seconds; each wait is lengthened by a random fraction of it
    on_push: bool = False  # local sources: run within seconds of a push of a tag to the source repository
    prune: bool = False
    bandwidth: int | None = None  # bytes per second read from the source, None: unbounded
    # Seconds between runs that HEAD every tag at a registry destination; runs in between compare its tag
    # list with the rule's journal. 0: every run HEADs every tag.
    verify_interval: float = DEFAULT_VERIFY_INTERVAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": str(self.source),
            "tags": {k: v for k, v in (("include", self.tags.include), ("exclude", self.tags.exclude),
                                        ("semver", self.tags.semver), ("latest", self.tags.latest)) if v is not None},
            "platforms": sorted(self.platforms) if self.platforms is not None else None,
            "referrers": self.referrers,
            "destinations": [_destination_dict(d) for d in self.destinations],
            "schedule": self.schedule,
            "interval": self.interval,
            "jitter": self.jitter,
            "on_push": self.on_push,
            "prune": self.prune,
            "bandwidth": self.bandwidth,
            "verify_interval": self.verify_interval,
        }


def _destination_dict(destination: Destination) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": destination.kind}
    for name in ("repository", "url", "username"):
        if getattr(destination, name) is not None:
            data[name] = getattr(destination, name)
    if destination.password:
        data["password"] = "***"
    if destination.path is not None:
        data["path"] = str(destination.path)
    if destination.ca_file is not None:
        data["ca_file"] = str(destination.ca_file)
    if destination.kind == REGISTRY:
        data["tls_verify"] = destination.tls_verify
    return data


class _Fields:
    """One mapping of the section, its key path for errors, and which keys were read (the rest are unknown)."""

    def __init__(self, data: Any, key: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.key = key
        self.used: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.key}.{name}"

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def string(self, name: str) -> str | None:
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.path(name)}: expected a non-empty string, got {value!r}")
        return value

    def credential(self, name: str) -> str | None:
        """Like string(), but empty is absent: `${VAR}` of an unset variable means no credential."""
        value = self.get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.path(name)}: expected a string")
        return value or None

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path(name)}: expected true or false, got {value!r}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.path(unknown[0])}: unknown key")


def parse_rules(raw: Any, upstreams: Sequence[UpstreamConfig]) -> tuple[Rule, ...]:
    """The `replication:` list; raises ConfigError naming the key."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("replication: expected a list of rules")
    rules = tuple(_parse_rule(item, f"replication[{i}]", upstreams) for i, item in enumerate(raw))
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(f"replication[{i}].name: {rule.name!r} is configured twice")
        seen.add(rule.name)
    return rules


def _parse_rule(raw: Any, key: str, upstreams: Sequence[UpstreamConfig]) -> Rule:
    fields = _Fields(raw, key)
    name = fields.string("name")
    if name is None or not _RULE_NAME.fullmatch(name):
        raise ConfigError(
            f"{fields.path('name')}: expected a name of lowercase letters, digits, '.', '_' or '-' "
            f"(it appears in URLs and file names), got {name!r}"
        )
    source = _parse_source(fields.string("source"), fields.path("source"), upstreams)
    tags = _parse_tags(fields.get("tags"), fields.path("tags"))
    platforms = _parse_platforms(fields.get("platforms"), fields.path("platforms"))
    destinations = _parse_destinations(fields.get("destinations"), fields.path("destinations"), source)
    schedule = fields.string("schedule")
    if schedule is not None:
        try:
            CronSim(schedule, datetime.now(UTC))
        except CronSimError as exc:
            raise ConfigError(f"{fields.path('schedule')}: not a cron expression ({exc}): {schedule!r}") from exc
    interval_raw = fields.get("interval")
    interval = None if interval_raw is None else parse_duration(interval_raw, fields.path("interval"))
    if interval is not None and interval <= 0:
        raise ConfigError(f"{fields.path('interval')}: must be more than 0")
    if schedule is not None and interval is not None:
        raise ConfigError(f"{fields.path('interval')}: give either schedule (cron) or interval, not both")
    jitter_raw = fields.get("jitter")
    if jitter_raw is None:
        # Many mirrors started together (a fleet rollout) should not all ask the upstream at the same second.
        jitter = interval * 0.1 if interval is not None else 0.0
    else:
        jitter = parse_duration(jitter_raw, fields.path("jitter"))
    on_push = fields.boolean("on_push", False)
    if on_push and source.upstream is not None:
        raise ConfigError(
            f"{fields.path('on_push')}: only a local source is pushed to; {source} is an upstream's repository "
            "(use schedule or interval)"
        )
    bandwidth_raw = fields.get("bandwidth")
    bandwidth = None
    if bandwidth_raw is not None:
        if isinstance(bandwidth_raw, str):  # 50MB/s, 50MBps and 50MB all mean 50 MB per second
            bandwidth_raw = re.sub(r"\s*(/s|ps)$", "", bandwidth_raw.strip(), flags=re.IGNORECASE)
        bandwidth = parse_size(bandwidth_raw, fields.path("bandwidth"))
        if bandwidth <= 0:
            raise ConfigError(f"{fields.path('bandwidth')}: must be more than 0")
    verify_raw = fields.get("verify_interval")
    verify_interval = (DEFAULT_VERIFY_INTERVAL if verify_raw is None
                       else parse_duration(verify_raw, fields.path("verify_interval")))
    rule = Rule(
        name=name,
        source=source,
        destinations=destinations,
        tags=tags,
        platforms=platforms,
        referrers=fields.boolean("referrers", True),
        schedule=schedule,
        interval=interval,
        jitter=jitter,
        on_push=on_push,
        prune=fields.boolean("prune", False),
        bandwidth=bandwidth,
        verify_interval=verify_interval,
    )
    fields.finish()
    return rule


def _parse_source(text: str | None, key: str, upstreams: Sequence[UpstreamConfig]) -> Source:
    if text is None:
        raise ConfigError(f"{key}: required: an upstream's repository (docker.io/library/alpine) or a local one")
    by_name = {u.name: u for u in upstreams}
    first, _, rest = text.partition("/")
    if rest and first in by_name:
        upstream = by_name[first]
        repository = f"library/{rest}" if upstream.library_prefix and "/" not in rest else rest
        if not is_valid_name(repository):
            raise ConfigError(f"{key}: invalid repository name {rest!r}")
        return Source(upstream.name, repository)
    if "." in first and rest or ":" in first:
        raise ConfigError(
            f"{key}: {first!r} looks like a registry host but no upstream is named so "
            f"(configured: {', '.join(by_name) or 'none'})"
        )
    if not is_valid_name(text):
        raise ConfigError(f"{key}: invalid repository name {text!r}")
    return Source(None, text)


def _parse_tags(raw: Any, key: str) -> TagFilter:
    if raw is None:
        return TagFilter()
    fields = _Fields(raw, key)
    include = fields.string("include")
    exclude = fields.string("exclude")
    for name, pattern in (("include", include), ("exclude", exclude)):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{fields.path(name)}: invalid regular expression ({exc}): {pattern!r}") from exc
    semver = fields.get("semver")
    if semver is not None:
        if not isinstance(semver, str) or not semver.strip():
            raise ConfigError(f"{fields.path('semver')}: expected a version range like '>=3.18,<4', got {semver!r}")
        try:
            SpecifierSet(semver)
        except InvalidSpecifier as exc:
            raise ConfigError(f"{fields.path('semver')}: not a version range like '>=3.18,<4': {semver!r}") from exc
    latest = fields.get("latest")
    if latest is not None and (isinstance(latest, bool) or not isinstance(latest, int) or latest < 1):
        raise ConfigError(f"{fields.path('latest')}: expected a positive integer, got {latest!r}")
    fields.finish()
    return TagFilter(include=include, exclude=exclude, semver=semver, latest=latest)


def _parse_platforms(raw: Any, key: str) -> frozenset[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{key}: expected a non-empty list like [linux/amd64, linux/arm64]")
    for i, item in enumerate(raw):
        if not isinstance(item, str) or not _PLATFORM.fullmatch(item):
            raise ConfigError(f"{key}[{i}]: expected os/architecture[/variant] like linux/arm64, got {item!r}")
    return frozenset(raw)


def _parse_destinations(raw: Any, key: str, source: Source) -> tuple[Destination, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{key}: expected a non-empty list (cache, {{registry: URL}}, {{local: NAME}}, "
                          "{oci_layout: DIR} or {archive: FILE.tar})")
    parsed = tuple(_parse_destination(item, f"{key}[{i}]", source) for i, item in enumerate(raw))
    seen: set[str] = set()
    for i, destination in enumerate(parsed):
        if destination.key in seen:
            raise ConfigError(f"{key}[{i}]: the same destination is listed twice")
        seen.add(destination.key)
    return parsed


def _parse_destination(raw: Any, key: str, source: Source) -> Destination:
    if raw == CACHE:
        if source.upstream is None:
            raise ConfigError(f"{key}: the cache holds upstream content; {source} is a local repository")
        return Destination(CACHE, repository=source.repository)
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected cache or a mapping like {{registry: URL}}, got {raw!r}")
    kinds = [k for k in DESTINATION_KINDS if k in raw]
    if len(kinds) != 1:
        raise ConfigError(f"{key}: expected exactly one of {', '.join(DESTINATION_KINDS)}")
    kind = kinds[0]
    fields = _Fields(raw, key)
    if kind == CACHE:
        fields.get(CACHE)
        raise ConfigError(f"{key}: write the cache destination as the plain word cache")
    if kind == LOCAL:
        repository = fields.string(LOCAL)
        if repository is None or not is_valid_name(repository):
            raise ConfigError(f"{fields.path(LOCAL)}: expected a repository name, got {repository!r}")
        if source.upstream is None and repository == source.repository:
            raise ConfigError(f"{fields.path(LOCAL)}: the destination is the source repository itself")
        fields.finish()
        return Destination(LOCAL, repository=repository)
    if kind in (OCI_LAYOUT, ARCHIVE):
        path = fields.string(kind)
        if path is None:
            raise ConfigError(f"{fields.path(kind)}: expected a path")
        if kind == ARCHIVE and not path.endswith(".tar"):
            raise ConfigError(f"{fields.path(kind)}: expected a file name ending in .tar, got {path!r}")
        fields.finish()
        return Destination(kind, path=Path(path))
    url = fields.string(REGISTRY)
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError(f"{fields.path(REGISTRY)}: expected http(s)://host[:port], got {url!r}")
    repository = fields.string("repository") or source.repository
    if not is_valid_name(repository):
        raise ConfigError(f"{fields.path('repository')}: invalid repository name {repository!r}")
    ca_text = fields.string("ca_file")
    if ca_text is not None and not Path(ca_text).is_file():
        raise ConfigError(f"{fields.path('ca_file')}: no such file: {ca_text}")
    destination = Destination(
        REGISTRY,
        repository=repository,
        url=(url or "").rstrip("/"),
        username=fields.credential("username"),
        password=fields.credential("password"),
        ca_file=Path(ca_text) if ca_text else None,
        tls_verify=fields.boolean("tls_verify", True),
    )
    fields.finish()
    return destination
