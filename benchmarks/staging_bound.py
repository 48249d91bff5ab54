"""How short can a checkpoint's stall be on this machine? The staging copy's lower bound, against the step length.

A lazy checkpoint (ecpt's save()/wait_staged(), DCP's async_save with DefaultStager) copies the state while the
next step computes, and the loop blocks only if that copy outlasts the step. So no method can block less than
(time to copy the state while compute runs) - (step length). This measures that copy on its own, into memory that
is already faulted in (the steady state: ecpt's prepared slot, DCP's cached staging storages), 16 MiB at a time as
both stage, in a background thread:

  idle      nothing else runs
  computing the loop's compute (checkpoint_loop.MatmulWork, 512x512 matmuls on torch's threads) runs meanwhile

for a plain torch copy and for numpy's copyto (the faster of the two is the bound), and ecpt's own Slot.stage
into a prepared host slot. Medians of --repeats. Prints the least stall any method can have at --step-s, and MISS
when it exceeds the 0.05 s target.

    .venv/bin/python benchmarks/staging_bound.py --size-mb 4000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, for checkpointing
from checkpoint import build_state  # noqa: E402
from checkpoint_loop import MatmulWork  # noqa: E402

from checkpointing.direct_io import aligned_zeros  # noqa: E402

CHUNK = 16 << 20
STALL_TARGET_S = 0.05


def chunk_pairs(state: dict) -> list[tuple[torch.Tensor, np.ndarray]]:
    """(source bytes, destination) per 16 MiB piece of every tensor; destinations faulted in (zero-filled)."""
    pairs = []
    for t in state.values():
        flat = t.reshape(-1).view(torch.uint8)
        for lo in range(0, flat.numel(), CHUNK):
            src = flat[lo : lo + CHUNK]
            pairs.append((src, aligned_zeros(src.numel())))
    return pairs


def copy_torch(pairs) -> None:
    for src, dst in pairs:
        torch.from_numpy(dst).copy_(src)


def copy_numpy(pairs) -> None:
    for src, dst in pairs:
        np.copyto(dst, src.numpy())


def timed_in_thread(fn, compute: MatmulWork | None) -> tuple[float, int]:
    """Run fn in a background thread (as a stager does); with compute, run matmuls here until it is done.
    Returns (seconds fn took, matmuls done meanwhile)."""
    took: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        fn()
        took.append(time.perf_counter() - t0)

    thread = threading.Thread(target=run)
    thread.start()
    matmuls = 0
    if compute is not None:
        while thread.is_alive():
            matmuls += compute.for_seconds(0.05)
    thread.join()
    return took[0], matmuls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=4000)
    ap.add_argument("--step-s", type=float, default=0.75, help="the loop's compute step (checkpoint_loop: 0.75)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args()
    from checkpointing.plan import PlanCache, global_layouts
    from checkpointing.jobs import Describer
    from checkpointing.slots import Slot

    state = build_state(args.size_mb)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    pairs = chunk_pairs(state)
    described = Describer().describe(state)
    layouts = global_layouts([{"tensors": described.describes}], CHUNK)
    plan = PlanCache().stage_plan("bound", layouts, 0, None)
    slot = Slot(0, None)
    slot.prepare(plan, touch=True)
    methods = {
        "torch copy_": lambda: copy_torch(pairs),
        "numpy copyto": lambda: copy_numpy(pairs),
        "ecpt Slot.stage": lambda: slot.stage(state, plan, 1),
    }
    compute = MatmulWork()
    rows = {}
    for name, fn in methods.items():
        fn()  # warm: caches, first-use costs
        idle = statistics.median(timed_in_thread(fn, None)[0] for _ in range(args.repeats))
        busy = statistics.median(timed_in_thread(fn, compute)[0] for _ in range(args.repeats))
        rows[name] = {"idle_s": idle, "computing_s": busy, "idle_gb_s": nbytes / idle / 1e9}
    fastest_plain = min(r["computing_s"] for n, r in rows.items() if n != "ecpt Slot.stage")
    least_stall = max(0.0, fastest_plain - args.step_s)
    print(
        f"staging copy of {nbytes / 2**20:.0f} MiB in 16 MiB pieces into memory already faulted in, "
        f"medians of {args.repeats} (torch {torch.__version__}, {torch.get_num_threads()} torch threads)"
    )
    print(f"{'copy':18} {'idle s':>8} {'GB/s':>6} {'computing s':>12}")
    for name, r in rows.items():
        print(f"{name:18} {r['idle_s']:8.3f} {r['idle_gb_s']:6.2f} {r['computing_s']:12.3f}")
    verdict = "MISS" if least_stall > STALL_TARGET_S else "ok"
    print(
        f"least stall any lazy checkpoint can have with a {args.step_s} s step: {least_stall:.3f} s "
        f"(the fastest plain copy while computing, minus the step) {verdict} target <= {STALL_TARGET_S} s"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"bytes": nbytes, "step_s": args.step_s, "copies": rows, "least_stall_s": least_stall}, indent=1)
        )


if __name__ == "__main__":
    main()
