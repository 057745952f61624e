"""`python -m bench.bundles`: air-gap bundles against skopeo on the same data in the same run.

export: `mirror export IMAGE --to X.tar` (reading the mirror's own store) against
        `skopeo copy docker://MIRROR/IMAGE oci-archive:Y.tar:REF` (the same image, over HTTP).
import: `mirror import X.tar` into a running mirror with an empty store (verify every digest, then store)
        against `skopeo copy oci-archive:X.tar:REF docker://EMPTY-MIRROR/IMAGE` (a push of the same bytes,
        which verifies nothing before it writes).
Both sides run as the programs users run, process start included; rounds alternate the two. These
machines are small and shared: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.seed import seed_big_image
from tests.support import skopeo
from tests.support.mirror_proc import REPO_ROOT, MirrorProcess
from tests.support.procs import free_port

IMAGE = "bench/big:1"


def _mirror(root: Path, label: str) -> MirrorProcess:
    config = {"listen": f"127.0.0.1:{free_port()}", "storage": {"path": str(root / f"{label}-data")}}
    return MirrorProcess(config, workdir=root / label).start()


def _cli(*args: str | Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mirror", *map(str, args)], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"mirror {args[0]} failed: {result.stderr}")
    return elapsed


def _timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _fresh(mirror: MirrorProcess) -> None:
    mirror.stop()
    shutil.rmtree(Path(mirror.config["storage"]["path"]), ignore_errors=True)
    mirror.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bundles")
    parser.add_argument("--size-mb", type=int, default=200, help="size of the image's one layer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "bundles.json")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-bundles-"))
    source, empty = _mirror(root, "source"), _mirror(root, "empty")
    keys = ("export", "skopeo_export", "import", "skopeo_import", "startup")
    times: dict[str, list[float]] = {key: [] for key in keys}
    try:
        seed_big_image(source.url, root, args.size_mb)
        ref = IMAGE  # the bundle's ref.name of a local image is its local name
        for _ in range(args.rounds):
            ours, theirs = root / "ours.tar", root / "theirs.tar"
            for path in root.glob("*.tar*"):
                path.unlink()
            # What a Python command pays before any work (imports: aiohttp & co.); a Go binary does not.
            times["startup"].append(_cli("export", "--help"))
            times["export"].append(_cli("export", "--config", source.config_path, IMAGE, "--to", ours))
            times["skopeo_export"].append(_timed(functools.partial(
                skopeo.copy, f"docker://{source.host}/{IMAGE}", f"oci-archive:{theirs}:{ref}")))
            _fresh(empty)
            times["import"].append(_cli("import", "--config", empty.config_path, ours))
            _fresh(empty)
            times["skopeo_import"].append(_timed(functools.partial(
                skopeo.copy, f"oci-archive:{ours}:{ref}", f"docker://{empty.host}/{IMAGE}")))
    finally:
        source.stop()
        empty.stop()
        shutil.rmtree(root, ignore_errors=True)
    medians = {key: statistics.median(values) for key, values in times.items()}
    rows = [("export", medians["export"], medians["skopeo_export"]),
            ("import", medians["import"], medians["skopeo_import"])]
    startup = medians["startup"]
    print(f"{'scenario':<8} {'mirror s':>9} {'skopeo s':>9} {'ratio':>6} {'ratio w/o start-up':>19}"
          f"   ({args.size_mb} MB, {args.rounds} rounds, Python start-up {startup:.2f} s)")
    for name, ours_s, theirs_s in rows:
        print(f"{name:<8} {ours_s:>9.2f} {theirs_s:>9.2f} {ours_s / theirs_s:>6.2f} "
              f"{(ours_s - startup) / theirs_s:>19.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size_mb": args.size_mb, "rounds": args.rounds, "seconds": times,
                                    "median": medians}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
