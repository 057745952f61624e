"""Real-client test harness for the mirror.

Builders of OCI image layouts, wrappers around real binaries (the CNCF
distribution registry, skopeo, dockerd/containerd) and a token server, all
confined to 127.0.0.1 and all stoppable by the pid of what they started.
Fixtures live in ``tests.support.fixtures`` (load it with ``pytest_plugins``).
"""
