"""From a rule's words to Registries: its source, and one factory for every kind of destination.

The copier and the planner see only the Registry interface; this module is the one place that knows
which class stands behind `cache`, `{local: NAME}`, `{registry: URL}`, `{oci_layout: DIR}` and
`{archive: FILE.tar}`. Kinds whose module is not part of this build fail the run with a message naming
what is missing, never with a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from mirror.errors import RegistryError
from mirror.replication.gate import BeforeGet
from mirror.replication.layout import open_layout_destination
from mirror.replication.rules import ARCHIVE, CACHE, LOCAL, OCI_LAYOUT, REGISTRY, Destination, Rule
from mirror.state import METRICS, ROUTER
from mirror.storage.interface import Registry
from mirror.upstream.client import UpstreamClient

RemoteFactory = Callable[[UpstreamClient, BeforeGet | None], Registry]


class ReplicationUnavailable(RegistryError):
    code, status, default_message = "UNSUPPORTED", 501, "this replication feature is not available"


def _optional(module: str, attribute: str, what: str) -> object:
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ReplicationUnavailable(f"{what} needs {module}.{attribute}, which this build does not have") from exc


def remote_registry(client: UpstreamClient, before_get: BeforeGet | None) -> Registry:
    """An upstream's repository read over HTTP through that upstream's own client (its tokens and its
    rate-limit bookkeeping are shared with the pull-through cache): HEAD first, GETs behind the gate."""
    remote_class = _optional("mirror.replication.remote", "RemoteRegistry", "an upstream source")
    registry = remote_class(client, before_get=before_get)  # type: ignore[operator]
    assert isinstance(registry, Registry)
    return registry


def upstream_client(app: web.Application, upstream: str) -> UpstreamClient:
    found = app[ROUTER].upstreams.get(upstream)
    client = getattr(found.registry, "client", None) if found is not None else None
    if not isinstance(client, UpstreamClient):
        raise ReplicationUnavailable(f"upstream {upstream} has no client to replicate from")
    return client


def open_source(
    rule: Rule, app: web.Application, before_get: BeforeGet | None, *, remote: RemoteFactory = remote_registry
) -> Registry:
    if rule.source.upstream is None:
        return app[ROUTER].local
    return remote(upstream_client(app, rule.source.upstream), before_get)


async def open_destination(
    spec: Destination, app: web.Application, stack: contextlib.AsyncExitStack, *, rule: str, state_dir: Path
) -> Registry:
    """The Registry a destination is written through; whatever it opens is closed by `stack`.

    `state_dir` is this destination's own folder under the data directory: a remote destination keeps
    its partial uploads there so a killed run resumes them instead of starting over."""
    if spec.kind == LOCAL:
        return app[ROUTER].local
    if spec.kind == CACHE:
        factory = _optional("mirror.replication.cache_dest", "open_cache_destination", "the cache destination")
        return await factory(spec, app, stack, rule=rule)  # type: ignore[operator]
    if spec.kind == REGISTRY:
        factory = _optional("mirror.replication.remote", "open_registry_destination", "a registry destination")
        return await factory(spec, stack, state_dir=state_dir, metrics=app[METRICS])  # type: ignore[operator]
    if spec.kind in (OCI_LAYOUT, ARCHIVE):
        return await open_layout_destination(spec, stack)
    raise ReplicationUnavailable(f"unknown destination kind {spec.kind}")
