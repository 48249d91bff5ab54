"""Training engines behind one interface: plain DDP (``ddp.py``) and DeepSpeed ZeRO 0-3 (``deepspeed_engine.py``).

The trainer owns the loop, the data, the global-batch split and the learning-rate schedule; an engine owns how
gradients of one rank's share become one optimizer update, and which tensors hold the training state. Both engines
keep the same contract, so the loop, the checkpoint format and the resume logic do not depend on the engine:

* ``forward_backward(batches, global_batch)``: each micro-batch's loss is ``sum(per-sequence losses) /
  global_batch``; after the last one, the gradients every rank sees are the SUM over ranks, i.e. the mean over the
  global batch (the invariant of ``elastic/batch.py``), whatever the per-rank split.
* ``step(lr, before_step)``: clip by global norm, set ``lr``, call ``before_step()`` (the checkpoint's snapshot must
  be copied before parameters change), update.
* ``checkpoint_tensors()``: the same logical names for every engine and stage (``model/<name>``,
  ``optim/<name>/exp_avg``, ``optim/<name>/exp_avg_sq``), fp32, either full replicas or ``checkpointing.Shard``
  slices of this rank's partition, so any saved layout loads into any other.
* ``after_load(step)``: make the engine consistent with tensors just filled in place (step counters, low-precision
  or gathered copies of the fp32 masters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch


class TrainEngine(Protocol):
    name: str
    """"ddp" or "deepspeed"."""
    model: torch.nn.Module
    """The plain module (evaluation, export); under ZeRO-3 its parameters are gathered by hooks on use."""
    optimizer: torch.optim.Optimizer
    """The torch AdamW whose param_groups receive the learning rate every step."""

    def forward_backward(self, batches: Iterable[torch.Tensor], count: int, global_batch: int) -> float: ...

    def step(self, lr: float, before_step: Callable[[], None]) -> None: ...

    def checkpoint_tensors(self) -> dict: ...

    def after_load(self, step: int) -> None: ...

    def zero_grad(self) -> None: ...


def build_engine(
    cfg, world, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> TrainEngine:
    """The engine ``train.engine`` names. DeepSpeed is imported only when used (it takes seconds to import)."""
    if cfg.train.engine == "deepspeed":
        from elastic.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, world, model, optimizer, device)
    from elastic.engines.ddp import DDPEngine

    return DDPEngine(cfg, world, model, optimizer, device)
