"""Entry point of every rank: ``python -m elastic.worker --config-json RUN_DIR/config.json``.

Started by torchrun's elastic agent, srun or mpiexec; finds its rank in the environment (``elastic.world``), joins
the process group, serves metrics and runs the trainer. It never imports ``launch/``.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from elastic.bootstrap import join_job
from elastic.checkpoints import release_memory_level
from elastic.config import config_from_json
from elastic.metrics import WorkerMetrics
from elastic.trainer import Trainer
from elastic.process_env import PROCESS_STARTED_ENV, REPLICA_SLOT_ENV
from elastic.world import detect_world, shutdown_distributed

PR_SET_PDEATHSIG = 1
NOTHING_RESTARTS = ("openmpi", "mpich", "slurm", "single")
"""Launchers whose workers no elastic agent restarts: a worker that returns is the run ending on this node, so
it frees the node's memory checkpoints itself. Under an agent (torchrun, ``launch.agent``) a returning worker
may be a resize, which must find its memory: the agent frees it once the whole run has ended."""


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent (the torchrun agent) dies, even by SIGKILL.

    torchrun starts workers in their own sessions and kills them itself on a clean shutdown; without this, a
    killed agent leaves orphans that keep training and hold ports.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    parent = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def write_rank_file(run_dir: Path, world, metrics_port: int | None, rank: int | None = None) -> Path:
    """``<run_dir>/ranks/rank-<r>.json``: pid, host and metrics port of this rank (in replicas mode, of replica
    r), for tools and fault injection."""
    rank = world.rank if rank is None else rank
    path = run_dir / "ranks" / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(
        json.dumps(
            {
                "rank": rank,
                "pid": os.getpid(),
                "host": os.uname().nodename,
                "local_rank": world.local_rank,
                "world_size": world.world_size,
                "restart_count": world.restart_count,
                "metrics_port": metrics_port,
            }
        )
    )
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    os.environ.setdefault(PROCESS_STARTED_ENV, str(time.time()))
    parser = argparse.ArgumentParser(description="ecpt worker (one per rank)")
    parser.add_argument("--config-json", required=True, help="resolved config written by the launcher")
    args = parser.parse_args(argv)
    die_with_parent()
    # `kill -USR2 <pid>` prints every thread's Python stack to stderr: the first thing to look at in a hung job.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    cfg = config_from_json(args.config_json)
    setup = time.perf_counter() - started
    ctx = join_job(cfg, detect_world())
    world, log = ctx.world, ctx.log
    phases = {"setup": setup, **ctx.phases}  # start-up cost per phase: what a restart costs before training resumes
    run_dir = Path(cfg.train.run_dir)
    identity, port_offset = world.rank, world.local_rank
    if cfg.launch.fault_tolerance == "replicas":  # every replica is rank 0 of its own job: name it by its index
        from elastic.ft.peers import replica_index

        identity = log.rank = replica_index()
        port_offset = int(os.environ.get(REPLICA_SLOT_ENV) or 0)
    metrics = None
    if cfg.metrics.enabled:
        metrics = WorkerMetrics(identity)
        port = metrics.serve(cfg.metrics.host, cfg.metrics.port + port_offset if cfg.metrics.port else 0)
        metrics.write_target_file(run_dir, cfg.metrics.host, os.uname().nodename)
        metrics.on_start(world.world_size)
        log.info(f"metrics on http://{cfg.metrics.host}:{port}/metrics")
    write_rank_file(run_dir, world, metrics.port if metrics else None, identity)
    t = time.perf_counter()
    trainer = Trainer(cfg, world, ctx.groups, ctx.device, metrics=metrics, log=log)
    phases["init"] = time.perf_counter() - t
    trainer.install_signal_handlers()
    try:
        t = time.perf_counter()
        trainer.resume(started)
        phases["restore"] = time.perf_counter() - t
        log.step = trainer.state.step  # the step training starts at (0, or the restored one)
        log.info(
            "ready "
            + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
            + f" (process started {time.time() - float(os.environ[PROCESS_STARTED_ENV]):.2f} s ago)"
        )
        trainer.run()
    except BaseException:
        # Peers may be blocked in a collective with us: a collective clean-up here would hang them and us. Exit
        # at once instead; the agent sees the failure and restarts the worker group from the newest checkpoint.
        log.step = trainer.state.step  # completed steps, as every end-of-run line reports them
        log.exception("training failed; exiting so the agent restarts the worker group")
        logging.shutdown()
        os._exit(1)
    trainer.close()
    log.step = trainer.state.step
    if trainer.stop_signal is not None:
        log.info(f"stopped by signal {trainer.stop_signal}")
    shutdown_distributed()  # a barrier: after it, no rank of this run writes checkpoints any more
    if world.launcher in NOTHING_RESTARTS and world.local_rank == 0 and trainer.checkpoints:
        release_memory_level(cfg, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
