"""A real S3 server: Debian's Ceph RADOS Gateway on 127.0.0.1, on one monitor and one in-memory OSD.

Everything lives in a temp dir (config, monitor store, logs, sockets); `auth none` everywhere, one replica,
a `memstore` OSD (nothing on disk but the monitor's small store). Starting takes about 13 s, so tests share
one per session (`rgw` fixture in fixtures.py) and keep apart by bucket. Every process is stopped by pid.

The non-obvious setting is `ms mon client mode = crc secure` for the gateway: without it radosgw never
finishes talking to the monitor and never opens its port.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import ManagedProcess, free_port, require_tool

_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")


@dataclass(frozen=True)
class S3Account:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def new_bucket(gateway: RadosGateway) -> dict[str, Any]:
    """A fresh, empty bucket on `gateway`, as the `storage.s3` config section that reaches it."""
    from aiobotocore.session import get_session

    assert gateway.account is not None
    account = gateway.account
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    async with get_session().create_client(
        "s3", endpoint_url=account.endpoint, region_name=account.region, aws_access_key_id=account.access_key,
        aws_secret_access_key=account.secret_key,
    ) as client:
        await client.create_bucket(Bucket=bucket)
    return {
        "bucket": bucket, "endpoint": account.endpoint, "region": account.region,
        "access_key": account.access_key, "secret_key": account.secret_key,
    }


class RadosGateway:
    def __init__(self, root: Path | None = None) -> None:
        self.paths = {name: require_tool(name) for name in _BINARIES}
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rgw-"))
        self.conf = self.root / "ceph.conf"
        self.port = 0
        self.procs: list[ManagedProcess] = []
        self.account: S3Account | None = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["CEPH_CONF"] = str(self.conf)
        return env

    def _run(self, *argv: str, timeout: float = 60.0) -> str:
        done = subprocess.run(
            [*argv, "-c", str(self.conf)], env=self._env(), capture_output=True, text=True, timeout=timeout,
            cwd=self.root,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def _write_conf(self, mon_v2: int, mon_v1: int, fsid: str) -> None:
        root = self.root
        self.conf.write_text(
            f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon max pg per osd = 1000
mon allow pool size one = true
osd objectstore = memstore
memstore device bytes = 2147483648
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.asok
keyring = /dev/null
mon data = {root}/mon/$cluster-$id
osd data = {root}/osd/$cluster-$id
osd max object name len = 256
osd max object namespace len = 64

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1
rgw data = {root}/rgw
ms mon client mode = crc secure
rgw dns name = 127.0.0.1
"""
        )

    def _spawn(self, name: str, *argv: str) -> ManagedProcess:
        proc = ManagedProcess(
            [*argv, "-c", str(self.conf), "-f"], name=name, log_dir=self.root / "log", env=self._env(), cwd=self.root
        ).start()
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 90.0) -> RadosGateway:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> RadosGateway:
        for sub in ("run", "log", "mon", "osd/ceph-0", "rgw"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        mon_v2, mon_v1, self.port = free_port(), free_port(), free_port()
        fsid = str(uuid.uuid4())
        self._write_conf(mon_v2, mon_v1, fsid)
        monmap = self.root / "monmap"
        self._run(
            self.paths["monmaptool"], "--create", "--fsid", fsid, "--addv", "a",
            f"[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]", str(monmap),
        )
        self._run(self.paths["ceph-mon"], "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", "/dev/null")
        mon = self._spawn("ceph-mon", self.paths["ceph-mon"], "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run(self.paths["ceph"], "osd", "new", osd_uuid, timeout=timeout).strip()
        self._run(self.paths["ceph-osd"], "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        osd = self._spawn("ceph-osd", self.paths["ceph-osd"], "-i", osd_id)
        rgw = self._spawn("radosgw", self.paths["radosgw"], "-n", "client.rgw.a")
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            for proc in (mon, osd, rgw):
                proc.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"radosgw did not open 127.0.0.1:{self.port} within {timeout} s")
            time.sleep(0.1)
        access, secret = uuid.uuid4().hex[:20].upper(), uuid.uuid4().hex
        out = self._run(
            self.paths["radosgw-admin"], "user", "create", "--uid=mirror-test", "--display-name=mirror test",
            f"--access-key={access}", f"--secret-key={secret}",
        )
        json.loads(out)  # the user as JSON: anything else means the command did not do what we think
        self.account = S3Account(f"http://127.0.0.1:{self.port}", access, secret)
        return self

    def stop(self) -> None:
        # The gateway first: it talks to the others until it is gone.
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.root / "mon", ignore_errors=True)
