"""pytest fixtures for real-client tests. Load with ``pytest_plugins = ["tests.support.fixtures"]``.

Slow things are session-scoped and shared: the token server, the token-auth
upstream registry, the plain registry, the prebuilt images and a mirror-less
dockerd. Share them with care: push under unique repository names
(``unique_repo``) and call ``token_server.reset()`` (or use ``fresh_token_server``)
before counting token requests. Anything that needs its own configuration
(a dockerd pointed at a mirror, a proxy registry, a mirror process) comes from a
function-scoped factory that stops what it started at teardown.

Tests that need real binaries can say so up front with
``@pytest.mark.needs_tools("skopeo", "dockerd")``: missing ones skip the test,
or fail it under MIRROR_REQUIRE_REAL_CLIENTS=1 (the fixtures check the same way).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .distribution import DistributionRegistry
from .dockerd import DockerDaemon
from .images import BuiltImage, build_busybox_image, build_multiarch_image
from .mirror_proc import MirrorProcess
from .procs import free_port, require_tool
from .redis_server import RedisServer
from .rgw import RadosGateway
from .token_server import Creds, TokenServer


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs_tools(*names): the test drives these binaries; skip when missing "
        "(fail under MIRROR_REQUIRE_REAL_CLIENTS=1)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Checked before fixtures run, so a missing binary never starts half a setup.
    for marker in item.iter_markers("needs_tools"):
        for name in marker.args:
            require_tool(name)


# -- upstream registry side ---------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server per test session; tests keep apart by key prefix (``unique prefix``)."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rgw() -> Iterator[RadosGateway]:
    """One real S3 server (Ceph RGW, ~13 s to start) per test session; tests keep apart by bucket."""
    gateway = RadosGateway()
    try:
        yield gateway.start()
    finally:
        gateway.stop()


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    """Docker-Hub-like token endpoint; ``.creds`` is the one user, ``.requests`` the record."""
    server = TokenServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def fresh_token_server(token_server: TokenServer) -> TokenServer:
    """The session token server with its request record cleared and failures off."""
    token_server.reset()
    token_server.fail_with = None
    return token_server


@pytest.fixture(scope="session")
def upstream_creds(token_server: TokenServer) -> Creds:
    return token_server.creds


@pytest.fixture(scope="session")
def upstream_registry(token_server: TokenServer) -> Iterator[DistributionRegistry]:
    """distribution with token auth: anonymous pull except ``private/``, ``upstream_creds`` pull+push all."""
    registry = DistributionRegistry.token_auth(token_server)
    try:
        yield registry.start()
    finally:
        registry.cleanup()


@pytest.fixture(scope="session")
def open_registry() -> Iterator[DistributionRegistry]:
    """distribution without auth (anyone pulls and pushes)."""
    registry = DistributionRegistry.open()
    try:
        yield registry.start()
    finally:
        registry.cleanup()


class RegistryFactory:
    """Starts extra registries for one test and stops them all at teardown."""

    def __init__(self) -> None:
        self.started: list[DistributionRegistry] = []

    def _start(self, registry: DistributionRegistry) -> DistributionRegistry:
        self.started.append(registry)
        return registry.start()

    def open(self, **kwargs: Any) -> DistributionRegistry:
        return self._start(DistributionRegistry.open(**kwargs))

    def token_auth(self, token_server: TokenServer, **kwargs: Any) -> DistributionRegistry:
        return self._start(DistributionRegistry.token_auth(token_server, **kwargs))

    def htpasswd(self, **kwargs: Any) -> DistributionRegistry:
        return self._start(DistributionRegistry.htpasswd(**kwargs))

    def proxy_of(
        self, remote_url: str, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> DistributionRegistry:
        return self._start(DistributionRegistry.proxy_of(remote_url, username, password, **kwargs))

    def close(self) -> None:
        for registry in reversed(self.started):
            registry.cleanup()
        self.started.clear()


@pytest.fixture
def registry_factory() -> Iterator[RegistryFactory]:
    """``registry_factory.open()``, ``.token_auth(ts)``, ``.proxy_of(url, user, password)``."""
    factory = RegistryFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def unique_repo() -> Callable[..., str]:
    """``unique_repo("library/app")`` -> ``library/app-1a2b3c4d``: no clashes in shared registries."""

    def make(prefix: str = "library/t") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    return make


# -- images -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """Runnable single-platform OCI image (tag ``1``), Cmd prints ``hello-from-mirror``."""
    return build_busybox_image(tmp_path_factory.mktemp("busybox-oci"), tag="1")


@pytest.fixture(scope="session")
def multiarch_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """OCI index (tag ``1``) for linux/amd64 + linux/arm64; this machine's entry runs."""
    return build_multiarch_image(tmp_path_factory.mktemp("multiarch-oci"), tag="1")


class ImageFactory:
    """Builds more images under a test's tmp_path, each in its own directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.n = 0

    def _dest(self, kind: str) -> Path:
        self.n += 1
        return self.base / f"{kind}-{self.n}"

    def busybox(self, **kwargs: Any) -> BuiltImage:
        return build_busybox_image(self._dest("busybox"), **kwargs)

    def multiarch(self, **kwargs: Any) -> BuiltImage:
        return build_multiarch_image(self._dest("multiarch"), **kwargs)


@pytest.fixture
def image_factory(tmp_path: Path) -> ImageFactory:
    """``image_factory.busybox(seed=1, extra_layers=[1<<20], media="docker")``, ``.multiarch(...)``."""
    return ImageFactory(tmp_path / "images")


# -- clients ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DockerDaemon]:
    """A dockerd without a registry mirror, shared by the session."""
    daemon = DockerDaemon()
    try:
        yield daemon.start()
    finally:
        daemon.stop()


DockerDaemonFactory = Callable[..., DockerDaemon]


@pytest.fixture
def docker_daemon_factory() -> Iterator[DockerDaemonFactory]:
    """``docker_daemon_factory(mirror_url=None, **kwargs)`` -> a started DockerDaemon, stopped at teardown."""
    started: list[DockerDaemon] = []

    def make(mirror_url: str | None = None, **kwargs: Any) -> DockerDaemon:
        daemon = DockerDaemon(mirror_url, **kwargs)
        started.append(daemon)
        return daemon.start()

    try:
        yield make
    finally:
        for daemon in reversed(started):
            daemon.stop()


# -- the mirror under test -----------------------------------------------------------

MirrorFactory = Callable[..., MirrorProcess]


@pytest.fixture
def mirror_factory(tmp_path: Path) -> Iterator[MirrorFactory]:
    """``mirror_factory(config: dict, start=True, **kwargs)`` -> MirrorProcess.

    Fills in ``listen: 127.0.0.1:<free port>`` when the config has none. The
    process and its workdir (``tmp_path/mirror-N``) are cleaned up at teardown.
    """
    started: list[MirrorProcess] = []

    def make(config: dict[str, Any], *, start: bool = True, **kwargs: Any) -> MirrorProcess:
        config = dict(config)
        config.setdefault("listen", f"127.0.0.1:{free_port()}")
        kwargs.setdefault("workdir", tmp_path / f"mirror-{len(started) + 1}")
        mirror = MirrorProcess(config, **kwargs)
        started.append(mirror)
        return mirror.start() if start else mirror

    try:
        yield make
    finally:
        for mirror in reversed(started):
            mirror.cleanup()
