"""Upload throughput of a promotion to an s3:// level against boto3's `upload_file` of the same bytes, same server,
same run (issue 14's target: >= 0.8x).

ecpt: a CheckpointManager with L1 on local disk and L2 on S3 saves a `--size-mb` state; the promotion's time is
the L2 write time the manager records (read the committed L1 copy, verify, upload every chunk, list to verify,
put manifest and latest). boto3: `upload_file` of one file holding the same bytes (its TransferManager: multipart,
10 threads). Rounds alternate, the median of `--repeats` is reported. Without `--endpoint` a SeaweedFS
(`weed mini`) is started on 127.0.0.1; the server shares the machine's cores with the client (noisy numbers).

    python benchmarks/s3_upload.py --size-mb 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

TARGET = 0.8


def ecpt_promotion(args, endpoint: str, work: Path, state: dict, round_: int) -> float:
    from checkpointing import CheckpointManager, LevelSpec

    levels = [
        LevelSpec("L1", str(work / f"l1-{round_}"), 1, 1, False),
        LevelSpec("L2", f"s3://{args.bucket}/bench-{round_}", 1, 1, False, endpoint=endpoint),
    ]
    mgr = CheckpointManager(levels, chunk_bytes=args.chunk_mb << 20)
    try:
        mgr.save(1, state, {"step": 1})
        mgr.wait_staged()
        assert mgr.wait_durable() == ["L1", "L2"]
        return mgr.stats.write_seconds["L2"]
    finally:
        mgr.close()


def boto3_upload(args, endpoint: str, path: Path, round_: int) -> float:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    t0 = time.perf_counter()
    client.upload_file(str(path), args.bucket, f"boto3-{round_}/state.bin")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", help="an S3 endpoint (AWS_* variables give the key); default: start SeaweedFS")
    parser.add_argument("--bucket", default="ckpt")
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--chunk-mb", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    from support.s3 import endpoint_or_local_server

    with endpoint_or_local_server(args.endpoint, args.bucket, "ecpt-s3-upload-") as args.endpoint:
        work = Path(tempfile.mkdtemp(prefix="ecpt-s3-upload-work-"))
        n = args.size_mb * (1 << 20) // 4
        state = {f"w{i}": torch.randn(n // 4) for i in range(4)}
        blob = work / "state.bin"
        with open(blob, "wb") as f:
            for t in state.values():
                f.write(t.numpy().tobytes())
        nbytes = blob.stat().st_size
        ours, theirs = [], []
        for r in range(args.repeats):
            pair = [("ecpt", lambda: ecpt_promotion(args, args.endpoint, work, state, r)), ("boto3", None)]
            pair[1] = ("boto3", lambda: boto3_upload(args, args.endpoint, blob, r))
            for name, run in pair if r % 2 == 0 else reversed(pair):
                (ours if name == "ecpt" else theirs).append(run())
        e, b = statistics.median(ours), statistics.median(theirs)
        ratio = (nbytes / e) / (nbytes / b)
        print(
            f"{nbytes / 1e6:.0f} MB, chunks {args.chunk_mb} MiB, median of {args.repeats}, {args.endpoint} "
            f"(noisy: server on the same 2 cores)"
        )
        print(f"  ecpt promotion L1 -> s3://   {nbytes / e / 1e6:7.1f} MB/s   ({e:.2f} s; runs {_fmt(ours)})")
        print(f"  boto3 upload_file            {nbytes / b / 1e6:7.1f} MB/s   ({b:.2f} s; runs {_fmt(theirs)})")
        print(f"  ratio ecpt/boto3 {ratio:.2f}x (target >= {TARGET}x){'' if ratio >= TARGET else '  MISS'}")


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
    main()
