"""The mirror as a real subprocess: ``python -m mirror serve --config FILE``.

Contract with the mirror package: it reads a YAML config whose ``listen`` is
``HOST:PORT`` and is ready once ``GET /v2/`` answers with any status below 500
(200, or 401 when it requires auth). The caller owns the config's content;
this wrapper only writes it to a file, refuses a non-loopback ``listen``, and
starts/stops/restarts the process by pid with the same config and data.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .procs import ManagedProcess, wait_http

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = str(listen).rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


class MirrorProcess:
    """One mirror server process; ``url``/``host`` come from the config's ``listen``."""

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30.0,
        python: str = sys.executable,
        extra_args: tuple[str, ...] = (),
        tls_ca: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
    ) -> None:
        if "listen" not in config:
            raise ValueError("the mirror config needs listen: 127.0.0.1:PORT")
        host, port = parse_listen(str(config["listen"]))
        if host != "127.0.0.1":
            # Tests must never listen anywhere but loopback.
            raise ValueError(f"tests may only listen on 127.0.0.1, not {host!r}")
        self.config = dict(config)
        self.port = port
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mirror-"))
        self.config_path = self.workdir / "mirror.yml"
        self.ready_timeout = ready_timeout
        self.python = python
        self.extra_args = extra_args
        # Set when the config has `tls:`: the URL is https and readiness is checked trusting this CA.
        self.tls_ca = tls_ca
        self.client_cert = client_cert  # (cert, key) for readiness checks against a mirror requiring mTLS
        base_env = dict(os.environ if env is None else env)
        # Import the package from this checkout, whatever the cwd or installed copies.
        base_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), base_env.get("PYTHONPATH", "")) if p)
        base_env.setdefault("PYTHONUNBUFFERED", "1")
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            base_env.pop(proxy, None)
        self.env = base_env
        self.proc: ManagedProcess | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://{self.host}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("mirror not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return self.config_path

    def start(self) -> MirrorProcess:
        if self.running:
            raise RuntimeError(f"mirror already running (pid {self.pid})")
        self.write_config()
        argv = [self.python, "-m", "mirror", "serve", "--config", str(self.config_path), *self.extra_args]
        # One ManagedProcess for the object's life, so restarts append to the same log.
        if self.proc is None:
            self.proc = ManagedProcess(argv, name="mirror", log_dir=self.workdir, env=self.env, cwd=REPO_ROOT)
        self.proc.start()
        try:
            wait_http(f"{self.url}/v2/", self.ready_timeout, proc=self.proc, ca_file=self.tls_ca,
                      client_cert=self.client_cert)
        except BaseException:
            self.proc.stop()
            raise
        return self

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM by pid (a graceful shutdown is part of what is tested), SIGKILL if it hangs."""
        if self.proc is not None:
            self.proc.stop(timeout)

    def kill(self) -> None:
        """Stop without grace: SIGKILL at once (crash-recovery tests)."""
        if self.proc is not None:
            self.proc.kill()

    def restart(self) -> MirrorProcess:
        """Same config file, same data directories, same port."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self, tail: int | None = 8000) -> str:
        return self.proc.log_text(tail) if self.proc is not None else ""

    def __enter__(self) -> MirrorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    async def astart(self) -> MirrorProcess:
        return await asyncio.to_thread(self.start)

    async def arestart(self) -> MirrorProcess:
        return await asyncio.to_thread(self.restart)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)
