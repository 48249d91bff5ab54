"""Checkpoint manager workers as real processes for the checkpointing tests.

A worker (`python -m support.ckpt_workers <config.json>`, with subprocess_env's PYTHONPATH) joins a gloo group on
127.0.0.1 when its world is larger than one, runs a list of ops (save / load / emergency / wait_sigterm) and writes
its results as JSON for the test to assert on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from elastic.world import free_port
from support.ckpt_state import make_state, matches
from support.processes import REPO, communicate_all, subprocess_env

WORKER_COMMAND = [sys.executable, "-m", "support.ckpt_workers"]
WORKER_TIMEOUT = 60
"""run_workers' default: seconds one group of workers may take."""


def start_worker(tmp: Path, cfg: dict, env: dict | None = None) -> subprocess.Popen:
    """One single-process worker (world 1) running cfg["ops"]; the caller owns the process."""
    return _spawn_worker(tmp, {"port": 0, "rank": 0, "world": 1, **cfg}, env)


def _spawn_worker(tmp: Path, cfg: dict, env: dict | None) -> subprocess.Popen:
    """Write rank ``cfg["rank"]``'s config (its result goes to ``tmp/result-<rank>.json``) and start its worker."""
    cfg = {"out": str(tmp / f"result-{cfg['rank']}.json"), **cfg}
    cfg_path = tmp / f"config-{cfg['rank']}.json"
    cfg_path.write_text(json.dumps(cfg))
    return subprocess.Popen(
        WORKER_COMMAND + [str(cfg_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(env),
    )


def run_workers(
    tmp: Path, world: int, rank_config, timeout: float = WORKER_TIMEOUT, env: dict | None = None
) -> list[dict]:
    """Start `world` worker processes (rank_config(rank) -> dict of that rank's config), wait for all of them
    with a deadline, return each rank's result dict. A worker that fails raises with its stderr."""
    port = free_port()
    procs = [
        _spawn_worker(tmp, {"port": port, "rank": rank, "world": world, **rank_config(rank)}, env)
        for rank in range(world)
    ]
    for rank, (code, _, err) in enumerate(communicate_all(procs, timeout, f"{world} checkpoint workers")):
        if code != 0:
            raise AssertionError(f"worker rank {rank} exited with {code}:\n{err[-4000:]}")
    return [json.loads((tmp / f"result-{rank}.json").read_text()) for rank in range(world)]


def _manager(cfg: dict):
    import torch.distributed as dist

    from checkpointing import CheckpointManager, LevelSpec

    group = None
    if cfg["world"] > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=cfg["rank"], world_size=cfg["world"]
        )
        group = dist.new_group(backend="gloo")
    levels = [LevelSpec(**lv) for lv in cfg["levels"]]
    lws = cfg.get("local_world_size", cfg["world"])
    return CheckpointManager(
        levels,
        rank=cfg["rank"],
        world_size=cfg["world"],
        group=group,
        local_rank=cfg.get("local_rank", cfg["rank"]),
        local_world_size=lws,
        node_id=cfg.get("node_id", "node-0"),
        chunk_bytes=cfg.get("chunk_bytes", 256),
        on_busy=cfg.get("on_busy", "wait"),
        after_chunk=_pause_hook(cfg.get("pause_after_first_chunk")),
    )


def _pause_hook(spec: dict | None):
    """cfg["pause_after_first_chunk"] = {"step", "marker"}: right after the first chunk of that step is written,
    create the marker file and block the persist thread forever, so the test can SIGKILL the worker mid-write."""
    if spec is None:
        return None

    def pause(step: int, chunks_written: int) -> None:
        if step == spec["step"] and chunks_written == 1:
            Path(spec["marker"]).write_text(str(os.getpid()))
            threading.Event().wait()

    return pause


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
        return {
            "step": res.step,
            "level": res.level,
            "path": res.path,
            "extra": res.extra,
            "rank_extra": res.rank_extra,
            "fallbacks": res.fallbacks,
            "bytes_read": res.bytes_read,
            "mismatched": matches(state, res.step),
            "error": None,
        }
    if op["op"] == "prepare":
        return {"ready": mgr.prepare(make_state(rank, op["layout"], 0), level=op.get("level")).result()}
    if op["op"] == "staging_stats":
        stats = mgr.staging_stats()
        return {
            "host_buffer_allocations": stats.host_buffer_allocations,
            "slots": {name: level.slots for name, level in stats.levels.items()},
        }
    if op["op"] == "emergency":
        return {"written": mgr.emergency_save()}
    if op["op"] == "wait_sigterm":  # what a trainer does on preemption: note the signal, then save
        import signal

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (already blocked in every thread: worker_main)
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
    worker_main(sys.argv[1])
