"""Plain torch DDP with a SUM all-reduce: the reference engine every other layout must match.

The operations and their order are exactly those the trainer ran before engines existed (no_sync on all but the last
micro-batch, loss / global_batch, SUM hook, clip_grad_norm_ without foreach, AdamW without foreach), so same-world
resume stays bit-exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def sum_allreduce_hook(process_group, bucket):
    """DDP comm hook: SUM gradients instead of DDP's default mean, because each rank already divided its loss by
    the global batch (not by its local share), so the sum is exactly the global-batch mean gradient."""
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def materialize_adam_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> None:
    """Create AdamW's moments and step counter now (zeros, step 0), exactly what its first step would create,
    so the checkpoint has the same tensors before and after the first step and load can fill them in place.
    ``params`` defaults to the optimizer's param groups (ZeRO-3 fills those only while it steps)."""
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def set_adam_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    """AdamW's bias correction counts completed updates: after a restore it must equal the checkpoint's step."""
    for state in optimizer.state.values():
        state["step"].fill_(float(step))


class DDPEngine:
    name = "ddp"

    def __init__(self, cfg, world, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.model, self.optimizer = model, optimizer
        self.grad_clip = cfg.optim.grad_clip
        self.wrapped = model
        if world.world_size > 1:
            ddp = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
            )  # rotary tables are derived, identical
            ddp.register_comm_hook(state=None, hook=sum_allreduce_hook)
            self.wrapped = ddp

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, batches: Iterable[torch.Tensor], count: int, global_batch: int) -> float:
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            last = i == count - 1
            # Only the last micro-batch triggers DDP's gradient all-reduce.
            sync = contextlib.nullcontext() if last or self.wrapped is self.model else self.wrapped.no_sync()
            with sync:
                losses = self.wrapped(batch[:, :-1], batch[:, 1:])  # per-sequence losses, through DDP if wrapped
                loss = losses.sum() / global_batch  # this rank's share of the global-batch mean
                loss.backward()
            loss_sum += float(losses.detach().sum())
        return loss_sum

    def step(self, lr: float, before_step: Callable[[], None]) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=False)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        before_step()  # the previous snapshot must be copied before params change
        self.optimizer.step()

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Name -> live tensor (full replicas). The dict holds references and stays valid: the optimizer and the
        model update these tensors in place."""
        materialize_adam_state(self.optimizer)
        tensors = {}
        opt_state = self.optimizer.state
        for name, p in self.model.named_parameters():
            tensors[f"model/{name}"] = p.data
            tensors[f"optim/{name}/exp_avg"] = opt_state[p]["exp_avg"]
            tensors[f"optim/{name}/exp_avg_sq"] = opt_state[p]["exp_avg_sq"]
        return tensors

    def after_load(self, step: int) -> None:
        set_adam_step(self.optimizer, step)
