"""`mirror sync [--config FILE] [--rule NAME] [--dry-run]`: run replication rules once, now.

Progress bars (images and bytes) go to stderr, the summary table to stdout; the exit status is 0 when
every selected image is at every destination, 1 when anything failed, 2 for a usage or config error.

Against a data directory a `mirror serve` is using (it holds `replication/serve.lock`), sync does not open
the stores itself — start-up recovery in a second process could remove a blob the server has just
committed — but asks that server through its API (`POST /api/replication/<rule>/run`) and follows the
rule's state until the run ends. Otherwise it opens the stores in-process (mirror/replication/standalone.py).
A dry run plans (tag lists and HEADs) and writes nothing: no destination, no state.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from mirror.config import Config
from mirror.replication.engine import RunReport
from mirror.replication.hosting import REPLICATION
from mirror.replication.serve_lock import serve_lock_held


class _Bars:
    """The engine's Progress, drawn with rich: one bar of images, one line of bytes (their total is unknown
    until the manifests have been read, so it shows the amount and the speed)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.started = time.monotonic()
        self.images: TaskID = progress.add_task("images", total=0, amount="0/0")
        self.bytes: TaskID = progress.add_task("bytes", total=None, amount="0 B")
        self.written = 0

    def planned(self, rule: str, images: int) -> None:
        task = self.progress.tasks[self.images]
        total = (task.total or 0) + images
        self.progress.update(self.images, total=total, description=f"images ({rule})",
                             amount=f"{int(task.completed)}/{int(total)}")

    def bytes_written(self, rule: str, count: int) -> None:
        self.written += count
        speed = self.written / max(time.monotonic() - self.started, 1e-3)
        self.progress.update(self.bytes, amount=f"{decimal(self.written)} at {decimal(int(speed))}/s")

    def image_done(self, rule: str) -> None:
        self.progress.advance(self.images, 1)
        task = self.progress.tasks[self.images]
        self.progress.update(self.images, amount=f"{int(task.completed)}/{int(task.total or 0)}")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
        TimeElapsedColumn(), console=console, transient=False,
    )


def run_sync(config: Config, rule: str | None, dry_run: bool) -> int:
    names = [r.name for r in config.replication]
    if not names:
        print("mirror: no replication rules in the config", file=sys.stderr)
        return 2
    if rule is not None and rule not in names:
        print(f"mirror: no replication rule named {rule!r} (configured: {', '.join(names)})", file=sys.stderr)
        return 2
    selected = [rule] if rule is not None else names
    if serve_lock_held(config.storage.path):
        reports = asyncio.run(_through_server(config, selected, dry_run))
    else:
        reports = asyncio.run(_in_process(config, selected, dry_run))
    if reports is None:
        return 2
    _summary(reports, dry_run)
    return 0 if all(r["result"] == "ok" for r in reports) else 1


async def _in_process(config: Config, names: Sequence[str], dry_run: bool) -> list[dict[str, Any]]:
    from mirror.replication.standalone import open_app

    console = Console(stderr=True)
    async with open_app(config) as app:
        engine = app[REPLICATION]
        with _progress(console) as progress:
            bars = _Bars(progress)
            # All at once: the engine runs `replication_concurrency` of them at a time, the rest wait.
            reports: list[RunReport] = await asyncio.gather(
                *(engine.run_rule(name, dry_run=dry_run, progress=bars) for name in names))
    return [report.public() for report in reports]


def _server_url(config: Config) -> str:
    host = config.listen.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{config.listen.port}" if ":" in host else f"http://{host}:{config.listen.port}"


async def _through_server(config: Config, names: Sequence[str], dry_run: bool) -> list[dict[str, Any]] | None:
    base = _server_url(config)
    console = Console(stderr=True)
    console.print(f"a mirror serve uses {config.storage.path}: running through its API at {base}")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:
        if dry_run:
            planned: list[dict[str, Any]] = []
            for name in names:
                async with session.post(f"{base}/api/replication/{name}/run", params={"dry_run": "1"}) as response:
                    if response.status != 200:
                        console.print(f"mirror: the server refused {name}: {response.status} {await response.text()}")
                        return None
                    planned.append(await response.json())
            return planned
        # Every rule at once; the server runs `replication_concurrency` of them at a time, and each
        # request is answered when its run has ended (no polling: a rerun with nothing to do is quick).
        with _progress(console) as progress:
            reports = await asyncio.gather(*(_run_in_server(session, base, name, progress) for name in names))
    return None if any(report is None for report in reports) else [r for r in reports if r is not None]


async def _run_in_server(
    session: aiohttp.ClientSession, base: str, name: str, progress: Progress
) -> dict[str, Any] | None:
    task = progress.add_task(f"{name} (in the server)", total=1, amount="")
    async with session.post(f"{base}/api/replication/{name}/run", params={"wait": "1"}) as response:
        if response.status != 200:
            progress.console.print(f"mirror: the server refused {name}: {response.status} {await response.text()}")
            return None
        report: dict[str, Any] = await response.json()
    progress.update(task, completed=1, amount=f"{report['result']}, {decimal(int(report['bytes']))}")
    return report


def _summary(reports: Sequence[dict[str, Any]], dry_run: bool) -> None:
    table = Table(title="mirror sync (dry run: nothing written)" if dry_run else "mirror sync")
    for column in ("rule", "result", "would copy" if dry_run else "copied", "unchanged", "failed", "bytes"):
        table.add_column(column, justify="left" if column in ("rule", "result") else "right")
    for report in reports:
        to_copy = sum(1 for i in report["images"] if i["outcome"] == "would-copy") if dry_run else report["copied"]
        table.add_row(report["rule"], report["result"], str(to_copy), str(report["unchanged"]),
                      str(report["failed"]), decimal(int(report["bytes"])))
    console = Console(width=120)
    console.print(table)
    for report in reports:
        for image in report["images"]:
            if dry_run and image["outcome"] == "would-copy":
                console.print(f"{report['rule']}: would copy {image['tag']} ({image['digest']}) to "
                              f"{', '.join(image['destinations'])}")
        for error in report["errors"]:
            console.print(f"{report['rule']}: {error}", style="red")
