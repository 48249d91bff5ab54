"""One rank of a real gloo job for the DeepSpeed tests (run as a script by support.processes.spawn_ranks).

Modes:
  grads  -- one forward/backward of step STEP through the configured engine; every rank takes part in gathering the
            reduced full gradients (DeepSpeed's safe_get_full_grad, a test-only gather), rank 0 writes them to OUT
  dsckpt -- 2 steps, DeepSpeed's own save_checkpoint through EcptCheckpointEngine, 2 more steps, load_checkpoint:
            the fp32 masters/moments must equal the saved ones and step 2 must repeat its loss; rank 0 writes a report
  train  -- resume from the newest checkpoint if any, run to the end (or train.max_steps); rank 0 writes the loss
            sequence of the steps it ran (from the run's metrics log), the next lr, the first step it ran, the restored cursor and the DeepSpeed start-up seconds to OUT
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from checkpointing import Shard
from elastic.trainer import Trainer
from elastic.world import shutdown_distributed
from rank_results import global_mean_loss, join_as_rank, require_every_step_logged, run_losses


def full_grads(trainer: Trainer) -> dict[str, np.ndarray]:
    if trainer.engine.name == "ddp":
        return {n: p.grad.detach().numpy() for n, p in trainer.model.named_parameters()}
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in trainer.model.named_parameters():
        g = safe_get_full_grad(p)  # collective for ZeRO-3: every rank calls it, in the same order
        out[name] = g.detach().clone().numpy()
    return out


def _local(value) -> torch.Tensor:
    return (value.local if isinstance(value, Shard) else value).detach().clone()


def checkpoint_engine_round_trip(trainer: Trainer, world, groups, root: Path) -> dict:
    from elastic.engines.ds_checkpoint_engine import EcptCheckpointEngine

    ds = trainer.engine.ds
    losses = [trainer.train_step(s).loss for s in range(2)]
    ds.checkpoint_engine = EcptCheckpointEngine(root / "ecpt", world.rank, world.world_size, groups.ckpt)
    t0 = time.perf_counter()
    ds.save_checkpoint(str(root / "ds"), tag="global_step2")
    stall = time.perf_counter() - t0
    saved = {k: _local(v) for k, v in trainer.engine.checkpoint_tensors().items()}
    losses += [trainer.train_step(s).loss for s in range(2, 4)]
    moved = sum(not torch.equal(saved[k], _local(v)) for k, v in trainer.engine.checkpoint_tensors().items())
    ds.load_checkpoint(str(root / "ds"))
    now = trainer.engine.checkpoint_tensors(rebuild=True)
    mismatched = [k for k, v in now.items() if not torch.equal(saved[k], _local(v))]
    again = trainer.train_step(2).loss
    stubs = sorted(p.name for p in (root / "ds" / "global_step2").iterdir())
    counts = torch.tensor([len(mismatched), moved], dtype=torch.int64)
    if world.world_size > 1:
        torch.distributed.all_reduce(counts)
    ds.checkpoint_engine.wait()
    return {
        "losses": losses,
        "loss_after_load": again,
        "mismatched": int(counts[0]),
        "moved": int(counts[1]),
        "stall_seconds": stall,
        "files": stubs,
        "largest_file_bytes": max((root / "ds" / "global_step2" / f).stat().st_size for f in stubs),
    }


def main(mode: str, config_json: str, out: str, step: int = 0) -> None:
    cfg, ctx = join_as_rank(config_json)
    world, groups = ctx.world, ctx.groups
    t0 = time.perf_counter()
    trainer = Trainer(cfg, world, groups, ctx.device, log=ctx.log)
    startup = time.perf_counter() - t0
    if mode == "grads":
        local = trainer._forward_backward(step)
        loss = global_mean_loss(local, cfg.train.global_batch, world.world_size)
        grads = full_grads(trainer)
        if world.rank == 0:
            np.savez(out, __loss__=np.array(loss), **grads)
    elif mode == "dsckpt":
        report = checkpoint_engine_round_trip(trainer, world, groups, Path(out).parent)
        if world.rank == 0:  # counts are all-reduced; two ranks writing one file interleaved into invalid JSON
            Path(out).write_text(json.dumps(report))
    else:
        require_every_step_logged(cfg)
        restored = trainer.checkpoints.restore() if trainer.checkpoints else None
        first = trainer.state.step
        state = trainer.run()
    trainer.close()  # also closes the metrics log that run_losses reads
    if mode == "train" and world.rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "losses": run_losses(trainer.run_dir),
                    "first_step": first,
                    "startup_seconds": startup,
                    "restored_step": restored.step if restored else None,
                    "saved_world_size": restored.saved_world_size if restored else None,
                    "lr_next": trainer.lr_for(first),
                    "tokens": state.tokens,
                }
            )
        )
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
