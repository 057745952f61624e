"""Per-rule state, persisted in the data directory (`replication/<rule>/state.json`).

It is what `GET /api/replication` shows, and what lets a run interrupted by a crash, a kill or a restart
be resumed at the next start: a state still saying `running` was never finished. Written atomically
(temp file + rename), so a kill in the middle of a write leaves the previous state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
MAX_ERRORS = 10


@dataclass(slots=True)
class RuleState:
    name: str
    result: str = "never"  # never | running | ok | partial | failed
    last_run_started: float | None = None
    last_run_finished: float | None = None
    last_success: float | None = None
    next_run: float | None = None
    bytes: int = 0  # of the last (or current) run
    images: int = 0  # images copied by the last run
    skipped: int = 0  # selected images every destination already had
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    paused: dict[str, Any] | None = None  # {reason, upstream, until, remaining, floor, since}
    runs: int = 0
    total_bytes: int = 0
    resumed: bool = False  # the last run picked up one that had been interrupted
    # dest key -> {source digest: digest written} where they differ (a platform-filtered index)
    expected: dict[str, dict[str, str]] = field(default_factory=dict)
    # dest key -> {tag: digest} this rule wrote or found there: what prune may delete (and only that), and
    # the journal a run between full checks compares with the destination's tag list
    written: dict[str, dict[str, str]] = field(default_factory=dict)
    # dest key -> when a run last HEADed every selected tag there (registry destinations; see verify_interval)
    verified: dict[str, float] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        del data["expected"], data["written"]
        return data

    def add_error(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message[:500])


def rule_dir(root: Path, name: str) -> Path:
    return root / name


def load_state_sync(root: Path, name: str) -> RuleState:
    path = rule_dir(root, name) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return RuleState(name)
    except (OSError, ValueError) as exc:
        log.warning("replication state %s unreadable (%s): starting that rule's state afresh", path, exc)
        return RuleState(name)
    known = {f.name for f in fields(RuleState)}
    values = {k: v for k, v in data.items() if k in known} if isinstance(data, dict) else {}
    values["name"] = name
    try:
        return RuleState(**values)
    except TypeError:
        return RuleState(name)


def save_state_sync(root: Path, state: RuleState, *, durable: bool = True) -> None:
    """`durable=False` skips the fsync (~10 ms on a VM's disk): for the "running" mark a run leaves at its
    start, which a killed process leaves in the page cache anyway; only a power loss could drop it, and
    then the next scheduled run does what the resumed one would have."""
    folder = rule_dir(root, state.name)
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{STATE_FILE}.{os.getpid()}.tmp"
    try:
        with open(temp, "w") as handle:
            json.dump(asdict(state), handle, separators=(",", ":"))
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, folder / STATE_FILE)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
