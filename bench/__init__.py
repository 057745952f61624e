"""Benchmarks: the mirror against the CNCF distribution registry in proxy mode, same machine, same run."""
