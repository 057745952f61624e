"""The one place that picks the Coordinator from the config: in-process unless `cluster.redis` is set."""

from __future__ import annotations

from mirror.config import ClusterConfig
from mirror.coordination.interface import Coordinator
from mirror.coordination.local import LocalCoordinator


def open_coordinator(cluster: ClusterConfig | None) -> Coordinator:
    if cluster is None:
        return LocalCoordinator()
    from mirror.coordination.redis import RedisCoordinator  # redis-py is needed only by a cluster

    # A node that shares its fills is named by its advertised address: the holder of a fill lease is
    # then where the other nodes stream that fill from.
    return RedisCoordinator(
        cluster.redis, prefix=cluster.prefix, display_url=cluster.redis_display, node=cluster.advertise,
        lease_ttl=cluster.lease_ttl, heartbeat=cluster.lease_ttl / 3,
    )
