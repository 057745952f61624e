"""SIGKILL during fills and chunked pushes, many times at random moments: nothing partial or wrong is ever
served, the store stays consistent, and interrupted uploads resume from what was persisted (or are cleanly
unknown).

The mirror is a real process (`mirror_factory`); its upstream is the fake upstream served slowly from a
thread of this process, so a kill lands in the middle of downloads.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cache_helpers import Http, MiB, ThreadedServer, check_store
from tests.fake_upstream import FakeUpstream, digest_of, upstream_config

ROUNDS = 8
RESUMED: list[int] = []  # offsets uploads resumed from after a restart (reported, for the curious)
CHUNK = 512 << 10  # one PATCH


@dataclass
class Push:
    """A chunked upload as a client drives it; what it learnt survives the kill."""

    repo: str
    data: bytes
    location: str | None = None
    acknowledged: int = 0  # bytes the server confirmed (202 Range)
    finished: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return digest_of(self.data)

    def run(self, client: Http) -> None:
        try:
            if self.location is None:
                status, headers, _ = client.request("POST", f"/v2/{self.repo}/blobs/uploads/")
                assert status == 202, status
                self.location = headers["location"]
            while self.acknowledged < len(self.data):
                chunk = self.data[self.acknowledged : self.acknowledged + CHUNK]
                end = self.acknowledged + len(chunk) - 1
                status, headers, body = client.request(
                    "PATCH", self.location, chunk,
                    {"Content-Type": "application/octet-stream", "Content-Range": f"{self.acknowledged}-{end}"},
                    pieces_delay=0.008,
                )
                assert status == 202, (status, body)
                self.acknowledged = int(headers["range"].split("-")[1]) + 1
            status, _, body = client.request("PUT", f"{self.location}?digest={self.digest}", b"")
            assert status == 201, (status, body)
            self.finished = True
        except (OSError, http.client.HTTPException) as exc:
            self.errors.append(repr(exc))  # the kill


@dataclass
class Pull:
    repo: str
    data: bytes
    received: bytes | None = None
    status: int | None = None
    errors: list[str] = field(default_factory=list)

    def run(self, client: Http) -> None:
        try:
            self.status, _, self.received = client.request("GET", f"/v2/{self.repo}/blobs/{digest_of(self.data)}")
        except (OSError, http.client.HTTPException) as exc:
            self.errors.append(repr(exc))


def check_upload_after_restart(client: Http, push: Push) -> None:
    """The session resumes from exactly what was persisted, or is cleanly unknown; either way the blob can
    then be pushed and reads back right."""
    if push.finished:
        return
    if push.location is not None:
        status, headers, body = client.request("GET", push.location)
        if status == 204:
            persisted = int(headers["range"].split("-")[1]) + 1 if headers["range"] != "0-0" else 0
            assert persisted >= push.acknowledged, "bytes the server confirmed before the kill are gone"
            assert persisted <= len(push.data)
            push.acknowledged = persisted  # resume from what the server says it has
            RESUMED.append(persisted)
            push.run(client)  # the final PUT checks the digest over everything: a wrong prefix would fail
            assert push.finished, push.errors
            return
        assert status == 404 and b"BLOB_UPLOAD_UNKNOWN" in body, (status, body)
    # Never started, or the session is gone (finished and removed just before the kill, or never created):
    # the client starts again.
    status, _, _ = client.request("HEAD", f"/v2/{push.repo}/blobs/{push.digest}")
    if status != 200:
        status, _, body = client.request(
            "POST", f"/v2/{push.repo}/blobs/uploads/?digest={push.digest}", push.data,
            {"Content-Type": "application/octet-stream"},
        )
        assert status == 201, (status, body)
    push.finished = True


@pytest.mark.slow
def test_sigkill_during_fills_and_chunked_pushes(mirror_factory: Any, tmp_path: Path) -> None:
    seed = int(os.environ.get("MIRROR_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    RESUMED.clear()
    print(f"crash test seed {seed} (MIRROR_CRASH_SEED to replay)")
    fake = FakeUpstream(blob_delay=0.006)  # ~10 MB/s: a 2 MiB fill takes ~0.2 s
    wanted = [os.urandom(rng.randrange(1 * MiB, 3 * MiB)) for _ in range(2 * ROUNDS)]
    for data in wanted:
        fake.add_blob(data)
    upstream = ThreadedServer(fake.app()).start()
    data_dir = tmp_path / "data"
    try:
        mirror = mirror_factory(
            {
                "storage": {"path": str(data_dir), "temp_grace": "1h"},
                "upstreams": [upstream_config(upstream.url, library_prefix=True)],
                "local": {"repositories": ["local/**"]},
            }
        )
        client = Http(mirror.port)
        pulled: list[Pull] = []
        pushed: list[Push] = []
        for round_no in range(ROUNDS):
            pulls = [Pull("library/crash", wanted[2 * round_no + i]) for i in range(2)]
            push = Push(f"local/crash{round_no % 3}", os.urandom(rng.randrange(1 * MiB, 3 * MiB)))
            threads = [threading.Thread(target=job.run, args=(client,)) for job in (*pulls, push)]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.02, 0.4))
            mirror.kill()
            for thread in threads:
                thread.join(30)
            mirror.start()
            client.reconciled()  # the index is checked against the files in the background

            # Nothing partial or wrong was served: a body that arrived whole is the right one.
            for pull in pulls:
                if pull.status == 200 and pull.received is not None and len(pull.received) == len(pull.data):
                    assert pull.received == pull.data
            # The store is consistent after recovery (temp files of the killed fills wait for temp_grace).
            check_store(data_dir, temp_files_allowed=True)
            for path in (data_dir / "tmp").iterdir():
                assert path.suffix in (".part", ".evicted"), path
            check_upload_after_restart(client, push)
            pulled += pulls
            pushed.append(push)
            # Every GET returns the right bytes: what was cached, what was cut off (fetched again), what was pushed.
            for pull in pulled:
                status, _, body = client.request("GET", f"/v2/{pull.repo}/blobs/{digest_of(pull.data)}")
                assert status == 200 and hashlib.sha256(body).hexdigest() == digest_of(pull.data)[7:], (
                    round_no, status, len(body), len(pull.data)
                )
            for done in pushed:
                status, _, body = client.request("GET", f"/v2/{done.repo}/blobs/{done.digest}")
                assert status == 200 and body == done.data, (round_no, done.repo, status)
        cut_pulls = sum(1 for pull in pulled if pull.errors)
        cut_pushes = sum(1 for push in pushed if push.errors)
        print(f"kills cut {cut_pulls} of {len(pulled)} pulls and {cut_pushes} of {len(pushed)} pushes; "
              f"resumed uploads: {RESUMED}")
        assert cut_pulls + cut_pushes, "no kill landed during a transfer: the test did not test anything"
        client.fills_settled()
        check_store(data_dir, temp_files_allowed=True)
    finally:
        upstream.stop()


def test_restart_removes_temp_files_of_killed_fills_after_grace(mirror_factory: Any, tmp_path: Path) -> None:
    """A fill killed halfway leaves a temp file; a restart after temp_grace removes it and the next GET
    fetches the blob whole."""
    fake = FakeUpstream(blob_delay=0.02)
    data = os.urandom(2 * MiB)
    fake.add_blob(data)
    upstream = ThreadedServer(fake.app()).start()
    data_dir = tmp_path / "data"
    try:
        mirror = mirror_factory(
            {
                "storage": {"path": str(data_dir), "temp_grace": "1s"},
                "upstreams": [upstream_config(upstream.url, library_prefix=True)],
            }
        )
        client = Http(mirror.port)
        pull = Pull("library/slow", data)
        thread = threading.Thread(target=pull.run, args=(client,))
        thread.start()
        deadline = time.monotonic() + 10
        while not any((data_dir / "tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        mirror.kill()
        thread.join(30)
        assert pull.received is None and pull.errors, "the kill should have cut the download"
        assert [p for p in (data_dir / "tmp").iterdir()], "the killed fill left no temp file to recover from"
        assert not (data_dir / "blobs" / "sha256" / digest_of(data)[7:9] / digest_of(data)[7:]).exists()
        time.sleep(1.1)
        mirror.start()
        client.reconciled()
        assert list((data_dir / "tmp").iterdir()) == []
        status, _, body = client.request("GET", f"/v2/library/slow/blobs/{digest_of(data)}")
        assert status == 200 and body == data
        client.fills_settled()
        check_store(data_dir)
    finally:
        upstream.stop()
