"""The replication engine: runs rules with the copier, on their schedules, one run of a rule at a time.

- Schedules: `schedule` (cron, UTC, parsed by cronsim), `interval` (+ a random `jitter`), `on_push` (local
  sources: a tag pushed to the source repository starts the rule at once; pushes during a run start one
  more run after it), and always on demand (`POST /api/replication/<rule>/run`, `mirror sync`).
- At most `replication_concurrency` (config, default 4) rules copy at once; planning (a tag list and
  HEADs) takes no such slot, so a rule with nothing to copy never queues behind rules that are copying
  (up to PLANNING_RULES plan at once). One rule never runs twice at the same time, in this process (a
  lock) or across processes sharing the data directory (`mirror sync` beside `mirror serve`: a file lock
  per rule, which the server owning the data directory keeps from the rule's first run until it stops).
- A run: plan (tag list + HEADs, see planner.py), then copy what changed. Each image is retried with
  backoff (tenacity) on transient failures; a 429 waits its Retry-After (not counted as an attempt); an
  upstream at its `ratelimit_floor` pauses the rule's GETs (gate.py). The state, the API and the metrics
  say so while it lasts.
- State per rule is saved when a run starts copying (`running`) and when it ends. A state still
  `running` at start-up belongs to a run that was interrupted: it is resumed at once, and the copier's
  HEAD per blob at the destination makes the resumed run skip every blob that had arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from cronsim import CronSim

from mirror.coordination.interface import Coordinator
from mirror.coordination.local import LocalCoordinator
from mirror.errors import RegistryError, TooManyRequests, UpstreamUnavailable
from mirror.metrics import Metrics
from mirror.oci.digest import Digest
from mirror.replication.copier import Copier, CopyOptions
from mirror.replication.destinations import (
    RemoteFactory,
    open_destination,
    open_source,
    remote_registry,
    upstream_client,
)
from mirror.replication.gate import Pause, RateGate
from mirror.replication.planner import Job, Plan, Target, make_plan, select_tags
from mirror.replication.rules import ARCHIVE, OCI_LAYOUT, REGISTRY, Rule
from mirror.replication.serve_lock import FileLock, serve_lock_held, take_serve_lock
from mirror.replication.status import RuleState, load_state_sync, rule_dir, save_state_sync
from mirror.replication.throttle import Bucket, ThrottledRegistry
from mirror.retrying import call_with_retries
from mirror.state import CONFIG, COORDINATOR, METRICS, ROUTER
from mirror.storage.interface import Registry
from mirror.upstream.ratelimit import parse_retry_after

log = logging.getLogger(__name__)

IMAGE_CONCURRENCY = 8  # images of one rule copied at once (an unchanged one costs a HEAD or two)
BLOB_CONCURRENCY = 8  # blobs of one run in flight at once, all its images together
PLANNING_RULES = 32  # rules resolving their tags (a tag list, HEADs) at once, copying or not
RETRY_ATTEMPTS = 3
MAX_RATE_LIMIT_WAITS = 5  # 429s tolerated per image before it counts as failed
SERVER_CHECK_AFTER = 5.0  # seconds a run waits for a rule's lock before asking whether a server keeps it


class RunElsewhere(RegistryError):
    code, status, default_message = "DENIED", 409, "this replication rule runs in another process"


class Progress(Protocol):
    """What `mirror sync` shows while a run goes."""

    def planned(self, rule: str, images: int) -> None: ...

    def bytes_written(self, rule: str, count: int) -> None: ...

    def image_done(self, rule: str) -> None: ...


@dataclass(slots=True)
class ImageReport:
    tag: str
    source_digest: str
    destinations: list[str]  # keys that needed (or, in a dry run, would need) a copy
    outcome: str  # copied | unchanged | failed | would-copy
    error: str | None = None


@dataclass(slots=True)
class RunReport:
    rule: str
    result: str  # ok | partial | failed
    dry_run: bool = False
    copied: int = 0
    unchanged: int = 0
    failed: int = 0
    bytes: int = 0
    pruned: int = 0
    errors: list[str] = field(default_factory=list)
    images: list[ImageReport] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "result": self.result, "dry_run": self.dry_run, "copied": self.copied,
            "unchanged": self.unchanged, "failed": self.failed, "bytes": self.bytes, "pruned": self.pruned,
            "errors": self.errors,
            "images": [
                {"tag": i.tag, "digest": i.source_digest, "destinations": i.destinations, "outcome": i.outcome,
                 **({"error": i.error} if i.error else {})}
                for i in self.images
            ],
        }


def _transient(error: BaseException) -> bool:
    """Worth another attempt: the network, an upstream's 5xx, a destination's hiccup."""
    if isinstance(error, TooManyRequests):
        return False  # waited for separately, by its Retry-After
    if isinstance(error, (UpstreamUnavailable, aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)):
        return True
    return isinstance(error, RegistryError) and error.status >= 500


def next_run_at(rule: Rule, state: RuleState, now: float, rng: random.Random) -> float | None:
    """When the schedule next wants `rule` to run (wall clock), or None for on-demand / on_push rules."""
    jitter = rng.uniform(0.0, rule.jitter) if rule.jitter else 0.0
    if rule.interval is not None:
        if state.last_run_started is None:
            return now + jitter
        return max(state.last_run_started + rule.interval + jitter, now)
    if rule.schedule is not None:
        start = datetime.fromtimestamp(now, UTC)
        return next(CronSim(rule.schedule, start)).timestamp() + jitter
    return None


class ReplicationEngine:
    def __init__(
        self,
        app: web.Application,
        *,
        remote: RemoteFactory = remote_registry,
        recheck: float | None = None,
        max_concurrent: int | None = None,
        retry_wait: float = 1.0,
    ) -> None:
        config = app[CONFIG]
        self.app = app
        self.metrics: Metrics = app[METRICS]
        self.rules: dict[str, Rule] = {rule.name: rule for rule in config.replication}
        self.root = config.storage.path / "replication"
        self.remote = remote
        self.recheck = recheck
        self.retry_wait = retry_wait
        self._floors = {u.name: u.ratelimit_floor for u in config.upstreams}
        self._slots = asyncio.Semaphore(max_concurrent or config.replication_concurrency)  # runs that copy
        self._plan_slots = asyncio.Semaphore(PLANNING_RULES)
        # One run of a rule at a time: on this node and, with a cluster, on every node (the file lock in
        # `_rule_file_lock` also keeps out a `mirror sync` of another process on this data directory).
        self.coordinator: Coordinator = app.get(COORDINATOR) or LocalCoordinator()
        self._wake = {name: asyncio.Event() for name in self.rules}
        self._states: dict[str, RuleState] = {name: RuleState(name) for name in self.rules}
        self._live_bytes: dict[str, int] = {}
        self._gates: dict[str, RateGate] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._kept = contextlib.AsyncExitStack()  # what outlives a run: registry destinations' sessions
        self._kept_destinations: dict[tuple[str, str], Registry] = {}
        self._serve_lock: FileLock | None = None
        self._held_rule_locks: dict[str, FileLock] = {}  # rule -> its run lock, kept while this engine schedules
        self._rng = random.Random()
        self.scheduling = False

    # -- life --------------------------------------------------------------------------------------
    async def load(self) -> None:
        states = await asyncio.to_thread(lambda: {n: load_state_sync(self.root, n) for n in self.rules})
        self._states.update(states)
        # Every rule's series exist from the start, at zero: a dashboard or an alert comparing "failed"
        # with "ok" runs must not see a missing series where nothing happened yet.
        for name in self.rules:
            for result in ("ok", "partial", "failed"):
                self.metrics.replication_runs.labels(name, result)
            for outcome in ("copied", "unchanged", "failed"):
                self.metrics.replication_images.labels(name, outcome)
            self.metrics.replication_failures.labels(name)
            self.metrics.replication_bytes.labels(name)

    async def start_schedules(self) -> None:
        """Run the rules on their schedules (mirror serve); at most one server per data directory does."""
        # Taken even without rules: `mirror sync` learns from it that a server owns this data directory.
        lock = await take_serve_lock(self.app[CONFIG].storage.path)
        if lock is None:
            return
        self._serve_lock = lock
        self.scheduling = True
        for rule in self.rules.values():
            self._spawn(self._schedule_loop(rule))
        if any(rule.on_push for rule in self.rules.values()):
            self._spawn(self._push_listener())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._kept.aclose()
        self._kept_destinations.clear()
        for lock in self._held_rule_locks.values():
            await asyncio.to_thread(lock.release)
        self._held_rule_locks.clear()
        if self._serve_lock is not None:
            self._serve_lock.release()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- triggers ----------------------------------------------------------------------------------
    def trigger(self, name: str) -> str:
        """Start `name` now: "started", or "queued" when it is running (one more run follows this one)."""
        if name not in self.rules:
            raise KeyError(name)
        running = self.coordinator.rule_running_here(name)
        if self.scheduling:
            self._wake[name].set()
        else:
            self._spawn(self._run_logged(self.rules[name]))
        return "queued" if running else "started"

    async def run_and_wait(self, name: str) -> RunReport:
        """Start `name` now (after the run in progress, if one is) and wait for the run to end. The run
        is the engine's, not the caller's: a caller that goes away (a client closing its connection)
        does not cancel it."""
        if name not in self.rules:
            raise KeyError(name)
        task: asyncio.Task[RunReport] = asyncio.create_task(self.run_rule(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _push_listener(self) -> None:
        local = self.app[ROUTER].local
        feed = getattr(local, "pushes", None)
        if feed is None:
            return
        queue = feed.subscribe()
        try:
            while True:
                pushed = await queue.get()
                for rule in self.rules.values():
                    if (rule.on_push and rule.source.upstream is None and rule.source.repository == pushed.repo
                            and select_tags([pushed.tag], rule.tags)):
                        log.info("push of %s:%s starts replication rule %s", pushed.repo, pushed.tag, rule.name)
                        self._wake[rule.name].set()
        finally:
            feed.unsubscribe(queue)

    async def _schedule_loop(self, rule: Rule) -> None:
        wake = self._wake[rule.name]
        if self._states[rule.name].result == "running":
            log.info("replication rule %s was interrupted (its last run never finished): resuming it", rule.name)
            wake.set()
        while True:
            state = self._states[rule.name]  # replaced when another process ran the rule meanwhile
            due = next_run_at(rule, state, time.time(), self._rng)
            state.next_run = due
            delay = None if due is None else max(due - time.time(), 0.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=delay)
            wake.clear()
            await self._run_logged(rule)

    async def _run_logged(self, rule: Rule) -> None:
        try:
            await self.run_rule(rule.name)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a scheduler must outlive any one run
            log.exception("replication rule %s: run crashed", rule.name)

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        listed = []
        for name, rule in self.rules.items():
            state = self._states[name]
            data = state.public()
            data.update(
                running=self.coordinator.rule_running_here(name),
                source=str(rule.source),
                destinations=[d.key for d in rule.destinations],
                schedule=rule.schedule,
                interval=rule.interval,
                on_push=rule.on_push,
            )
            if name in self._live_bytes:
                data["bytes"] = self._live_bytes[name]
            listed.append(data)
        return listed

    def state(self, name: str) -> RuleState:
        return self._states[name]

    # -- a run -------------------------------------------------------------------------------------
    async def run_rule(self, name: str, *, dry_run: bool = False, progress: Progress | None = None) -> RunReport:
        rule = self.rules[name]
        if dry_run:  # reads only: it needs no lock, and takes none (a lock file is a write too)
            return await self._run(rule, dry_run=True, progress=progress)
        # No slot yet: the plan (tag list and HEADs) does not need one, only a copy does (`_copy_slot`).
        async with self.coordinator.rule_lock(name):
            try:
                async with self._rule_file_lock(name):
                    return await self._run(rule, dry_run=False, progress=progress)
            except RunElsewhere as exc:
                log.warning("replication rule %s: %s", name, exc.message)
                return RunReport(name, "failed", errors=[exc.message])

    @contextlib.asynccontextmanager
    async def _rule_file_lock(self, name: str) -> AsyncIterator[None]:
        if name in self._held_rule_locks:
            yield
            return
        lock = FileLock(rule_dir(self.root, name) / "run.lock")
        waited_since: float | None = None
        while not await asyncio.to_thread(lock.try_acquire):
            if waited_since is None:
                log.info("replication rule %s runs in another process: waiting for it", name)
                waited_since = time.monotonic()
            elif (not self.scheduling and time.monotonic() - waited_since > SERVER_CHECK_AFTER
                  and await asyncio.to_thread(serve_lock_held, self.app[CONFIG].storage.path)):
                # A serving process keeps its rules' locks (below): waiting would be forever.
                raise RunElsewhere(f"the mirror serve that owns {self.app[CONFIG].storage.path} runs this "
                                   f"rule: ask it (POST /api/replication/{name}/run)")
            await asyncio.sleep(0.5)
        if waited_since is not None:  # that process changed the rule's state: continue from what it saved
            self._states[name] = await asyncio.to_thread(load_state_sync, self.root, name)
        if self.scheduling:
            # This process owns the data directory (the serve lock): from now on no other process runs this
            # rule (`mirror sync` goes through this server's API), so the lock is kept until the engine
            # closes instead of being taken and given back, two thread hops, at every run.
            self._held_rule_locks[name] = lock
            yield
            return
        try:
            yield
        finally:
            await asyncio.to_thread(lock.release)  # a close that flushes: off the event loop, like the acquire

    def _gate(self, rule: Rule) -> RateGate | None:
        upstream = rule.source.upstream
        if upstream is None:
            return None
        if upstream not in self._gates:
            client = upstream_client(self.app, upstream)
            self._gates[upstream] = RateGate(client, self._floors.get(upstream, 0), recheck=self.recheck)
        return self._gates[upstream]

    def _pause_listener(self, rule: Rule) -> Callable[[Pause | None], None]:
        state = self._states[rule.name]

        def listen(pause: Pause | None) -> None:
            for reason in ("ratelimit", "retry-after"):
                self.metrics.replication_paused.labels(rule.name, reason).set(
                    1 if pause is not None and pause.reason == reason else 0)
            if pause is None:
                state.paused = None
            else:
                since = state.paused["since"] if state.paused else time.time()
                state.paused = {"reason": pause.reason, "upstream": pause.upstream, "until": pause.until,
                                "remaining": pause.remaining, "floor": pause.floor, "since": since}
            self._spawn(asyncio.to_thread(save_state_sync, self.root, _snapshot(state)))

        return listen

    async def _run(self, rule: Rule, *, dry_run: bool, progress: Progress | None) -> RunReport:
        state = self._states[rule.name]
        report = RunReport(rule.name, "ok", dry_run=dry_run)
        started = time.time()
        if not dry_run:
            state.resumed = state.result == "running"
            state.last_run_started = started  # moved to when copying starts, if the run has to wait for a slot
        self._live_bytes[rule.name] = 0
        log.info("replication rule %s: %s%s", rule.name, "dry run" if dry_run else "run",
                 " (resuming an interrupted run)" if state.resumed and not dry_run else "")
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._run_jobs(rule, state, report, stack, dry_run=dry_run, progress=progress)
        except asyncio.CancelledError:
            raise  # the state stays "running": the next start resumes the run
        except Exception as exc:  # noqa: BLE001 - reported in the state, the API and the metrics
            report.result = "failed"
            message = exc.message if isinstance(exc, RegistryError) else f"{type(exc).__name__}: {exc}"
            report.errors.append(message)
            log.warning("replication rule %s failed: %s", rule.name, message)
        finally:
            self._live_bytes.pop(rule.name, None)
            self.metrics.replication_running.labels(rule.name).set(0)
        if report.result != "failed" and report.failed:
            report.result = "partial" if report.copied or report.unchanged else "failed"
        if dry_run:
            return report
        finished = time.time()
        state.result, state.last_run_finished = report.result, finished
        state.bytes, state.images, state.skipped, state.failed = (
            report.bytes, report.copied, report.unchanged, report.failed)
        state.errors = report.errors[:10]
        state.runs += 1
        state.total_bytes += report.bytes
        state.paused = None
        if report.result == "ok":
            state.last_success = finished
            self.metrics.replication_last_success.labels(rule.name).set(finished)
        else:
            self.metrics.replication_failures.labels(rule.name).inc()
        self.metrics.replication_runs.labels(rule.name, report.result).inc()
        for reason in ("ratelimit", "retry-after"):
            self.metrics.replication_paused.labels(rule.name, reason).set(0)
        # Flushed to the disk only after a run that wrote somewhere: what a run that only looked changed
        # (its times and counts) is worth no fsync. A power loss that drops it costs the next run a full
        # check, nothing more.
        durable = bool(report.copied or report.pruned or report.bytes)
        await asyncio.to_thread(partial(save_state_sync, durable=durable), self.root, _snapshot(state))
        log.info("replication rule %s: %s in %.1f s: %d copied, %d unchanged, %d failed, %d bytes",
                 rule.name, report.result, finished - started, report.copied, report.unchanged, report.failed,
                 report.bytes)
        return report

    @contextlib.asynccontextmanager
    async def _copy_slot(self, rule: Rule, state: RuleState) -> AsyncIterator[None]:
        """One of `replication_concurrency` slots, for a run that has something to write; the state says
        `running` from then on (saved: a run killed from here on is resumed at the next start)."""
        async with self._slots:
            state.result, state.last_run_started = "running", time.time()
            state.bytes = state.images = state.skipped = state.failed = 0
            state.errors = []
            # No fsync: a killed process leaves this in the page cache anyway; only a power loss could
            # drop it, and then the next scheduled run does what the resumed one would have.
            await asyncio.to_thread(partial(save_state_sync, durable=False), self.root, _snapshot(state))
            self.metrics.replication_running.labels(rule.name).set(1)
            yield

    async def _run_jobs(
        self, rule: Rule, state: RuleState, report: RunReport, stack: contextlib.AsyncExitStack, *,
        dry_run: bool, progress: Progress | None,
    ) -> None:
        gate = self._gate(rule)
        listener = self._pause_listener(rule)

        async def before_get(kind: str) -> None:
            if gate is not None:
                await gate.wait(kind, rule.name, listener)

        source: Registry = open_source(rule, self.app, before_get if gate else None, remote=self.remote)
        if rule.bandwidth:
            source = ThrottledRegistry(source, Bucket(rule.bandwidth))
        targets = []
        for spec in rule.destinations:
            folder = rule_dir(self.root, rule.name) / "destinations" / _safe(spec.key)
            if spec.kind == REGISTRY:
                # Kept from run to run (closed with the engine): its connections and tokens are reused,
                # so a rerun with nothing to do costs HEADs, not TCP and token handshakes.
                kept = self._kept_destinations.get((rule.name, spec.key))
                if kept is None:
                    kept = await open_destination(spec, self.app, self._kept, rule=rule.name, state_dir=folder)
                    self._kept_destinations[(rule.name, spec.key)] = kept
                registry = kept
            else:
                registry = await open_destination(spec, self.app, stack, rule=rule.name, state_dir=folder)
            repository = str(rule.source) if spec.kind in (OCI_LAYOUT, ARCHIVE) else (
                spec.repository or rule.source.repository)
            targets.append(Target(spec.key, registry, repository))

        by_listing = self._checked_by_listing(rule, state, targets)
        planned_at = time.time()
        async with self._plan_slots:
            plan = await self._with_retries(
                rule, gate, before_get,
                lambda: make_plan(rule, source, targets, expected=state.expected, written=state.written,
                                  by_listing=by_listing),
            )
        if gate is not None and plan.jobs:
            gate.note_target(rule.source.repository, plan.jobs[0].tag)
        if progress is not None:
            progress.planned(rule.name, len(plan.to_copy))
        if dry_run:
            for job in plan.jobs:
                outcome = "would-copy" if job.stale else "unchanged"
                report.images.append(ImageReport(job.tag, str(job.source_digest), sorted(job.stale), outcome))
                report.unchanged += 0 if job.stale else 1
            report.pruned = sum(len(tags) for tags in plan.gone.values()) if rule.prune else 0
            return
        # Only a run with an image to copy or a tag to prune waits for one of `replication_concurrency`
        # slots: a rule found up to date (HEADs only, and its referrers checked, which costs nothing
        # unless a signature is new) never queues behind rules that are copying.
        if plan.to_copy or (rule.prune and plan.gone):
            await stack.enter_async_context(self._copy_slot(rule, state))

        def on_bytes(count: int) -> None:
            report.bytes += count
            self._live_bytes[rule.name] = report.bytes
            self.metrics.replication_bytes.labels(rule.name).inc(count)
            if progress is not None:
                progress.bytes_written(rule.name, count)

        copier = Copier(CopyOptions(platforms=rule.platforms, referrers=rule.referrers,
                                    blob_concurrency=BLOB_CONCURRENCY), on_bytes=on_bytes)
        expected: dict[str, dict[str, str]] = {}
        by_key = {target.key: target for target in targets}
        image_slots = asyncio.Semaphore(IMAGE_CONCURRENCY)

        async def copy_one(job: Job) -> ImageReport:
            async with image_slots:
                image = await self._copy_job(rule, state, job, plan, source, targets, copier, gate, before_get,
                                             expected)
            if job.stale and progress is not None:
                progress.image_done(rule.name)
            return image

        images = await asyncio.gather(*(copy_one(job) for job in plan.jobs))
        for job, image in zip(plan.jobs, images, strict=True):
            report.images.append(image)
            outcome = image.outcome
            self.metrics.replication_images.labels(rule.name, outcome).inc()
            if outcome == "copied":
                report.copied += 1
            elif outcome == "unchanged":
                report.unchanged += 1
            else:
                report.failed += 1
                report.errors.append(f"{job.tag}: {image.error}")
        for key, wanted in expected.items():
            state.expected[key] = wanted
        if not report.failed:
            # Every tag at these destinations was HEADed (or copied) in this run: the journal is true again.
            for target in targets:
                if target.key not in plan.listed:
                    state.verified[target.key] = planned_at
            await self._release_unselected(rule, plan, targets)
        if rule.prune:
            report.pruned = await self._prune(rule, state, plan, by_key)

    async def _copy_job(
        self, rule: Rule, state: RuleState, job: Job, plan: Plan, source: Registry, targets: list[Target],
        copier: Copier,
        gate: RateGate | None, before_get: Callable[[str], Any], expected: dict[str, dict[str, str]],
    ) -> ImageReport:
        copied = False
        error: str | None = None
        for target in targets:
            current = job.current.get(target.key)
            if current is not None and not rule.referrers:
                self._remember(state, expected, target.key, job, current)
                continue
            want = state.expected.get(target.key, {}).get(str(job.source_digest))
            try:
                if current is not None:
                    # Up to date (the plan's HEAD said so a moment ago): only new signatures may be due.
                    stats = await self._with_retries(
                        rule, gate, before_get,
                        lambda target=target: copier.copy_referrers(  # type: ignore[misc]
                            source, rule.source.repository, job.source_digest, target.registry,
                            target.repository, source_tags=plan.source_tags,
                        ),
                    )
                    dest_digest, changed = current, bool(stats.manifests_written or stats.blobs_written
                                                         or stats.blobs_mounted)
                else:
                    outcome = await self._with_retries(
                        rule, gate, before_get,
                        lambda target=target, want=want: copier.copy(  # type: ignore[misc]
                            source, rule.source.repository, str(job.source_digest),
                            target.registry, target.repository, dest_tag=job.tag,
                            expected_dest_digest=Digest.parse(want) if want else None,
                            source_tags=plan.source_tags,
                        ),
                    )
                    dest_digest, changed = outcome.dest_digest, not outcome.unchanged
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one image failing does not stop the others
                error = exc.message if isinstance(exc, RegistryError) else f"{type(exc).__name__}: {exc}"
                log.warning("replication rule %s: %s:%s to %s failed: %s", rule.name, rule.source, job.tag,
                            target.key, error)
                continue
            self._remember(state, expected, target.key, job, dest_digest)
            copied = copied or changed
        result = "failed" if error else "copied" if copied else "unchanged"
        return ImageReport(job.tag, str(job.source_digest), sorted(job.stale), result, error)

    @staticmethod
    def _checked_by_listing(rule: Rule, state: RuleState, targets: list[Target]) -> set[str]:
        """Registry destinations this run checks by their tag list and the journal rather than a HEAD per
        tag: those whose every tag was HEADed less than `verify_interval` ago. A tag moved at the
        destination by someone else is seen at the next full check; a deleted one, at once."""
        now = time.time()
        kinds = {spec.key: spec.kind for spec in rule.destinations}
        return {
            target.key for target in targets
            if kinds.get(target.key) == REGISTRY and state.written.get(target.key)
            and now - state.verified.get(target.key, float("-inf")) < rule.verify_interval
        }

    @staticmethod
    def _remember(state: RuleState, expected: dict[str, dict[str, str]], key: str, job: Job, digest: Digest) -> None:
        state.written.setdefault(key, {})[job.tag] = str(digest)
        if digest != job.source_digest:
            expected.setdefault(key, {})[str(job.source_digest)] = str(digest)

    @staticmethod
    async def _release_unselected(rule: Rule, plan: Plan, targets: list[Target]) -> None:
        """Destinations that keep content for a rule (the cache pins it) hear what the rule selects now,
        so they can let go of what it no longer does: `unpin_except(rule, digests)` when they have it."""
        selected = {job.source_digest for job in plan.jobs}
        for target in targets:
            release = getattr(target.registry, "unpin_except", None)
            if release is not None:
                await release(rule.name, selected)

    async def _prune(self, rule: Rule, state: RuleState, plan: Plan, by_key: dict[str, Target]) -> int:
        pruned = 0
        for key, tags in plan.gone.items():
            target = by_key.get(key)
            if target is None:
                continue
            for tag in tags:
                try:
                    await target.registry.delete_manifest(target.repository, tag)
                except RegistryError as exc:
                    if exc.status != 404:
                        log.warning("replication rule %s: prune of %s at %s failed: %s", rule.name, tag, key,
                                    exc.message)
                        continue
                state.written.get(key, {}).pop(tag, None)
                pruned += 1
                log.info("replication rule %s: pruned %s:%s (no longer selected)", rule.name, key, tag)
        return pruned

    async def _with_retries(
        self, rule: Rule, gate: RateGate | None, before_get: Callable[[str], Any], attempt_once: Callable[[], Any],
    ) -> Any:
        """Transient failures: RETRY_ATTEMPTS with exponential backoff. A 429: wait its Retry-After (every
        rule at that upstream waits too), then go on; after MAX_RATE_LIMIT_WAITS of them, give up."""
        waits = 0
        while True:
            try:
                return await call_with_retries(attempt_once, attempts=RETRY_ATTEMPTS, retry_on=_transient,
                                               multiplier=self.retry_wait, wait_max=30 * self.retry_wait)
            except TooManyRequests as exc:
                waits += 1
                if gate is None or waits > MAX_RATE_LIMIT_WAITS:
                    raise
                gate.block_for(parse_retry_after(exc.headers.get("Retry-After")))
                await before_get("manifest")  # waits out the Retry-After; the state says so meanwhile


def _snapshot(state: RuleState) -> RuleState:
    """A copy to write from a thread while the loop goes on changing the original."""
    return RuleState(**{name: _copy(getattr(state, name)) for name in state.__slots__})


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in key)[:120]
