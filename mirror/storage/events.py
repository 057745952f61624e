"""Tag pushes to local repositories, announced to whoever listens (the replication engine's on_push rules).

Publishing never waits: each listener has a bounded queue, and a listener that fell behind loses events
(it is told how many) rather than slowing a push down.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

QUEUE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class TagPushed:
    repo: str
    tag: str


class PushFeed:
    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[TagPushed]] = []
        self.dropped = 0

    def subscribe(self) -> asyncio.Queue[TagPushed]:
        queue: asyncio.Queue[TagPushed] = asyncio.Queue(QUEUE_SIZE)
        self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[TagPushed]) -> None:
        if queue in self._queues:
            self._queues.remove(queue)

    def publish(self, repo: str, tag: str) -> None:
        for queue in self._queues:
            try:
                queue.put_nowait(TagPushed(repo, tag))
            except asyncio.QueueFull:
                self.dropped += 1
                log.warning("push event %s:%s dropped: a listener is %d events behind", repo, tag, QUEUE_SIZE)
