"""What the rank scripts (rank_train.py, rank_deepspeed.py) share: joining the job the way every worker does, and
what they report about a run, computed outside the trainer (the global-batch mean loss of one forward/backward, the
loss of every step a run took, a parameter digest)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.distributed as dist

from elastic.bootstrap import WorkerContext, join_job
from elastic.config import Config, config_from_json
from elastic.metrics import read_jsonl


def join_as_rank(config_json: str) -> tuple[Config, WorkerContext]:
    """Join the job through the workers' own bootstrap, with deterministic kernels and one thread per rank whatever
    the config says: the tests compare losses and parameters bit for bit across world sizes."""
    cfg = config_from_json(config_json)
    cfg.train.deterministic = True
    ctx = join_job(cfg)
    torch.set_num_threads(1)
    return cfg, ctx


def global_mean_loss(local_sum: float, global_batch: int, world_size: int) -> float:
    """The global-batch mean loss from this rank's summed per-sequence loss (a collective: every rank calls it).

    Sums in float64 like the trainer's own reduction, so it gives the loss the trainer logs for the step."""
    total = torch.tensor([local_sum], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(total)
    return float(total[0]) / global_batch


def require_every_step_logged(cfg: Config) -> None:
    """run_losses reads the run's metrics log, which has a row per step only with train.log_interval = 1."""
    if cfg.train.log_interval != 1:
        raise SystemExit(
            f"the rank scripts need train.log_interval = 1 to see every step's loss, got {cfg.train.log_interval}"
        )


def run_losses(run_dir: Path) -> list[float]:
    """The loss of every step of the newest trainer run in ``run_dir``, in order: the step rows rank 0 logged to
    metrics.jsonl after that run's start row (earlier runs in the same directory logged before it)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    starts = [i for i, r in enumerate(rows) if r["kind"] == "start"]
    if not starts:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} has no start row: the trainer did not run")
    return [r["loss"] for r in rows[starts[-1] :] if r["kind"] == "step"]


def parameters_digest(model: torch.nn.Module) -> str:
    """A short hash of all parameters, for bit-exactness checks across runs."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
