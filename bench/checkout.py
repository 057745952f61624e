"""A mirror process from any checkout (this one, or an export of main for "before" numbers), on 127.0.0.1.

`python -m bench.soak --checkout /tmp/mirror-main` runs the same workload against another version of the
code: make one with `git archive main | tar -x -C /tmp/mirror-main`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import free_port

THIS_CHECKOUT = Path(__file__).resolve().parents[1]


class CheckoutMirror:
    """`python -m mirror serve` with the code of `checkout`, stopped by its pid."""

    def __init__(
        self, checkout: Path, config: dict[str, Any], workdir: Path, *, env: Mapping[str, str | None] | None = None
    ) -> None:
        """`env`: variables to set in the process's environment (None: to remove) over this one's."""
        self.checkout = checkout.resolve()
        self.env = dict(env or {})
        self.port = free_port()
        self.config = {**config, "listen": f"127.0.0.1:{self.port}"}
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mirror.yml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / "mirror.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True, timeout: float = 120.0) -> float:
        """Start the process; returns seconds until /v2/ answered (when `wait`)."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONPATH"] = str(self.checkout)
        env["PYTHONUNBUFFERED"] = "1"
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        started = time.monotonic()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirror", "serve", "--config", str(self.config_path)],
            cwd=self.checkout, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        if not wait:
            return 0.0
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mirror exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as response:
                    if response.status < 500:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                time.sleep(0.005)
        raise RuntimeError("the mirror did not answer /v2/")

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the process has used so far: unlike wall time, hardly
        moved by other work on the machine."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metric(self, name: str, **labels: str) -> float | None:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = "^" + re.escape(name) + (r"\{" + re.escape(label_text) + r"\}" if labels else "") + r" (\S+)$"
        match = re.search(pattern, text, re.M)
        return float(match.group(1)) if match else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
