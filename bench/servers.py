"""The three servers of a benchmark run: the upstream, the peer (distribution in proxy mode) and the mirror.

They reuse the real-client harness of the tests (tests/support), so the benchmark starts exactly the
programs the tests drive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tests.support.distribution import DistributionRegistry
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import free_port
from tests.support.tls import PrivateCA


class Server(Protocol):
    name: str

    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int: ...

    def reset(self) -> None:
        """Stop, drop every cached byte, start again (a cold cache and a fresh peak-RSS counter)."""

    def stop(self) -> None: ...


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the process's peak resident set since it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def trusting(ca_file: Path | None) -> Iterator[None]:
    """SSL_CERT_FILE=`ca_file` for what starts in this block: distribution (Go's crypto/x509 reads it on
    Linux: the trust replaces the system's) and this process's own readiness checks (OpenSSL reads it)."""
    if ca_file is None:
        yield
        return
    before = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(ca_file)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = before


class TlsDistribution(DistributionRegistry):
    """The upstream distribution registry serving HTTPS with a certificate from a private CA."""

    def __init__(self, ca: PrivateCA, **kwargs: Any) -> None:
        super().__init__(mode="open", **kwargs)
        self.ca = ca

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["http"]["tls"] = {"certificate": str(self.ca.cert_file), "key": str(self.ca.key_file)}
        return config

    def start(self, timeout: float = 20.0) -> TlsDistribution:
        with trusting(self.ca.ca_file):
            super().start(timeout)
        return self


@dataclass
class PeerServer:
    upstream_url: str
    ca_file: Path | None = None  # the upstream's private CA, trusted through SSL_CERT_FILE
    name: str = "peer"

    def __post_init__(self) -> None:
        self.registry = self._start()

    def _start(self) -> DistributionRegistry:
        with trusting(self.ca_file):
            return DistributionRegistry.proxy_of(self.upstream_url).start()

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def pid(self) -> int:
        assert self.registry.proc is not None
        return self.registry.proc.pid

    def reset(self) -> None:
        self.registry.cleanup()
        self.registry = self._start()

    def stop(self) -> None:
        self.registry.cleanup()


@dataclass
class MirrorServer:
    upstream_url: str
    ca_file: Path | None = None  # upstreams[].ca_file
    prefetch: bool = True  # upstreams[].prefetch (off: to see what layer prefetch is worth)
    name: str = "mirror"

    def __post_init__(self) -> None:
        self.proc = self._start()

    def _start(self) -> MirrorProcess:
        self.data = Path(tempfile.mkdtemp(prefix="bench-mirror-"))
        config = {
            "listen": f"127.0.0.1:{free_port()}",
            "storage": {"path": str(self.data / "data")},
            "upstreams": [{"name": "docker.io", "url": self.upstream_url, "default": True, "tag_ttl": "10m",
                           "prefetch": self.prefetch, **({"ca_file": str(self.ca_file)} if self.ca_file else {})}],
        }
        return MirrorProcess(config, workdir=self.data).start()

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reset(self) -> None:
        self.stop()
        self.proc = self._start()

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.data, ignore_errors=True)
