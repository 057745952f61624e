"""The three servers of a benchmark run: the upstream, the peer (distribution in proxy mode) and the mirror.

They reuse the real-client harness of the tests (tests/support), so the benchmark starts exactly the
programs the tests drive.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tests.support.distribution import DistributionRegistry
from tests.support.mirror_proc import MirrorProcess
from tests.support.procs import free_port


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


@dataclass
class PeerServer:
    upstream_url: str
    name: str = "peer"

    def __post_init__(self) -> None:
        self.registry = DistributionRegistry.proxy_of(self.upstream_url).start()

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def pid(self) -> int:
        assert self.registry.proc is not None
        return self.registry.proc.pid

    def reset(self) -> None:
        self.registry.cleanup()
        self.registry = DistributionRegistry.proxy_of(self.upstream_url).start()

    def stop(self) -> None:
        self.registry.cleanup()


@dataclass
class MirrorServer:
    upstream_url: str
    name: str = "mirror"

    def __post_init__(self) -> None:
        self.proc = self._start()

    def _start(self) -> MirrorProcess:
        self.data = Path(tempfile.mkdtemp(prefix="bench-mirror-"))
        config = {
            "listen": f"127.0.0.1:{free_port()}",
            "storage": {"path": str(self.data / "data")},
            "upstreams": [{"name": "docker.io", "url": self.upstream_url, "default": True, "tag_ttl": "10m"}],
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
