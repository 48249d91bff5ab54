"""Joining the job: what every training process does before it builds a ``Trainer``.

Used by ``elastic.worker`` (one process per rank, started by torchrun, srun or mpiexec) and by any other process
that trains in-process, such as an arm of the CPT experiment. Call order: ``join_job(cfg)`` -> ``Trainer(cfg,
ctx.world, ctx.groups, ctx.device, log=ctx.log)``. The rank comes from the environment (``elastic.world``); a
process with no launcher variables is a world of one and creates no process group.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from elastic import warnings_once
from elastic.config import Config
from elastic.world import ProcessGroups, RankLogger, WorldInfo, detect_world, device_for, init_distributed


@dataclass
class WorkerContext:
    """Who this process is in the job and what it trains with."""

    world: WorldInfo
    groups: ProcessGroups
    device: torch.device
    log: RankLogger
    """``[rank r step s]``-prefixed logger; pass it to the Trainer, which advances its step."""
    threads: int
    """torch intra-op threads this process uses."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent per start-up phase so far ('rendezvous', ...): what a restart costs before training."""


def configure_threads(requested: int, local_world_size: int) -> int:
    """``requested`` threads, or an even share of this machine's cores among the node's ranks when it is 0."""
    threads = requested or max(1, (os.cpu_count() or 1) // max(local_world_size, 1))
    torch.set_num_threads(threads)
    return threads


def join_job(cfg: Config, world: WorldInfo | None = None, logger: logging.Logger | None = None) -> WorkerContext:
    """Show third-party warnings once per job (``elastic.warnings_once``), set threads and determinism, join the
    process group (a no-op for a world of one) and pick the device."""
    world = world or detect_world()
    warnings_once.install(world.rank)  # before the engine imports DeepSpeed, whose torch calls warn every step
    threads = configure_threads(cfg.train.threads_per_worker, world.local_world_size)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    groups = init_distributed(world)
    phases = {"rendezvous": time.perf_counter() - started}
    return WorkerContext(
        world=world,
        groups=groups,
        device=device_for(world),
        log=RankLogger(logger or logging.getLogger("ecpt"), world.rank),
        threads=threads,
        phases=phases,
    )
