"""A real Prometheus (Debian's `prometheus`) scraping a mirror, for the dashboard and alert tests."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import ManagedProcess, free_port, require_tool, wait_http


class Prometheus:
    def __init__(self, workdir: Path, target: str, *, rule_files: list[Path], scrape_interval: str = "1s") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": "mirror", "static_configs": [{"targets": [target]}]}],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc = ManagedProcess(
            [
                require_tool("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            name="prometheus",
            log_dir=workdir,
        )

    def start(self) -> Prometheus:
        self.proc.start()
        wait_http(f"{self.url}/-/ready", timeout=30, ready=lambda status: status == 200, proc=self.proc)
        return self

    def stop(self) -> None:
        self.proc.stop()

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.url}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (raises if the expression does not parse)."""
        data = self._get("/api/v1/query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]

    def targets_up(self) -> bool:
        active = self._get("/api/v1/targets")["activeTargets"]
        return bool(active) and all(target["health"] == "up" for target in active)

    def rule_groups(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/rules")["groups"]

    def wait_for_scrapes(self, expr: str, timeout: float = 30.0) -> None:
        """Until `expr` has a result (the mirror's latest numbers are in)."""
        deadline = time.monotonic() + timeout
        while not self.query(expr):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr} has no result after {timeout}s:\n{self.proc.log_text()}")
            time.sleep(0.5)
