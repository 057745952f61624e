"""Decides who owns a repository name: the local store or an upstream seen through its cache.

Order (issue #3): `?ns=<upstream>`; a first path component equal to an upstream's name; a name matching
`local.repositories`; the default upstream; local. Docker Hub's one-component names mean `library/<name>`.
Every route to the same upstream repository lands on the same cached repository.

Images of other registries kept locally (an imported air-gap bundle) live under their full name, and every
way a client asks for one lands there when no upstream owns that registry: `?ns=ghcr.io` + `owner/app` and
the path prefix `ghcr.io/owner/app` both mean local `ghcr.io/owner/app`. Docker Hub is the one registry
whose names clients shorten (Docker's `registry-mirrors` sends `library/alpine`, with no host), so its
images are kept under the short name: `docker.io/library/alpine`, `docker.io/alpine`, `?ns=docker.io` +
`library/alpine` and `library/alpine` are all local `library/alpine` — Docker's own normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mirror.errors import NameUnknown
from mirror.oci.names import is_valid_name
from mirror.storage.interface import Registry


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream as the router sees it: its name, its registry (the cache) and naming rules."""

    name: str
    registry: Registry
    library_prefix: bool


@dataclass(frozen=True, slots=True)
class Target:
    registry: Registry
    repo: str  # the name inside `registry`
    upstream: str | None  # None for local repositories


# Docker Hub's host names as clients write them; locally its images are kept without the host.
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")


def local_name(name: str) -> str:
    """The local repository for a name that may carry a registry host: Docker Hub's host is dropped
    (`docker.io/alpine` -> `library/alpine`), any other host stays part of the name."""
    host, _, rest = name.partition("/")
    if host in DOCKER_HUB_HOSTS and rest:
        return rest if "/" in rest else f"library/{rest}"
    return name


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """`team/**` matches any depth below team/, `team/*` one component, `team` exactly."""
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(".*" if p == "**" else "[^/]*" if p == "*" else re.escape(p) for p in parts)
    return re.compile(regex)


class Router:
    def __init__(
        self,
        local: Registry,
        upstreams: Mapping[str, Upstream],
        default_upstream: str | None,
        local_patterns: tuple[str, ...],
    ) -> None:
        self.local = local
        self.upstreams = dict(upstreams)
        self.default_upstream = default_upstream
        self.local_patterns = local_patterns
        self._local_regexes = [glob_to_regex(p) for p in local_patterns]

    def route(self, name: str, ns: str | None = None) -> Target:
        if ns:
            upstream = self.upstreams.get(ns)
            if upstream is None:
                # Never the default upstream (that would be another registry's content under the same
                # name): the local copy under the full name, if one was imported; else a 404, on which
                # containerd tries its next host.
                local = local_name(f"{ns}/{name}")
                if not is_valid_name(local):
                    # A host with a port (registry.local:5000), or junk: no repository name can hold it, so
                    # nothing was imported under it. Built into a path anyway, it was a 500.
                    raise NameUnknown(f"no upstream or local repository for ns={ns[:100]!r}",
                                      detail={"ns": ns[:100]})
                return Target(self.local, local, None)
            return self._upstream_target(upstream, name)
        first, _, rest = name.partition("/")
        if rest and first in self.upstreams:
            return self._upstream_target(self.upstreams[first], rest)
        if self.is_local_name(name):
            return Target(self.local, local_name(name), None)
        if self.default_upstream is not None:
            return self._upstream_target(self.upstreams[self.default_upstream], name)
        return Target(self.local, local_name(name), None)

    def is_local_name(self, name: str) -> bool:
        return any(regex.fullmatch(name) for regex in self._local_regexes)

    @staticmethod
    def _upstream_target(upstream: Upstream, name: str) -> Target:
        if upstream.library_prefix and "/" not in name:
            name = f"library/{name}"
        return Target(upstream.registry, name, upstream.name)

    async def list_repositories(self) -> list[str]:
        """Local repositories, and cached ones under their upstream's name (pullable by that prefix)."""
        names = list(await self.local.list_repositories())
        for upstream in self.upstreams.values():
            cached = await upstream.registry.list_repositories()
            names.extend(f"{upstream.name}/{repo}" for repo in cached)
        return sorted(set(names))
