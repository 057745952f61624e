"""The Redis Coordinator: what several mirror nodes agree on, kept in one Redis under a key prefix.

- Leases are `SET key token NX PX ttl`; renew and release are Lua compare-and-set / compare-and-delete on
  the token, so a node whose lease lapsed can never extend or delete the next holder's.
- Fill progress is a hash (holder, committed, size, state, version) written by the holder through a Lua
  script that checks the lease first, then `PUBLISH`es the fill's key on one channel. Each node keeps ONE
  subscription (not one per waiting client) and wakes its local waiters; a waiter also re-reads the hash
  after its timeout, so a lost message or a dead holder is noticed within one heartbeat. Pub/sub rather
  than keyspace polling: a follower streaming a blob wants each step at once, and polling N fills every
  few milliseconds on every node would cost Redis far more than one message per step.
- In-use marks stay a Counter on the loop (no I/O on the hot path); a background task mirrors the set of
  marked keys into `inuse:<key>` sorted sets (member = node, score = expiry), refreshed while held, so a
  dead node's marks lapse by themselves.
- The LRU index is a sorted set (score = last access) beside a hash of sizes and a byte total kept by the
  same scripts: one cluster-wide bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mirror.coordination.interface import (
    DEFAULT_HEARTBEAT,
    DEFAULT_LEASE_TTL,
    CoordinatorUnavailable,
    FillProgress,
    FillState,
    Held,
    Lease,
    LruEntry,
    RateBudget,
    fill_key,
    keep_alive,
    rule_key,
)
from mirror.coordination.keyed_locks import KeyedLocks
from mirror.coordination.local import default_node_name
from mirror.coordination.wakeups import Wakeups

log = logging.getLogger(__name__)

# A finished fill's progress stays readable this long (a follower woken by "done" still reads it); a
# running one's is refreshed with every publication and renewal.
PROGRESS_RETENTION = 60.0
DEFAULT_IN_USE_TTL = 120.0
RULE_POLL_SECONDS = 0.5
# Named locks guard a read-judge-write of a few requests: a short lease (a dead holder frees it soon),
# renewed while held, and a quick poll that backs off to a tenth of a second.
NAMED_LOCK_TTL = 10.0
NAMED_LOCK_FIRST_POLL = 0.005
NAMED_LOCK_MAX_POLL = 0.1

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
return {0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1])}
"""

# KEYS: lease, progress. ARGV: token, ttl_ms, node, retention_ms.
_ACQUIRE_FILL = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1])}
end
local p = redis.call('HMGET', KEYS[2], 'holder', 'committed', 'size', 'state', 'version')
local version = tonumber(p[5] or '0') + 1
if p[4] == 'running' then
  redis.call('HSET', KEYS[2], 'holder', ARGV[3], 'version', version)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  return {2, p[1] or '', p[2] or '0', p[3] or '', version - 1}
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'holder', ARGV[3], 'committed', 0, 'state', 'running', 'version', version)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1}
"""

# KEYS: lease, [progress]. ARGV: token, ttl_ms, retention_ms.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[2] then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return 1
"""

# KEYS: lease. ARGV: "<holder>:" (tokens are "<holder>:<hex>"; the hex part has no colon).
_BREAK = """
local token = redis.call('GET', KEYS[1])
if not token or string.sub(token, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
if string.find(string.sub(token, #ARGV[1] + 1), ':', 1, true) then return 0 end
return redis.call('DEL', KEYS[1])
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

# KEYS: lease, progress. ARGV: token, committed, size ('' = unchanged), state, node, retention_ms, channel, fill.
_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local version = redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('HSET', KEYS[2], 'holder', ARGV[5], 'committed', ARGV[2], 'state', ARGV[4])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'size', ARGV[3]) end
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return version
"""

# KEYS: lease, progress.
_READ_PROGRESS = """
local p = redis.call('HMGET', KEYS[2], 'holder', 'committed', 'size', 'state', 'version')
if not p[5] then return {} end
return {p[1] or '', p[2] or '0', p[3] or '', p[4] or 'running', p[5], redis.call('GET', KEYS[1]) or ''}
"""

# KEYS: lru, sizes, bytes. ARGV: key, size, at.
_TOUCH = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then redis.call('DECRBY', KEYS[3], old) end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[1], 'GT', ARGV[3], ARGV[1])
return 1
"""

# KEYS: lru, sizes, bytes. ARGV: keys.
_REMOVE = """
for _, key in ipairs(ARGV) do
  local size = redis.call('HGET', KEYS[2], key)
  if size then
    redis.call('DECRBY', KEYS[3], size)
    redis.call('HDEL', KEYS[2], key)
  end
  redis.call('ZREM', KEYS[1], key)
end
return 1
"""

# KEYS: budget. ARGV: remaining ('' = unknown), window ('' = unchanged), observed_at.
_OBSERVE = """
local seen = tonumber(redis.call('HGET', KEYS[1], 'observed_at') or '0')
if seen > tonumber(ARGV[3]) then return 0 end
if ARGV[1] == '' then redis.call('HDEL', KEYS[1], 'remaining')
else redis.call('HSET', KEYS[1], 'remaining', ARGV[1]) end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'window', ARGV[2]) end
redis.call('HSET', KEYS[1], 'observed_at', ARGV[3])
return 1
"""

_SPEND = """
if redis.call('HEXISTS', KEYS[1], 'remaining') == 0 then return false end
return redis.call('HINCRBY', KEYS[1], 'remaining', -tonumber(ARGV[1]))
"""

_BLOCK = """
local until_ = tonumber(redis.call('HGET', KEYS[1], 'blocked_until') or '0')
if tonumber(ARGV[1]) > until_ then redis.call('HSET', KEYS[1], 'blocked_until', ARGV[1]) end
return 1
"""


def holder_of(token: str) -> str:
    """Tokens are `<node>:<random>`; node names may contain colons themselves (host:pid)."""
    return token.rpartition(":")[0]


class RedisCoordinator:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mirror",
        node: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        heartbeat: float = DEFAULT_HEARTBEAT,
        in_use_ttl: float = DEFAULT_IN_USE_TTL,
        connect_timeout: float = 5.0,
        display_url: str | None = None,
    ) -> None:
        self.node = node or default_node_name()
        self.display_url = display_url or url  # without a password, for messages
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.heartbeat = heartbeat
        self.in_use_ttl = in_use_ttl
        self.redis: aioredis.Redis = aioredis.from_url(
            url, decode_responses=True, socket_connect_timeout=connect_timeout, health_check_interval=30
        )
        self._channel = self._k("progress-events")
        self._scripts = {
            name: self.redis.register_script(body)
            for name, body in {
                "acquire": _ACQUIRE, "acquire_fill": _ACQUIRE_FILL, "renew": _RENEW, "release": _RELEASE,
                "break": _BREAK,
                "publish": _PUBLISH, "read_progress": _READ_PROGRESS, "touch": _TOUCH, "remove": _REMOVE,
                "observe": _OBSERVE, "spend": _SPEND, "block": _BLOCK,
            }.items()
        }
        self._changed = Wakeups()
        self._in_use: Counter[str] = Counter()
        self._dirty: set[str] = set()
        self._marks_changed = asyncio.Event()
        self._marks_lock = asyncio.Lock()
        self._rule_locks: dict[str, asyncio.Lock] = {}
        self._named_locks = KeyedLocks()
        self._tasks: list[asyncio.Task[None]] = []

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=args)

    # -- life --------------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise CoordinatorUnavailable(f"Redis at {self.display_url} does not answer: {exc}") from exc
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self._channel)
        self._tasks = [
            asyncio.create_task(self._listen(pubsub)),
            asyncio.create_task(self._publish_marks()),
            asyncio.create_task(self._refresh_marks()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        with contextlib.suppress(RedisError, OSError):
            await self._withdraw_marks()
        await self.redis.aclose()

    async def ping(self) -> None:
        await self.redis.ping()

    async def _listen(self, pubsub: Any) -> None:
        try:
            while True:
                try:
                    message = await pubsub.get_message(timeout=1.0)
                except (RedisError, OSError):
                    log.warning("progress subscription to Redis lost; resubscribing", exc_info=True)
                    self._changed.wake_all()  # waiters re-read the hashes: nothing is missed for long
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.subscribe(self._channel)
                    continue
                if message is not None and message.get("type") == "message":
                    self._changed.wake(str(message["data"]))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    # -- leases ------------------------------------------------------------------------------------
    def _token(self) -> str:
        return f"{self.node}:{secrets.token_hex(8)}"

    async def acquire_fill(self, upstream: str, digest: str, ttl: float | None = None) -> Lease | Held:
        key = fill_key(upstream, digest)
        ttl = self.lease_ttl if ttl is None else ttl
        token = self._token()
        reply = await self._run(
            "acquire_fill",
            [self._k("lease", key), self._k("progress", key)],
            [token, int(ttl * 1000), self.node, self._retention_ms(ttl)],
        )
        if reply[0] == 0:
            return Held(key, holder_of(reply[1]), max(int(reply[2]), 0) / 1000)
        lease = Lease(key, token, self.node, ttl)
        if reply[0] == 2:
            _, holder, committed, size, version = reply
            taken_over = FillProgress(
                holder, int(committed), int(size) if size else None, "running", int(version), False
            )
            return Lease(key, token, self.node, ttl, taken_over=taken_over)
        return lease

    def _retention_ms(self, ttl: float) -> int:
        return int(max(PROGRESS_RETENTION, 2 * ttl) * 1000)

    async def _acquire(self, key: str, ttl: float) -> Lease | Held:
        token = self._token()
        reply = await self._run("acquire", [self._k("lease", key)], [token, int(ttl * 1000)])
        if reply[0] == 0:
            return Held(key, holder_of(reply[1]), max(int(reply[2]), 0) / 1000)
        return Lease(key, token, self.node, ttl)

    async def renew(self, lease: Lease) -> bool:
        keys = [self._k("lease", lease.key)]
        if lease.key.startswith("fill:"):
            keys.append(self._k("progress", lease.key))
        args = [lease.token, int(lease.ttl * 1000), self._retention_ms(lease.ttl)]
        return bool(await self._run("renew", keys, args))

    async def break_fill(self, upstream: str, digest: str, holder: str) -> bool:
        return bool(await self._run("break", [self._k("lease", fill_key(upstream, digest))], [f"{holder}:"]))

    async def release(self, lease: Lease) -> bool:
        return bool(await self._run("release", [self._k("lease", lease.key)], [lease.token]))

    # -- progress ----------------------------------------------------------------------------------
    async def publish_progress(
        self, lease: Lease, committed: int, *, size: int | None = None, state: FillState = "running"
    ) -> bool:
        retention = self._retention_ms(lease.ttl) if state == "running" else int(PROGRESS_RETENTION * 1000)
        version = await self._run(
            "publish",
            [self._k("lease", lease.key), self._k("progress", lease.key)],
            [lease.token, committed, "" if size is None else size, state, self.node, retention, self._channel,
             lease.key],
        )
        return bool(version)

    async def _read_progress(self, key: str) -> FillProgress | None:
        reply = await self._run("read_progress", [self._k("lease", key), self._k("progress", key)], [])
        if not reply:
            return None
        holder, committed, size, state, version, lease_token = reply
        alive = bool(lease_token) and holder_of(lease_token) == holder
        return FillProgress(holder, int(committed), int(size) if size else None, state, int(version), alive)

    async def fill_progress(self, upstream: str, digest: str) -> FillProgress | None:
        return await self._read_progress(fill_key(upstream, digest))

    async def wait_progress(
        self, upstream: str, digest: str, seen_version: int, timeout: float
    ) -> FillProgress | None:
        key = fill_key(upstream, digest)
        event = self._changed.watch(key)  # before reading: no message falls between the read and the wait
        try:
            current = await self._read_progress(key)
        except BaseException:
            self._changed.unwatch(key, event)
            raise
        if current is not None and current.version > seen_version:
            self._changed.unwatch(key, event)
            return current
        await self._changed.wait(key, event, timeout)
        return await self._read_progress(key)

    # -- in-use marks ------------------------------------------------------------------------------
    def mark_in_use(self, key: str) -> None:
        self._in_use[key] += 1
        if self._in_use[key] == 1:
            self._dirty.add(key)
            self._marks_changed.set()

    def unmark_in_use(self, key: str) -> None:
        self._in_use[key] -= 1
        if self._in_use[key] <= 0:
            del self._in_use[key]
            self._dirty.add(key)
            self._marks_changed.set()

    def in_use_here(self, key: str) -> bool:
        return key in self._in_use

    async def is_in_use(self, key: str) -> bool:
        if key in self._in_use:
            return True
        return bool(await self.redis.zcount(self._k("inuse", key), time.time(), "+inf"))

    async def flush(self) -> None:
        await self._write_marks()

    async def _write_marks(self) -> None:
        async with self._marks_lock:
            dirty, self._dirty = self._dirty, set()
            if not dirty:
                return
            expires = time.time() + self.in_use_ttl
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key in dirty:
                        if key in self._in_use:
                            pipe.zadd(self._k("inuse", key), {self.node: expires})
                            pipe.pexpire(self._k("inuse", key), int(self.in_use_ttl * 1000))
                        else:
                            pipe.zrem(self._k("inuse", key), self.node)
                    await pipe.execute()
            except BaseException:
                self._dirty |= dirty  # written with the next batch
                raise

    async def _publish_marks(self) -> None:
        while True:
            await self._marks_changed.wait()
            self._marks_changed.clear()
            try:
                await self._write_marks()
            except (RedisError, OSError):
                log.warning("could not publish in-use marks to Redis; retrying", exc_info=True)
                await asyncio.sleep(1.0)
                self._marks_changed.set()

    async def _refresh_marks(self) -> None:
        while True:
            await asyncio.sleep(self.in_use_ttl / 3)
            self._dirty |= set(self._in_use)
            self._marks_changed.set()

    async def _withdraw_marks(self) -> None:
        if not self._in_use:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self._in_use:
                pipe.zrem(self._k("inuse", key), self.node)
            await pipe.execute()

    # -- LRU ---------------------------------------------------------------------------------------
    def _lru_keys(self) -> list[str]:
        return [self._k("lru"), self._k("lru", "sizes"), self._k("lru", "bytes")]

    async def touch(self, key: str, size: int, at: float) -> None:
        await self._run("touch", self._lru_keys(), [key, size, repr(at)])

    async def _entries(self, start: int, stop: int) -> list[LruEntry]:
        ranked: list[Any] = await self.redis.zrange(self._k("lru"), start, stop, withscores=True)
        if not ranked:
            return []
        sizes = await self.redis.hmget(self._k("lru", "sizes"), [key for key, _ in ranked])
        return [LruEntry(key, int(size or 0), float(at)) for (key, at), size in zip(ranked, sizes, strict=True)]

    async def oldest(self, count: int) -> list[LruEntry]:
        return await self._entries(0, count - 1) if count > 0 else []

    async def remove(self, keys: list[str]) -> None:
        if keys:
            await self._run("remove", self._lru_keys(), list(keys))

    async def lru_bytes(self) -> int:
        return int(await self.redis.get(self._k("lru", "bytes")) or 0)

    async def over_bound(self, max_bytes: int, page: int = 256) -> list[LruEntry]:
        excess = await self.lru_bytes() - max_bytes
        victims: list[LruEntry] = []
        start = 0
        while excess > 0:
            entries = await self._entries(start, start + page - 1)
            if not entries:
                break
            for entry in entries:
                victims.append(entry)
                excess -= entry.size
                if excess <= 0:
                    break
            start += page
        return victims

    # -- caches ------------------------------------------------------------------------------------
    async def set_tag(self, upstream: str, repository: str, tag: str, digest: str, ttl: float) -> None:
        await self.redis.set(self._k("tag", upstream, f"{repository}:{tag}"), digest, px=max(int(ttl * 1000), 1))

    async def get_tag(self, upstream: str, repository: str, tag: str) -> str | None:
        value = await self.redis.get(self._k("tag", upstream, f"{repository}:{tag}"))
        return None if value is None else str(value)

    async def set_token(self, upstream: str, scope: str, token: str, ttl: float) -> None:
        await self.redis.set(self._k("token", upstream, scope), token, px=max(int(ttl * 1000), 1))

    async def get_token(self, upstream: str, scope: str) -> str | None:
        value = await self.redis.get(self._k("token", upstream, scope))
        return None if value is None else str(value)

    # -- rate-limit budget -------------------------------------------------------------------------
    async def observe_budget(
        self, upstream: str, remaining: int | None, window: float | None, observed_at: float
    ) -> None:
        args = ["" if remaining is None else remaining, "" if window is None else repr(window), repr(observed_at)]
        await self._run("observe", [self._k("budget", upstream)], args)

    async def spend_budget(self, upstream: str, count: int = 1) -> int | None:
        left = await self._run("spend", [self._k("budget", upstream)], [count])
        return None if left is None else int(left)

    async def block_budget(self, upstream: str, until: float) -> None:
        await self._run("block", [self._k("budget", upstream)], [repr(until)])

    async def budget(self, upstream: str) -> RateBudget | None:
        data = await self.redis.hgetall(self._k("budget", upstream))
        if not data:
            return None
        return RateBudget(
            int(data["remaining"]) if "remaining" in data else None,
            float(data["window"]) if "window" in data else None,
            float(data.get("observed_at", 0.0)),
            float(data.get("blocked_until", 0.0)),
        )

    # -- rule locks --------------------------------------------------------------------------------
    def rule_lock(self, rule: str) -> AbstractAsyncContextManager[None]:
        return self._rule_lock(rule)

    @contextlib.asynccontextmanager
    async def _rule_lock(self, rule: str) -> AsyncIterator[None]:
        local = self._rule_locks.setdefault(rule, asyncio.Lock())
        async with local:  # this node's runs queue here, without asking Redis
            waited = False
            while isinstance(lease := await self._acquire(rule_key(rule), self.lease_ttl), Held):
                if not waited:
                    log.info("replication rule %s runs on node %s: waiting for it", rule, lease.holder)
                    waited = True
                await asyncio.sleep(RULE_POLL_SECONDS)
            try:
                async with keep_alive(self, lease, self.heartbeat):
                    yield
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await self.release(lease)

    def rule_running_here(self, rule: str) -> bool:
        lock = self._rule_locks.get(rule)
        return lock is not None and lock.locked()

    def lock(self, name: str) -> AbstractAsyncContextManager[None]:
        return self._named_lock(name)

    @contextlib.asynccontextmanager
    async def _named_lock(self, name: str) -> AsyncIterator[None]:
        async with self._named_locks.hold(name):  # this node's waiters queue here, without asking Redis
            poll = NAMED_LOCK_FIRST_POLL
            try:
                while isinstance(lease := await self._acquire(f"lock:{name}", NAMED_LOCK_TTL), Held):
                    await asyncio.sleep(poll)
                    poll = min(poll * 2, NAMED_LOCK_MAX_POLL)
            except (RedisError, OSError) as exc:
                raise CoordinatorUnavailable(f"Redis at {self.display_url} does not answer: {exc}") from exc
            try:
                async with keep_alive(self, lease, NAMED_LOCK_TTL / 3):
                    yield
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await self.release(lease)


async def check_redis(url: str, timeout: float = 2.0, *, display: str | None = None) -> None:
    """PING `url` within `timeout`; raises ConnectionError with a sentence a user can act on (naming the
    URL as `display`, which has no password)."""
    client: aioredis.Redis = aioredis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        await asyncio.wait_for(client.ping(), timeout)
    except (RedisError, OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ConnectionError(f"Redis at {display or url} does not answer within {timeout:g} s: {reason}") from exc
    finally:
        await client.aclose()
