"""Shared helpers for the checkpointing tests: deterministic tensors, layouts, and real gloo worker processes.

Workers are plain subprocesses (`python tests/ckpt_helpers.py <config.json>`) joined into a gloo group on 127.0.0.1;
each runs a list of ops (save / load / emergency) and writes its results as JSON for the test to assert on.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

SPECS = {   # name -> (shape, dtype): small, with rows that do not divide the chunk size and a 0-d tensor
    "model/model.embed_tokens.weight": ((37, 16), "float32"),
    "model/model.layers.0.mlp.up_proj.weight": ((29, 24), "bfloat16"),
    "optim/model.embed_tokens.weight/exp_avg": ((37, 16), "float32"),
    "optim/step": ((), "float32"),
    "counters": ((11,), "int64"),
}


def full_tensor(name: str, shape: tuple, dtype: str, step: int) -> torch.Tensor:
    """The value tensor `name` has at `step`, identical in every process."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + step)
    if dtype == "int64":
        return torch.randint(-1000, 1000, shape, generator=gen)
    return torch.randn(shape, generator=gen).to(getattr(torch, dtype))


def cut_ranges(numel: int, fractions: list[float]) -> list[tuple[int, int]]:
    cuts = [round(f * numel) for f in fractions]
    return list(zip(cuts[:-1], cuts[1:]))


def make_state(rank: int, layout, step: int, specs: dict = SPECS, zero: bool = False) -> dict:
    """Tensors for one rank: layout "replica" (plain tensors) or a list of fractions cutting every tensor into
    Shards (uneven, crossing rows). zero=True gives zero-filled targets of the same layout for loading."""
    from checkpointing import Shard

    state = {}
    for name, (shape, dtype) in specs.items():
        full = full_tensor(name, shape, dtype, step)
        if zero:
            full = torch.zeros_like(full)
        if layout == "replica":
            state[name] = full
            continue
        start, stop = cut_ranges(math.prod(shape), layout)[rank]
        state[name] = Shard(full.reshape(-1)[start:stop].clone(), tuple(shape), (start, stop))
    return state


def matches(state: dict, step: int, specs: dict = SPECS) -> list[str]:
    """Names whose loaded values differ from the values saved at `step` (bit-exact comparison)."""
    from checkpointing import Shard

    bad = []
    for name, value in state.items():
        shape, dtype = specs[name]
        full = full_tensor(name, shape, dtype, step)
        if isinstance(value, Shard):
            a, b = value.flat_range
            ok = torch.equal(value.local, full.reshape(-1)[a:b])
        else:
            ok = torch.equal(value, full)
        if not ok:
            bad.append(name)
    return bad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(tmp: Path, cfg: dict, env: dict | None = None) -> subprocess.Popen:
    """One single-process worker (world 1) running cfg["ops"]; the caller owns the process."""
    cfg = {"port": 0, "rank": 0, "world": 1, "out": str(tmp / "result-0.json"), **cfg}
    cfg_path = tmp / "config-0.json"
    cfg_path.write_text(json.dumps(cfg))
    return subprocess.Popen([sys.executable, __file__, str(cfg_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until `path` exists (polling with a deadline); fail early with stderr if the process died."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} before {path} appeared:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def run_workers(tmp: Path, world: int, rank_config, timeout: float = 60.0, env: dict | None = None) -> list[dict]:
    """Start `world` worker processes (rank_config(rank) -> dict of that rank's config), wait for all of them
    with a deadline, return each rank's result dict. A worker that fails raises with its stderr."""
    port = free_port()
    procs = []
    for rank in range(world):
        cfg = {"port": port, "rank": rank, "world": world, "out": str(tmp / f"result-{rank}.json"), **rank_config(rank)}
        cfg_path = tmp / f"config-{rank}.json"
        cfg_path.write_text(json.dumps(cfg))
        procs.append(subprocess.Popen([sys.executable, __file__, str(cfg_path)], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}))
    deadline = time.monotonic() + timeout
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append((p.returncode, err))
    for rank, (code, err) in enumerate(outputs):
        if code != 0:
            raise AssertionError(f"worker rank {rank} exited with {code}:\n{err[-4000:]}")
    return [json.loads((tmp / f"result-{rank}.json").read_text()) for rank in range(world)]


def _manager(cfg: dict):
    import torch.distributed as dist

    from checkpointing import CheckpointManager, LevelSpec

    group = None
    if cfg["world"] > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=cfg["rank"],
                                world_size=cfg["world"])
        group = dist.new_group(backend="gloo")
    levels = [LevelSpec(**lv) for lv in cfg["levels"]]
    lws = cfg.get("local_world_size", cfg["world"])
    return CheckpointManager(levels, rank=cfg["rank"], world_size=cfg["world"], group=group,
                             local_rank=cfg.get("local_rank", cfg["rank"]), local_world_size=lws,
                             node_id=cfg.get("node_id", "node-0"), chunk_bytes=cfg.get("chunk_bytes", 256),
                             on_busy=cfg.get("on_busy", "wait"))


def _run_op(mgr, cfg: dict, op: dict) -> dict:
    from checkpointing import CheckpointError

    rank = cfg["rank"]
    if op["op"] == "save":
        for step in op["steps"]:
            mgr.save(step, make_state(rank, op["layout"], step), {"step": step, "rank": rank})
            mgr.wait_staged()
        try:
            return {"committed": mgr.wait_durable(), "error": None}
        except CheckpointError as e:
            return {"committed": None, "error": str(e)}
    if op["op"] == "load":
        state = make_state(rank, op["layout"], 0, zero=True)
        try:
            res = mgr.load(state, step=op.get("step"))
        except CheckpointError as e:
            return {"error": str(e)}
        return {"step": res.step, "level": res.level, "path": res.path, "extra": res.extra,
                "rank_extra": res.rank_extra, "fallbacks": res.fallbacks, "bytes_read": res.bytes_read,
                "mismatched": matches(state, res.step), "error": None}
    if op["op"] == "emergency":
        return {"written": mgr.emergency_save()}
    if op["op"] == "wait_sigterm":       # what a trainer does on preemption: note the signal, then save
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})   # (already blocked in every thread: worker_main)
        Path(op["ready"]).write_text("ready")
        signal.sigwait({signal.SIGTERM})
        return {"written": mgr.emergency_save()}
    raise ValueError(f"unknown op {op['op']!r}")


def worker_main(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    if any(op["op"] == "wait_sigterm" for op in cfg["ops"]):
        import signal
        # Block SIGTERM before the manager starts its threads (they inherit the mask): a SIGTERM arriving before
        # the main thread reaches sigwait stays pending instead of killing the process through another thread.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    mgr = _manager(cfg)
    results = [_run_op(mgr, cfg, op) for op in cfg["ops"]]
    mgr.close()
    if cfg["world"] > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    Path(cfg["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker_main(sys.argv[1])
