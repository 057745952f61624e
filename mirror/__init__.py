"""mirror: a container registry mirror (pull-through cache, private registry, replication proxy)."""

__version__ = "0.1.0"
