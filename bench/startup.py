"""Start-up time with a large cache: seconds until `GET /v2/` answers, and what the index check costs.

    python -m bench.startup --checkout /tmp/mirror-main --checkout .
    python -m bench.startup --restarts 3 --data /tmp/startup-data   # this checkout; keep the data for next time

Generates a data directory of 100,000 tiny cached blobs (files written directly, each linked from one of
1,000 cached repositories; no index), then, for each checkout in turn on that same directory: a first
start (the index is built from the files, or an older version's index is taken over) and `--restarts`
restarts. Reported per start: seconds until /v2/ answered, the CPU seconds the mirror process had used
by then (hardly moved by other work on a shared machine, unlike wall time), what merely starting Python
and importing the app took just before (wall and CPU), and, where the checkout reports it, how long the
reconciliation of the index with the files took (in the background, after /v2/ answered).

The mirror runs from bytecode compiled beforehand (into the work directory, PYTHONPYCACHEPREFIX), as an
installed one does (`pip install` compiles it, and the standard library comes compiled): a checkout run
with PYTHONDONTWRITEBYTECODE=1 compiles every module at every start (~0.3 CPU-s here), which says nothing
about the mirror. `--source` measures that way all the same.
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


def python_env(workdir: Path, *, source: bool) -> dict[str, str | None]:
    """The mirror processes' Python settings: bytecode in the work directory, or none at all (`source`)."""
    if source:
        return {"PYTHONDONTWRITEBYTECODE": "1"}
    return {"PYTHONDONTWRITEBYTECODE": None, "PYTHONPYCACHEPREFIX": str(workdir / "pycache")}


def _child_env(checkout: Path, python: dict[str, str | None]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(checkout)
    for name, value in python.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def compile_checkout(checkout: Path, python: dict[str, str | None]) -> None:
    """What `pip install` does: the package's modules compiled before the first start. With a cache
    prefix, Python reads no `__pycache__` at all, so one import also compiles what the app imports from
    the standard library and site-packages."""
    env = _child_env(checkout, python)
    for command in (["-m", "compileall", "-q", str(checkout / "mirror")], ["-c", "import mirror.app, mirror.cli"]):
        subprocess.run([sys.executable, *command], cwd=checkout, env=env, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)


def import_seconds(checkout: Path, python: dict[str, str | None]) -> tuple[float, float]:
    """What starting Python and importing the app costs on this machine right now (no data touched):
    wall seconds and CPU seconds."""
    before = os.times()
    began = time.monotonic()
    subprocess.run([sys.executable, "-c", "import mirror.app, mirror.cli"], cwd=checkout,
                   env=_child_env(checkout, python), check=True, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - began
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def start_once(checkout: Path, config: dict[str, Any], workdir: Path, python: dict[str, str | None]) -> dict[str, Any]:
    import_wall, import_cpu = import_seconds(checkout, python)
    mirror = CheckoutMirror(checkout, config, workdir, env=python)
    log_size = mirror.log_path.stat().st_size if mirror.log_path.exists() else 0
    try:
        ready = mirror.start(timeout=600)
        ready_cpu = mirror.cpu_seconds()
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
        "ready_cpu_seconds": round(ready_cpu, 2),
        "python_import_seconds": round(import_wall, 3),
        "python_import_cpu_seconds": round(import_cpu, 2),
        "background_reconcile_seconds": round(reconcile, 3) if reconcile is not None else None,
        "of_which_file_scan_seconds": float(scan.group(1)) if scan else None,
        "cached_bytes_indexed": cached,
        "load_average": round(os.getloadavg()[0], 1),
    }


def _or(value: object, otherwise: str) -> str:
    return otherwise if value is None else str(value)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, action="append", help="checkout(s), in order (default: this one)")
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--restarts", type=int, default=1, help="restarts per checkout after its first start")
    parser.add_argument("--data", type=Path,
                        help="data directory to generate once and keep (reused when it holds --blobs blobs already)")
    parser.add_argument("--source", action="store_true", help="no bytecode: compile every module at every start")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="startup-"))
    data = args.data or workdir / "data"
    marker = data / f".bench-startup-{args.blobs}"
    if marker.exists():
        generated = 0.0
    elif data.exists() and any(data.iterdir()):
        parser.error(f"--data {data}: not empty, and not what this bench generated for --blobs {args.blobs}")
    else:
        generated = generate(data, args.blobs, 1000)
        marker.touch()
    expected_bytes = sum(len(f"tiny blob {i}\n") for i in range(args.blobs))
    python = python_env(workdir, source=args.source)
    print(json.dumps({"blobs": args.blobs, "generated_seconds": round(generated, 1), "data": str(data),
                      "bytes": expected_bytes, "bytecode": not args.source}), flush=True)
    config = {
        "storage": {"path": str(data)},
        "upstreams": [{"name": "fake.io", "url": "http://127.0.0.1:9", "default": True, "library_prefix": True}],
    }
    rows = []
    for checkout in args.checkout or [THIS_CHECKOUT]:
        if not args.source:
            compile_checkout(checkout.resolve(), python)
        for n in range(1 + args.restarts):
            label = "first start" if n == 0 else f"restart {n}"
            result = {"checkout": str(checkout), "start": label,
                      **start_once(checkout, config, workdir / f"run-{len(rows)}", python)}
            rows.append(result)
            print(json.dumps(result), flush=True)
    print(f"{'checkout':28} {'start':11} {'ready (s)':>9} {'ready CPU':>9} {'import (s)':>10} {'import CPU':>10} "
          f"{'reconcile (s)':>13} {'file scan (s)':>13} {'indexed ok':>10} {'load':>5}")
    for r in rows:
        print(f"{r['checkout'][-28:]:28} {r['start']:11} {r['ready_seconds']:>9} {r['ready_cpu_seconds']:>9} "
              f"{r['python_import_seconds']:>10} {r['python_import_cpu_seconds']:>10} "
              f"{_or(r['background_reconcile_seconds'], 'before listening'):>13} "
              f"{_or(r['of_which_file_scan_seconds'], '-'):>13} "
              f"{r['cached_bytes_indexed'] == expected_bytes!s:>10} {r['load_average']:>5}")
    for checkout in args.checkout or [THIS_CHECKOUT]:
        restarts = [r for r in rows if r["checkout"] == str(checkout) and r["start"] != "first start"]
        if restarts:
            print(f"{str(checkout)[-28:]}: median of {len(restarts)} restarts: ready "
                  f"{_median([r['ready_seconds'] for r in restarts]):.3f} s, "
                  f"{_median([r['ready_cpu_seconds'] for r in restarts]):.2f} CPU-s; import "
                  f"{_median([r['python_import_seconds'] for r in restarts]):.3f} s, "
                  f"{_median([r['python_import_cpu_seconds'] for r in restarts]):.2f} CPU-s")
    if args.data is None:
        shutil.rmtree(data, ignore_errors=True)  # the mirrors' logs stay in run-*/ for a look
    print(f"logs: {workdir}/run-*/mirror.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
