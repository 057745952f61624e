"""Start-up time with a large cache: seconds until `GET /v2/` answers, and what the index check costs.

    python -m bench.startup --checkout /tmp/mirror-main --checkout .

Generates a data directory of 100,000 tiny cached blobs (files written directly, each linked from one of
1,000 cached repositories; no index), then, for each checkout in turn on that same directory: a first
start (the index is built from the files, or an older version's index is taken over) and a restart.
Reported per start: seconds until /v2/ answered (and, for scale, what merely starting Python and importing
the app took just before: on a loaded machine that is most of it) and, where the checkout reports it, how
long the reconciliation of the index with the files took (in the background, after /v2/ answered).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.checkout import THIS_CHECKOUT, CheckoutMirror


def generate(data: Path, blobs: int, repositories: int) -> float:
    started = time.monotonic()
    per_repo = max(blobs // repositories, 1)
    for i in range(blobs):
        body = f"tiny blob {i}\n".encode()
        hex_ = hashlib.sha256(body).hexdigest()
        blob = data / "blobs" / "sha256" / hex_[:2] / hex_
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(body)
        link = data / "cache" / "fake.io" / "library" / f"app{i // per_repo}" / "_layers" / "sha256" / hex_
        if i % per_repo == 0:
            link.parent.mkdir(parents=True, exist_ok=True)
        link.touch()
    return time.monotonic() - started


def import_seconds(checkout: Path) -> float:
    """What starting Python and importing the app costs on this machine right now (no data touched)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(checkout)
    began = time.monotonic()
    subprocess.run([sys.executable, "-c", "import mirror.app"], cwd=checkout, env=env, check=True,
                   stdin=subprocess.DEVNULL)
    return time.monotonic() - began


def start_once(checkout: Path, config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    baseline = import_seconds(checkout)
    mirror = CheckoutMirror(checkout, config, workdir)
    log_size = mirror.log_path.stat().st_size if mirror.log_path.exists() else 0
    try:
        ready = mirror.start(timeout=600)
        reconcile = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            reconciled = mirror.metric("mirror_index_reconciled")
            if reconciled is None:  # a version that checks the index before it listens
                break
            if reconciled == 1:
                reconcile = mirror.metric("mirror_index_reconcile_seconds")
                break
            time.sleep(0.05)
        cached = mirror.metric("mirror_stored_bytes", holder="cached")
    finally:
        mirror.stop()
    log = mirror.log_path.read_text()[log_size:]
    scan = re.search(r"reconciliation: .*?\(scan ([\d.]+) s\)", log)
    return {
        "ready_seconds": round(ready, 3),
        "python_import_seconds": round(baseline, 3),
        "background_reconcile_seconds": round(reconcile, 3) if reconcile is not None else None,
        "of_which_file_scan_seconds": float(scan.group(1)) if scan else None,
        "cached_bytes_indexed": cached,
    }


def _or(value: object, otherwise: str) -> str:
    return otherwise if value is None else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, action="append", help="checkout(s), in order (default: this one)")
    parser.add_argument("--blobs", type=int, default=100_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="startup-"))
    data = workdir / "data"
    generated = generate(data, args.blobs, 1000)
    expected_bytes = sum(len(f"tiny blob {i}\n") for i in range(args.blobs))
    print(json.dumps({"blobs": args.blobs, "generated_seconds": round(generated, 1), "data": str(data),
                      "bytes": expected_bytes}), flush=True)
    config = {
        "storage": {"path": str(data)},
        "upstreams": [{"name": "fake.io", "url": "http://127.0.0.1:9", "default": True, "library_prefix": True}],
    }
    rows = []
    for checkout in args.checkout or [THIS_CHECKOUT]:
        for label in ("first start", "restart"):
            result = {"checkout": str(checkout), "start": label,
                      **start_once(checkout, config, workdir / f"run-{len(rows)}")}
            rows.append(result)
            print(json.dumps(result), flush=True)
    print(f"{'checkout':32} {'start':12} {'ready (s)':>9} {'import (s)':>10} {'reconcile (s)':>13} "
          f"{'file scan (s)':>13} {'indexed ok':>10}")
    for r in rows:
        print(f"{r['checkout'][-32:]:32} {r['start']:12} {r['ready_seconds']:>9} {r['python_import_seconds']:>10} "
              f"{_or(r['background_reconcile_seconds'], 'before listening'):>13} "
              f"{_or(r['of_which_file_scan_seconds'], '-'):>13} "
              f"{r['cached_bytes_indexed'] == expected_bytes!s:>10}")
    shutil.rmtree(data, ignore_errors=True)  # the mirrors' logs stay in run-*/ for a look
    print(f"logs: {workdir}/run-*/mirror.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
