"""One rank of a real gloo job used by the distributed tests (run as a script by support.processes.spawn_ranks).

Modes:
  grads  -- one forward/backward of step STEP; rank 0 writes the reduced gradients to OUT (npz, no pickle)
  train  -- resume from the newest checkpoint if any, run to the end (or train.max_steps); rank 0 writes the loss
            sequence of the steps it ran (from the run's metrics log), the first step it ran, and a parameter digest
            to OUT (JSON)
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from elastic.trainer import Trainer
from elastic.world import shutdown_distributed
from rank_results import global_mean_loss, join_as_rank, parameters_digest, require_every_step_logged, run_losses


def main(mode: str, config_json: str, out: str, step: int = 0) -> None:
    cfg, ctx = join_as_rank(config_json)
    world = ctx.world
    trainer = Trainer(cfg, world, ctx.groups, ctx.device, log=ctx.log)
    if mode == "grads":
        trainer.optimizer.zero_grad(set_to_none=True)
        local = trainer._forward_backward(step)
        loss = global_mean_loss(local, cfg.train.global_batch, world.world_size)
        if world.rank == 0:
            grads = {n: p.grad.detach().numpy() for n, p in trainer.model.named_parameters()}
            np.savez(out, __loss__=np.array(loss), **grads)
    else:
        require_every_step_logged(cfg)
        trainer.resume(time.perf_counter())
        first = trainer.state.step
        trainer.run()
    trainer.close()  # also closes the metrics log that run_losses reads
    if mode == "train" and world.rank == 0:
        Path(out).write_text(
            json.dumps(
                {"losses": run_losses(trainer.run_dir), "first_step": first, "digest": parameters_digest(trainer.model)}
            )
        )
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
