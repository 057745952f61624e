"""Coordination between the parts of one mirror, or between mirror nodes: fill leases and progress, in-use
marks, the LRU index, the tag and token caches, the rate-limit budget and replication rule locks.

`interface.py` is the one protocol; `local.py` the in-process implementation (one node, the default);
`redis.py` the Redis one (`cluster.redis` configured); `open_coordinator` picks by the config."""
