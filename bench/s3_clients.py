"""obstore vs aiobotocore against a real S3 server (Ceph RGW on loopback): the choice behind mirror/storage/s3.py.

    python -m bench.s3_clients [--write-mib 32] [--part-mib 8] [--rounds 3]

Both clients, same RGW, same run, alternating rounds:
- multipart write: `--write-mib` MiB streamed in `--part-mib` MiB parts (obstore: `open_writer_async`;
  aiobotocore: create / upload_part / complete), MB/s;
- ranged read: the object read back as `--part-mib` MiB ranged GETs, one after another, MB/s;
- small ranged reads: 200 GETs of 64 KiB at random offsets, one after another (per-request overhead), ms each.
RGW's memstore OSD writes at ~16 MB/s here, so the write numbers mostly measure the server; the read numbers
measure the client. Needs `pip install obstore aiobotocore` and Debian's ceph-mon, ceph-osd, radosgw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.support.rgw import RadosGateway, S3Account

MiB = 1 << 20
SMALL_READS = 200
SMALL_READ_BYTES = 64 << 10


class Boto:
    name = "aiobotocore"

    def __init__(self, account: S3Account, bucket: str) -> None:
        self.account, self.bucket = account, bucket
        self._stack: Any = None
        self.client: Any = None

    async def __aenter__(self) -> Boto:
        from contextlib import AsyncExitStack

        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        self._stack = AsyncExitStack()
        self.client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3", endpoint_url=self.account.endpoint, region_name=self.account.region,
                aws_access_key_id=self.account.access_key, aws_secret_access_key=self.account.secret_key,
                config=AioConfig(
                    s3={"addressing_style": "path"}, signature_version="s3v4",
                    request_checksum_calculation="when_required", response_checksum_validation="when_required",
                ),
            )
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def write(self, key: str, parts: list[bytes]) -> None:
        started = await self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
        upload_id = started["UploadId"]
        done = []
        for number, part in enumerate(parts, 1):
            answer = await self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=part
            )
            done.append({"PartNumber": number, "ETag": answer["ETag"]})
        await self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
        )

    async def read_range(self, key: str, start: int, end: int) -> int:
        answer = await self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        got = 0
        async with answer["Body"] as body:
            async for piece in body.iter_chunks(MiB):
                got += len(piece)
        return got


class Obstore:
    name = "obstore"

    def __init__(self, account: S3Account, bucket: str) -> None:
        from obstore.store import S3Store

        self.store = S3Store(
            bucket, endpoint=account.endpoint, region=account.region, access_key_id=account.access_key,
            secret_access_key=account.secret_key, virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )

    async def __aenter__(self) -> Obstore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def write(self, key: str, parts: list[bytes]) -> None:
        import obstore

        writer = obstore.open_writer_async(self.store, key, buffer_size=len(parts[0]), max_concurrency=1)
        for part in parts:
            await writer.write(part)
        await writer.close()

    async def read_range(self, key: str, start: int, end: int) -> int:
        import obstore

        answer = await obstore.get_async(self.store, key, options={"range": (start, end)})
        got = 0
        async for piece in answer.stream(min_chunk_size=MiB):
            got += len(piece)
        return got


async def _timed(work: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await work()
    return time.perf_counter() - started


async def run(account: S3Account, write_mib: int, part_mib: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    bucket = "bench-s3-clients"
    async with Boto(account, bucket) as setup:
        await setup.client.create_bucket(Bucket=bucket)
    part = part_mib * MiB
    parts = [os.urandom(part) for _ in range(max(1, write_mib // part_mib))]
    total = sum(len(p) for p in parts)
    results: dict[str, dict[str, list[float]]] = {}
    rng = random.Random(7)
    for round_number in range(rounds):
        for make in (Boto, Obstore):
            async with make(account, bucket) as client:
                numbers = results.setdefault(client.name, {"write_mbps": [], "read_mbps": [], "small_ms": []})
                key = f"{client.name}-{round_number}"
                seconds = await _timed(lambda c=client, k=key: c.write(k, parts))
                numbers["write_mbps"].append(total / seconds / 1e6)

                async def read_all(c: Any = client, k: str = key) -> None:
                    for start in range(0, total, part):
                        assert await c.read_range(k, start, min(start + part, total)) == min(part, total - start)

                numbers["read_mbps"].append(total / await _timed(read_all) / 1e6)
                offsets = [rng.randrange(0, total - SMALL_READ_BYTES) for _ in range(SMALL_READS)]

                async def small(c: Any = client, k: str = key, o: list[int] = offsets) -> None:
                    for start in o:
                        await c.read_range(k, start, start + SMALL_READ_BYTES)

                numbers["small_ms"].append(await _timed(small) / SMALL_READS * 1000)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-mib", type=int, default=32)
    parser.add_argument("--part-mib", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gateway = RadosGateway().start()
    try:
        assert gateway.account is not None
        results = asyncio.run(run(gateway.account, args.write_mib, args.part_mib, args.rounds))
    finally:
        gateway.stop()
    print(f"{args.write_mib} MiB in {args.part_mib} MiB parts, {args.rounds} rounds (median [min-max])")
    print(f"{'client':<12} {'multipart write MB/s':>24} {'ranged read MB/s':>24} {'64 KiB GET ms':>20}")
    for name, numbers in results.items():
        cells = [
            f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]"
            for v in (numbers["write_mbps"], numbers["read_mbps"], numbers["small_ms"])
        ]
        print(f"{name:<12} {cells[0]:>24} {cells[1]:>24} {cells[2]:>20}")


if __name__ == "__main__":
    main()
