"""Which of zarr's object-store layers the S3 checkpoint level goes through: zarr.storage.ObjectStore (obstore)
or zarr.storage.FsspecStore (s3fs), measured against the same S3 server in one run.

Both are driven the way the level drives its store: Store.set / Store.get of whole chunks, `--concurrency` at a
time, on zarr's own event loop. Prints put and get throughput of each (MB/s, median of `--repeats`). Without
`--endpoint` it starts a SeaweedFS (`weed mini`, tests/support/s3.py) on 127.0.0.1 in a temporary directory.

    python benchmarks/s3_stores.py --chunk-mb 16 --chunks 16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def obstore_store(endpoint: str, bucket: str):
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    return ObjectStore(S3Store(bucket, endpoint=endpoint, region="us-east-1", client_options={"allow_http": True}))


def fsspec_store(endpoint: str, bucket: str):
    import s3fs
    from zarr.storage import FsspecStore

    fs = s3fs.S3FileSystem(asynchronous=True, endpoint_url=endpoint, client_kwargs={"region_name": "us-east-1"})
    return FsspecStore(fs, path=bucket)


async def _round(store, keys: list[str], data, concurrency: int, put: bool) -> float:
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    buf = proto.buffer.from_bytes(data)
    sem = asyncio.Semaphore(concurrency)

    async def one(key: str) -> None:
        async with sem:
            if put:
                await store.set(key, buf)
            else:
                got = await store.get(key, proto)
                assert got is not None and len(got) == len(data), key

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in keys))
    return time.perf_counter() - t0


def measure(name: str, store, args, data) -> dict:
    from zarr.core.sync import sync

    keys = [f"bench-{name}/chunk-{i}" for i in range(args.chunks)]
    total = len(data) * args.chunks
    puts, gets = [], []
    for _ in range(args.repeats):
        puts.append(total / sync(_round(store, keys, data, args.concurrency, True)) / 1e6)
        gets.append(total / sync(_round(store, keys, data, args.concurrency, False)) / 1e6)
    return {"put": statistics.median(puts), "get": statistics.median(gets)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", help="an S3 endpoint (AWS_* variables give the key); default: start SeaweedFS")
    parser.add_argument("--bucket", default="ckpt")
    parser.add_argument("--chunk-mb", type=float, default=16)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from support.s3 import endpoint_or_local_server

    with endpoint_or_local_server(args.endpoint, args.bucket, "ecpt-s3-bench-") as args.endpoint:
        data = np.random.default_rng(0).integers(0, 255, int(args.chunk_mb * (1 << 20)), dtype=np.uint8).tobytes()
        print(
            f"{args.chunks} x {args.chunk_mb:g} MiB, {args.concurrency} at a time, median of {args.repeats}, "
            f"{args.endpoint} (noisy: shared 2-core machine, server on the same cores)"
        )
        results = {}
        for name, make in (("obstore", obstore_store), ("fsspec", fsspec_store)):
            results[name] = measure(name, make(args.endpoint, args.bucket), args, data)
            print(f"  {name:8s} put {results[name]['put']:7.0f} MB/s   get {results[name]['get']:7.0f} MB/s")
        o, f = results["obstore"], results["fsspec"]
        print(f"  obstore / fsspec: put {o['put'] / f['put']:.2f}x, get {o['get'] / f['get']:.2f}x")


if __name__ == "__main__":
    main()
