"""Periodic checkpoints in a training loop: ecpt against DCP async_save, the lazy peer since torch 2.9.

Run through benchmarks/checkpoint.py (``--only loop`` runs just this part). Every method runs in a fresh process
with the same loop: a compute step of ``--loop-step-s`` seconds (512x512 matmuls until the time is up, so the step
length does not drift with the shared machine's load; what checkpointing takes from compute shows as fewer matmuls),
then the wait a trainer does before its optimizer step (ours: wait_staged(); DCP: ``staging_completion``), then an
in-place update of *every* saved tensor (so a staged copy that is not a consistent snapshot would show), and a
checkpoint after every ``--every`` steps.

The peer for the node-memory level (ecpt_shm) is the same DCP path writing into /dev/shm. The DCP peer is ``dcp.async_save(state, checkpoint_id=..., async_stager=DefaultStager(StagingOptions(False, False,
True, False)))``: async staging in a background thread (pinned/shared memory and non-blocking copies need an
accelerator), one stager reused across saves, FileSystemWriter (fsyncs by default). Like torchtitan, the loop waits
for the previous upload before starting the next async_save (one save in flight); that wait counts as blocked. The
same with ``async_checkpointer_type=PROCESS`` is tried too and reported as failed if it fails.

Both sides warm their staging memory as the loop starts, off the loop's thread: ecpt with
``CheckpointManager.prepare(state)`` (what the trainer does after loading), DCP by staging once through its stager
(DefaultStager reuses the host copies it made), so neither first save has to fault a new copy of the state in. That
work runs during the first steps and counts as compute lost.

Per method: blocked seconds per checkpoint (save call + waits before the next update), seconds to durable, peak RSS
growth over the state (VmHWM reset after the state is built), peak growth of host memory (anonymous RSS + the
machine's tmpfs, see MemoryWatch), peak growth of the machine's page cache (Cached in /proc/meminfo: the whole
machine, so noisy), and loop slowdown per checkpoint: blocked time plus compute lost to
contention (matmuls short of the baseline rate, in step-seconds), per checkpoint. Reference: raw write+fsync of
the same bytes, in the child.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

LOOP_METHODS = [
    "dcp_async_stager",
    "dcp_async_process",
    "ecpt_disk",
    "ecpt_disk_skip",
    "dcp_async_stager_shm",
    "ecpt_shm",
]
"""ecpt_disk_skip: the disk level with ``on_busy="skip"`` (a save due while the previous one still persists is
skipped and counted) instead of the default "wait" (it waits for a free staging buffer, never longer than one
persist). The two are the policies a loop that checkpoints faster than the disk absorbs can choose."""
PEER = "dcp_async_stager"
SHM_PEER = "dcp_async_stager_shm"
"""The peer for the node-memory level: the same DCP path writing into /dev/shm."""


def meminfo_mb(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/meminfo")


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


class MemoryWatch:
    """Peaks over a baseline, sampled every 50 ms: the machine's page cache (Cached, tmpfs included) and host
    memory = this process's anonymous RSS + the machine's tmpfs (Shmem). The second counts a checkpoint in node
    memory once whether it is mapped into the process (ecpt's zero-copy files: in RSS as shared pages) or written
    with write() (DCP's files on /dev/shm: not in RSS)."""

    def __init__(self) -> None:
        self.base_cache = meminfo_mb("Cached")
        self.base_host = status_mb("RssAnon") + meminfo_mb("Shmem")
        self.peak_cache, self.peak_host = self.base_cache, self.base_host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-meminfo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_cache = max(self.peak_cache, meminfo_mb("Cached"))
            self.peak_host = max(self.peak_host, status_mb("RssAnon") + meminfo_mb("Shmem"))

    def stop(self) -> tuple[float, float]:
        """(page cache peak growth, host memory peak growth) in MB."""
        self._stop.set()
        self._thread.join()
        return self.peak_cache - self.base_cache, self.peak_host - self.base_host


class DcpSaver:
    """DCP async_save with a reused DefaultStager; one save in flight (the next save waits for the last upload)."""

    def __init__(self, root: Path, process: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.dcp, self.root = dcp, root
        self.stager = DefaultStager(StagingOptions(False, False, True, False))
        self.kwargs = {}
        if process:
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

            self.kwargs["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
        self.staging: Future | None = None
        self.upload: Future | None = None
        self.newest: Path | None = None

    def save(self, step: int, state: dict, on_durable) -> bool:
        if self.upload is not None:
            self.upload.result()
        previous, self.newest = self.newest, self.root / f"step-{step}"
        resp = self.dcp.async_save(state, checkpoint_id=str(self.newest), async_stager=self.stager, **self.kwargs)
        self.staging, self.upload = resp.staging_completion, resp.upload_completion

        def durable(f: Future) -> None:
            # keep the newest durable checkpoint only, like ecpt's level (keep_last=1): on /dev/shm every older
            # one would count in host memory
            on_durable(f.exception())  # first: the time to durable does not include the clean-up
            if f.exception() is None and previous is not None:
                shutil.rmtree(previous, ignore_errors=True)

        self.upload.add_done_callback(durable)
        return True

    def start(self, state: dict) -> None:
        """Warm the stager as ecpt's prepare() warms its slot, so the peer is at its strongest: DefaultStager keeps
        the host copy of each storage it staged (StateDictStager's cache) and copies into it in later saves, so
        one staging now, on its own executor thread while the loop runs, spares the first save that allocation."""
        self.stager.stage(state)

    def wait_staged(self) -> None:
        if self.staging is not None:
            self.staging.result()

    def finish(self) -> None:
        if self.upload is not None:
            self.upload.result()

    def close(self) -> None:
        self.stager.close()


class EcptSaver:
    def __init__(self, root: Path, on_busy: str = "wait") -> None:
        from checkpointing import CheckpointManager, LevelSpec

        self.mgr = CheckpointManager([LevelSpec("L", str(root), 1, 1, node_local=True)], on_busy=on_busy)
        self.skipped = 0

    def start(self, state: dict) -> None:
        """What the trainer does after loading: agree on the plan and prepare the first save's staging slot on the
        persist thread (CheckpointManager.prepare), while the loop runs its first steps (that work counts as
        compute lost)."""
        self.mgr.prepare(state)

    def save(self, step: int, state: dict, on_durable) -> bool:
        """False when the manager skipped the save (on_busy="skip" and the previous one still persists)."""
        handle = self.mgr.save(step, state, {"step": step})
        if handle is None:
            self.skipped += 1
            return False
        handle.durable.add_done_callback(lambda f: on_durable(f.exception()))
        return True

    def wait_staged(self) -> None:
        self.mgr.wait_staged()

    def finish(self) -> None:
        self.mgr.wait_durable()

    def close(self) -> None:
        self.mgr.close()


def write_fsync_files(state: dict, root: Path) -> float:
    """Write the state's bytes to ``root/t<i>`` (one file per tensor) and fsync each; returns the seconds taken."""
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, t in enumerate(state.values()):
        with open(root / f"t{i}", "wb", buffering=0) as f:
            f.write(memoryview(t.numpy()).cast("B"))
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def raw_write_fsync(state: dict, root: Path) -> float:
    """Write the same bytes and fsync each, then remove them: what the disk allows right now."""
    seconds = write_fsync_files(state, root)
    shutil.rmtree(root)
    return seconds


class MatmulWork:
    """512x512 matmuls standing in for forward/backward: a fixed count (``matmuls``) or a fixed time (``for_seconds``)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(512, 512, generator=g)
        self.b = torch.randn(512, 512, generator=g)

    def matmuls(self, n: int) -> float:
        """``n`` matmuls; returns the seconds they took."""
        t0 = time.perf_counter()
        x = self.a
        for _ in range(n):
            x = torch.tanh(x @ self.b)
        return time.perf_counter() - t0

    def for_seconds(self, seconds: float) -> int:
        """Matmuls until ``seconds`` passed; returns how many were done (contention shows as fewer)."""
        end = time.perf_counter() + seconds
        x, n = self.a, 0
        while time.perf_counter() < end:
            x = torch.tanh(x @ self.b)
            n += 1
        return n


def loop_child(args, build_state, rss_mb) -> dict:
    """One method in this fresh process: the loop of the module docstring; returns its measurements."""
    torch.manual_seed(0)
    state = build_state(args.size_mb)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = Path(args.dir)
    raw_s = raw_write_fsync(state, work / f"raw-{args.method}")
    compute = MatmulWork()

    def update() -> None:
        for t in state.values():
            t.add_(1e-6)

    base, base_update = [], []

    def baseline_steps(n: int) -> None:
        for _ in range(n):
            base.append(compute.for_seconds(args.loop_step_s))
            t0 = time.perf_counter()
            update()
            base_update.append(time.perf_counter() - t0)

    baseline_steps(max(4, args.every))
    base = base[1:]
    shm = None
    if args.method.startswith("dcp"):
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1)
        root = work / args.method
        if args.method == SHM_PEER:
            shm = Path(tempfile.mkdtemp(prefix="ecpt-bench-loop-", dir="/dev/shm"))
            root = shm
        saver = DcpSaver(root, process=args.method == "dcp_async_process")
    elif args.method == "ecpt_shm":
        shm = Path(tempfile.mkdtemp(prefix="ecpt-bench-loop-", dir="/dev/shm"))
        saver = EcptSaver(shm)
    else:
        saver = EcptSaver(work / args.method, on_busy="skip" if args.method == "ecpt_disk_skip" else "wait")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: peak RSS from here on
    base_rss = rss_mb()
    memory = MemoryWatch()
    saver.start(state)
    saves: list[dict] = []

    def durable_cb(rec: dict):
        def cb(exc) -> None:
            rec["durable_s"] = time.perf_counter() - rec["t0"]
            rec["error"] = None if exc is None else f"{type(exc).__name__}: {exc}"

        return cb

    steps = args.every * args.checkpoints
    error = None
    done_work: list[int] = []  # matmuls done per loop step
    try:
        for i in range(1, steps + 1):
            done_work.append(compute.for_seconds(args.loop_step_s))
            t0 = time.perf_counter()
            saver.wait_staged()  # before the optimizer update mutates the saved tensors
            if saves:
                saves[-1]["blocked_s"] += time.perf_counter() - t0
            update()
            if i % args.every == 0:
                rec = {"step": i, "t0": time.perf_counter(), "blocked_s": 0.0}
                started = saver.save(i, state, durable_cb(rec))
                rec["blocked_s"] = time.perf_counter() - rec["t0"]
                if started:
                    saves.append(rec)
                elif saves:  # a skipped save's (tiny) call time still blocked the loop
                    saves[-1]["blocked_s"] += rec["blocked_s"]
        saver.finish()
    except (RuntimeError, OSError) as e:  # DCP's process checkpointer: "background process is dead"
        error = f"{type(e).__name__}: {e}"
    if error is None:  # the machine is shared: baseline steps after the loop too, the median of both
        baseline_steps(max(4, args.every))
        raw_after_s = raw_write_fsync(state, work / f"raw-{args.method}")
    else:
        raw_after_s = raw_s
    cache_mb, host_mb = memory.stop()
    peak_rss = rss_mb("VmHWM") - base_rss
    saver.close()
    if shm is not None:
        shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(work / args.method, ignore_errors=True)
    steady = saves[1:] or saves  # the first save of each method pays one-off allocations
    failed = [s["error"] for s in saves if s.get("error")]
    blocked_s = sum(s["blocked_s"] for s in saves)
    base_work = statistics.median(base)
    lost_s = sum(1 - n / base_work for n in done_work) * args.loop_step_s
    return {
        "method": args.method,
        "bytes": nbytes,
        "step_s": args.loop_step_s,
        "base_matmuls": base_work,
        "update_s": statistics.median(base_update),
        "raw_write_fsync_s": [raw_s, raw_after_s],
        "every": args.every,
        "checkpoints": len(saves),
        "skipped": getattr(saver, "skipped", 0),
        "error": error or (failed[0] if failed else None),
        "blocked_s": statistics.median(s["blocked_s"] for s in steady) if steady else None,
        "durable_s": statistics.median(s.get("durable_s", float("nan")) for s in steady) if steady else None,
        "first": saves[0] if saves else None,
        "saves": [{k: s.get(k) for k in ("step", "blocked_s", "durable_s")} for s in saves],
        # compute lost to contention in each interval that starts with a save (the first one pays the one-off
        # allocations): where the slowdown comes from
        "lost_s_per_interval": [
            round(sum(1 - n / base_work for n in done_work[i : i + args.every]) * args.loop_step_s, 2)
            for i in range(args.every, len(done_work), args.every)
        ],
        "slowdown_per_ckpt_s": (lost_s + blocked_s) / max(1, len(saves)),
        "slowdown_per_due_s": (lost_s + blocked_s) / max(1, steps // args.every),
        "peak_rss_over_state_mb": peak_rss,
        "page_cache_peak_mb": cache_mb,
        "host_memory_peak_mb": host_mb,
    }


def report_loop(results: dict) -> dict:
    """Print the table, the ratios against the DCP peer and the targets; return the targets as data."""
    any_ok = next((r for r in results.values() if not r.get("error")), None)
    if any_ok is None:
        print("\nperiodic-checkpoint loop: every method failed")
        return {}
    state_mb = any_ok["bytes"] / (1 << 20)
    raw = statistics.median(x for r in results.values() if r.get("raw_write_fsync_s") for x in r["raw_write_fsync_s"])
    print(
        f"\nperiodic loop: state {state_mb:.0f} MiB, compute step {any_ok['step_s']:.2f} s, then every tensor "
        f"updated in place ({any_ok['update_s']:.2f} s), a checkpoint every {any_ok['every']} steps; medians over "
        f"checkpoints 2..n; slowdown = blocked + compute lost to contention, per due checkpoint (saved or skipped); raw wr+fsync: the "
        f"slower of the child's two (before/after its loop), {raw:.2f} s median over all children"
    )
    print(
        f"{'method':<21}{'blocked s':>10}{'durable s':>10}{'RSS +MB':>9}{'host +MB':>9}{'cache +MB':>10}{'slowdown s':>11}"
        f"{'saved/skip':>11}{'raw wr+fsync':>13}{'  vs peer: blocked / durable / host'}"
    )

    def usable(m: str) -> dict | None:
        r = results.get(m)
        return r if r is not None and not r.get("error") else None

    for m, r in results.items():
        if r.get("error") and r.get("blocked_s") is None:
            print(f"{m:<21}FAILED: {r['error'][:200]}")
            continue
        peer = usable(SHM_PEER if "shm" in m else PEER)
        ratio = ""
        if peer is not None:
            ratio = (
                f"  {r['blocked_s'] / max(peer['blocked_s'], 1e-9):.1f}x / {r['durable_s'] / peer['durable_s']:.2f}x"
                f" / {r['host_memory_peak_mb'] / max(peer['host_memory_peak_mb'], 1):.2f}x"
            )
        print(
            f"{m:<21}{r['blocked_s']:>10.3f}{r['durable_s']:>10.2f}{r['peak_rss_over_state_mb']:>9.0f}"
            f"{r['host_memory_peak_mb']:>9.0f}"
            f"{r['page_cache_peak_mb']:>10.0f}{r['slowdown_per_due_s']:>11.2f}"
            f"{str(r['checkpoints']) + '/' + str(r.get('skipped', 0)):>11}{max(r['raw_write_fsync_s']):>13.2f}{ratio}"
            + (f"   (then failed: {r['error'][:120]})" if r.get("error") else "")
        )
    targets = {}
    interval_s = any_ok["every"] * any_ok["step_s"]
    for m in ("ecpt_disk", "ecpt_disk_skip", "ecpt_shm"):
        r = results.get(m)
        if r is None or r.get("blocked_s") is None:
            continue
        peer = usable(SHM_PEER if m == "ecpt_shm" else PEER)
        # With the default policy ("wait") a save due while the previous one persists waits for a staging buffer:
        # two saves are then in flight (two copies of the state), and the block may last up to one persist.
        two_in_flight = m != "ecpt_disk_skip" and r["durable_s"] > interval_s
        checks = [("blocked <= 0.05 s", r["blocked_s"], 0.05)]
        if two_in_flight:
            longest = max(s["blocked_s"] for s in r["saves"])
            checks.append(("longest block <= one persist (median durable)", longest / r["durable_s"], 1.0))
            print(
                f"INFO {m:<14} persist ({r['durable_s']:.2f} s) outlasts the interval ({interval_s:.2f} s): two saves"
                f" in flight cost {r['host_memory_peak_mb'] / state_mb:.2f} x the state in host memory"
            )
        elif m == "ecpt_shm":
            # the checkpoint itself lives in node memory: compare with DCP writing the same level
            if peer is not None:
                checks.append(
                    (
                        "host memory <= DCP peer's on /dev/shm",
                        r["host_memory_peak_mb"] / peer["host_memory_peak_mb"],
                        1.0,
                    )
                )
        else:
            checks.append(("host memory growth <= 1.1 x state", r["host_memory_peak_mb"] / state_mb, 1.1))
        if m != "ecpt_shm":
            checks.append(("durable <= 1.3 x raw write+fsync (median)", r["durable_s"] / raw, 1.3))
        if peer is not None:
            checks += [
                ("blocked <= DCP peer's", r["blocked_s"] / max(peer["blocked_s"], 1e-9), 1.0),
                ("durable <= 1.0 x DCP peer's", r["durable_s"] / peer["durable_s"], 1.0),
                # a difference, not a ratio: either slowdown can be ~0 or negative (a step that ran faster than
                # the baseline's median)
                (
                    "slowdown per due ckpt minus DCP peer's (s)",
                    r["slowdown_per_due_s"] - peer["slowdown_per_due_s"],
                    0.0,
                ),
            ]
        for name, value, limit in checks:
            ok = value <= limit
            targets[f"{m}: {name}"] = {"value": value, "met": ok}
            print(f"{'MET ' if ok else 'MISS'} {m:<14} {name:<46} measured {value:.3f}")
    return targets


def run_loop(args, work: Path, run_child, free_port) -> tuple[dict, dict]:
    """Every loop method in its own process; a failing method is reported, not raised."""
    results = {}
    chosen = set(args.loop_methods.split(",")) if args.loop_methods else set(LOOP_METHODS)
    unknown = chosen - set(LOOP_METHODS)
    if unknown:
        raise SystemExit(f"--loop-methods: unknown {sorted(unknown)}; choose from {LOOP_METHODS}")
    for method in [m for m in LOOP_METHODS if m in chosen or m == "dcp_async_stager"]:
        print(f"... loop {method}", file=sys.stderr, flush=True)
        cmd = [
            "--loop-method",
            method,
            "--port",
            str(free_port()),
            "--size-mb",
            str(args.size_mb),
            "--loop-step-s",
            str(args.loop_step_s),
            "--dir",
            str(work),
            "--every",
            str(args.every),
            "--checkpoints",
            str(args.checkpoints),
        ]
        try:
            results[method] = json.loads(run_child(cmd, timeout=1800))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            results[method] = {"method": method, "error": str(e)[-1500:], "blocked_s": None}
    return results, report_loop(results)
