"""The CNCF distribution registry (``docker-registry``, 2.8) as a test upstream or peer.

Modes: ``open`` (no auth), ``token`` (Docker Hub style bearer auth through a
``TokenServer``, see token_server.py), ``htpasswd`` (Basic auth, one user, a
bcrypt htpasswd file), ``proxy`` (distribution's pull-through cache of another
registry, optionally with upstream credentials).

``requests(since=mark)`` reads the access log (one line per request) so a test
can count what a client asked for: ``mark = registry.log_mark()`` first.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import yaml

from . import skopeo
from .images import BuiltImage
from .procs import ManagedProcess, ProcessDied, free_port, require_tool, wait_http
from .token_server import Access, Creds, TokenRequest, TokenServer, parse_scope

__all__ = [
    "Access", "Creds", "DistributionRegistry", "RegistryMode", "TokenRequest", "TokenServer", "parse_scope",
]


RegistryMode = Literal["open", "token", "htpasswd", "proxy"]

HTPASSWD_USER = "dc2-writer"
HTPASSWD_PASSWORD = "dc2-pa55word"
# distribution's access log (gorilla's combined format): `... "PATCH /v2/x/blobs/uploads/u?.. HTTP/1.1" 202 0 ...`
_ACCESS_LINE = re.compile(r'^\S+ - \S+ \[[^\]]+\] "([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) ', re.MULTILINE)


class DistributionRegistry:
    """``docker-registry serve CONFIG`` on 127.0.0.1 with filesystem storage.

    Modes: ``open`` (no auth), ``token`` (Docker Hub style bearer auth through a
    TokenServer), ``proxy`` (pull-through cache of ``remote_url`` with optional
    upstream credentials; no pushes). Use the class methods to build one.
    """

    def __init__(
        self,
        *,
        mode: RegistryMode = "open",
        token_server: TokenServer | None = None,
        remote_url: str | None = None,
        remote_creds: Creds | None = None,
        workdir: Path | None = None,
        port: int | None = None,
        delete_enabled: bool = True,
        htpasswd_creds: Creds = (HTPASSWD_USER, HTPASSWD_PASSWORD),
        s3: dict[str, Any] | None = None,
    ) -> None:
        if mode == "token" and token_server is None:
            raise ValueError("token mode needs a TokenServer")
        if mode == "proxy" and not remote_url:
            raise ValueError("proxy mode needs remote_url")
        self.mode = mode
        self.token_server = token_server
        self.remote_url = remote_url
        self.remote_creds = remote_creds
        self._own_workdir = workdir is None
        # Created on first use, so a skipped start (binary missing) leaves no directory behind.
        self._workdir = Path(workdir) if workdir is not None else None
        self._fixed_port = port
        self.port = port or 0
        self.delete_enabled = delete_enabled
        self.htpasswd_creds = htpasswd_creds
        # A `storage.s3` section as the mirror's config takes it (tests/support/rgw.py: new_bucket): the
        # registry's storage is then that bucket (distribution's s3 driver) instead of the filesystem.
        self.s3 = s3
        self.proc: ManagedProcess | None = None

    @classmethod
    def open(cls, **kwargs: Any) -> DistributionRegistry:
        return cls(mode="open", **kwargs)

    @classmethod
    def token_auth(cls, token_server: TokenServer, **kwargs: Any) -> DistributionRegistry:
        return cls(mode="token", token_server=token_server, **kwargs)

    @classmethod
    def htpasswd(cls, **kwargs: Any) -> DistributionRegistry:
        """Basic auth for one user (``.default_creds``), like a registry in another data centre."""
        return cls(mode="htpasswd", **kwargs)

    @classmethod
    def proxy_of(
        cls, remote_url: str, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> DistributionRegistry:
        creds = (username, password) if username is not None and password is not None else None
        return cls(mode="proxy", remote_url=remote_url, remote_creds=creds, **kwargs)

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"registry-{self.mode}-"))
        return self._workdir

    @property
    def data_dir(self) -> Path:
        """The filesystem storage root (``docker/registry/v2/...`` lives below it)."""
        return self.workdir / "data"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo_tag: str) -> str:
        """A skopeo reference ``docker://127.0.0.1:PORT/REPO:TAG`` (or ``@sha256:...``)."""
        return f"docker://{self.host}/{repo_tag}"

    def config(self) -> dict[str, Any]:
        storage: dict[str, Any] = {"filesystem": {"rootdirectory": str(self.data_dir)}}
        if self.s3 is not None:
            storage = {"s3": {
                "accesskey": self.s3["access_key"], "secretkey": self.s3["secret_key"],
                "region": self.s3.get("region", "us-east-1"), "regionendpoint": self.s3["endpoint"],
                "bucket": self.s3["bucket"], "secure": self.s3["endpoint"].startswith("https"), "v4auth": True,
            }}
        if self.delete_enabled:
            storage["delete"] = {"enabled": True}
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": storage,
            # A fixed secret: without one distribution makes up a random one and warns.
            "http": {"addr": self.host, "secret": "mirror-test-secret"},
            # The periodic storage health check only adds noise to the log.
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.mode == "token":
            assert self.token_server is not None
            cfg["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.token_server.service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(self.token_server.cert_path),
                }
            }
        if self.mode == "htpasswd":
            cfg["auth"] = {"htpasswd": {"realm": "mirror-test", "path": str(self.workdir / "htpasswd")}}
        if self.mode == "proxy":
            proxy: dict[str, Any] = {"remoteurl": self.remote_url}
            if self.remote_creds is not None:
                proxy["username"], proxy["password"] = self.remote_creds
            cfg["proxy"] = proxy
        return cfg

    def start(self, timeout: float = 20.0) -> DistributionRegistry:
        binary = require_tool("docker-registry")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Drop REGISTRY_* from the environment: distribution reads them as config overrides.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        if self.s3 is not None:
            # The AWS SDK in distribution refuses to start with a custom CA bundle it cannot attach to its
            # transport; the test bucket is plain HTTP on loopback anyway.
            env.pop("AWS_CA_BUNDLE", None)
        for attempt in range(5):
            if self._fixed_port is None:
                self.port = free_port()
            self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
            if self.mode == "htpasswd":
                self._write_htpasswd()
            proc = ManagedProcess(
                [binary, "serve", str(self.config_path)],
                name=f"registry-{self.mode}",
                log_dir=self.workdir,
                env=env,
            )
            proc.start()
            self.proc = proc
            try:
                wait_http(f"{self.url}/v2/", timeout, proc=proc)
                return self
            except ProcessDied as err:
                port_lost = "address already in use" in err.log_tail
                if not port_lost or self._fixed_port is not None or attempt == 4:
                    raise
            except BaseException:
                proc.stop()
                raise
        raise AssertionError("unreachable")

    def _write_htpasswd(self) -> None:
        import bcrypt  # the test extra; only this mode needs it

        user, password = self.htpasswd_creds
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        (self.workdir / "htpasswd").write_text(f"{user}:{hashed}\n")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log_mark(self) -> int:
        """Where the log ends now: pass it to ``requests(since=...)``."""
        return len(self.log_text(None))

    def requests(self, since: int = 0, *, settle: float = 0.3) -> list[tuple[str, str, int]]:
        """(method, path with query, status) of every request answered since ``since``.

        The access line is written as the response completes: wait until the log stops growing."""
        text = self.log_text(None)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(settle)
            again = self.log_text(None)
            if again == text:
                break
            text = again
        return [(m.group(1), m.group(2), int(m.group(3))) for m in _ACCESS_LINE.finditer(text[since:])]

    def cleanup(self) -> None:
        """Stop and delete the storage (only when we created the workdir)."""
        self.stop()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> DistributionRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log_text(self, tail: int | None = 4000) -> str:
        return self.proc.log_text(tail) if self.proc is not None else ""

    @property
    def default_creds(self) -> Creds | None:
        if self.mode == "htpasswd":
            return self.htpasswd_creds
        return self.token_server.creds if self.token_server is not None else None

    def push(self, image: BuiltImage, repo_tag: str, creds: Creds | None | Literal["default"] = "default") -> str:
        """skopeo-copy an OCI layout (all platforms) to ``REPO:TAG``; returns the reference.

        ``creds="default"`` uses the token server's user when there is one.
        """
        dest_creds = self.default_creds if creds == "default" else creds
        ref = self.ref(repo_tag)
        skopeo.copy(image.ref, ref, dest_creds=dest_creds)
        return ref

    def pull_layout(
        self, repo_tag: str, dest: Path, *, tag: str | None = None, creds: Creds | None = None
    ) -> Path:
        """skopeo-copy ``REPO:TAG`` (all platforms) into the OCI layout ``dest`` under ``tag``."""
        local_tag = tag or repo_tag.rsplit(":", 1)[-1]
        skopeo.copy(self.ref(repo_tag), f"oci:{dest}:{local_tag}", src_creds=creds)
        return Path(dest)

    # Thread-offloaded variants for async tests (keep the event loop serving).
    async def apush(
        self, image: BuiltImage, repo_tag: str, creds: Creds | None | Literal["default"] = "default"
    ) -> str:
        return await asyncio.to_thread(self.push, image, repo_tag, creds)

    async def apull_layout(
        self, repo_tag: str, dest: Path, *, tag: str | None = None, creds: Creds | None = None
    ) -> Path:
        return await asyncio.to_thread(self.pull_layout, repo_tag, dest, tag=tag, creds=creds)
