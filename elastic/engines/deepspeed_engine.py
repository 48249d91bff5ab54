"""DeepSpeed ZeRO 0-3 behind the engine interface, with state mapped onto ecpt's global, per-parameter checkpoint.

Numerics (the global-batch invariant under DeepSpeed):
* DeepSpeed averages gradients over the data-parallel ranks and divides by gradient_accumulation_steps; ecpt wants
  the SUM of per-rank losses that are already divided by the global batch (ranks may hold unequal shares, e.g. 7
  sequences over 3 ranks = 3 + 2 + 2). So each micro-batch's loss is ``sum(per-sequence losses) / global_batch *
  world_size`` and ``backward(scale_wrt_gas=False)``: the average of W copies of W * x is x summed, exactly for W a
  power of two and within one rounding otherwise.
* ZeRO-2/3 reduce gradients inside every backward, so every rank must run the same number of backwards per step:
  ranks with fewer micro-batches than the largest share repeat one sequence with loss weight 0 (zero gradients,
  the same hooks and collectives; an empty batch cannot go through the model's reshapes).
  gradient_accumulation_steps is that common count; DeepSpeed's train_batch_size is then its own nominal product
  (it only feeds its throughput log); the real batch is train.global_batch.
* The optimizer is ecpt's torch AdamW (decay on matrices only, foreach=False) passed as a client optimizer: no C++
  op build, and the update is element-wise the same as DDP's. The learning rate is written into its param_groups
  before each update; DeepSpeed runs no scheduler. Clipping is DeepSpeed's ``gradient_clipping`` (global norm).
* The shm communication op (a CPU intra-node optimisation that costs a ~40 s C++ build) is skipped.

Checkpoint state (same names as DDP; fp32 masters; never gathered on one rank):
* stage 0: the module's parameters and AdamW's per-parameter moments, full replicas.
* stages 1-2: DeepSpeed flattens each param group into one buffer, cuts it into W equal partitions and keeps an fp32
  master copy of its own partition (``single_partition_of_fp32_groups``), which is also AdamW's parameter (so the
  moments are flat too). Each parameter's intersection with this rank's partition is a ``Shard``.
* stage 3: every parameter is itself cut into W pieces of ``ceil(numel / W)`` (``ds_tensor``); the fp32 master
  sub-group buffers concatenate this rank's pieces. Each piece (without the last rank's padding) is a ``Shard``.
After a load fills those tensors in place, ``after_load`` copies the fp32 masters into the working parameters and
all-gathers them (stages 1-2) or re-points the partitions (stage 3).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from checkpointing import Shard
from elastic.batch import rank_batch
from elastic.config import Config, ConfigError
from elastic.engines.ddp import materialize_adam_state, set_adam_step


def micro_steps(cfg: Config, world_size: int) -> int:
    """Backward passes per optimizer step on every rank: the micro-batch count of the largest share."""
    return len(rank_batch(0, cfg.train.global_batch, cfg.train.micro_batch, 0, world_size).micro_batches)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


DEFAULT_BUCKET = 500_000_000
"""DeepSpeed's default reduce/all-gather bucket (elements), sized for GPUs."""


def deepspeed_config(cfg: Config, world_size: int, parameters: int = DEFAULT_BUCKET) -> dict:
    """The DeepSpeed JSON for this config at ``world_size``: generated fields, then the user's JSON merged in (its
    contradictions were already refused by ``DeepSpeedConfig.validate``).

    Buckets are capped at the model's size: DeepSpeed allocates them with torch.empty on every step, and with
    deterministic algorithms on (ecpt's default) torch fills each new allocation, so a 500 M-element default bucket
    costs ~0.4 s per backward on a CPU for a model of a few thousand parameters."""
    g, gas = cfg.train.global_batch, micro_steps(cfg, world_size)
    bucket = int(min(max(parameters, 1 << 20), DEFAULT_BUCKET))
    even = g % (world_size * gas) == 0
    mbs = g // (world_size * gas) if even else cfg.train.micro_batch
    generated = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": cfg.deepspeed.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
        },
        "zero_allow_untested_optimizer": True,  # ecpt's torch AdamW as the client optimizer
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if even:
        generated["train_batch_size"] = g
    user = cfg.deepspeed.user_json()
    user.pop("train_batch_size", None)  # validated equal to global_batch; not expressible when the split is uneven
    user.pop("train_micro_batch_size_per_gpu", None)
    return _merge(generated, user)


def _skip_shm_build() -> None:
    """DeepSpeed's CPU shm all-reduce op needs a ~40 s C++ build on first use; gloo does the same job here."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _ensure_process_group(world) -> None:
    """DeepSpeed needs torch.distributed even for one rank; ecpt's W=1 runs do not create a group."""
    if dist.is_initialized():
        return
    from elastic.world import free_port, training_backend

    dist.init_process_group(training_backend(), init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def _piece(flat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return flat.narrow(0, start, stop - start)


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(
        self, cfg: Config, world, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ):
        import deepspeed

        if cfg.deepspeed.bf16 and device.type == "cpu":
            raise ConfigError("deepspeed.bf16 = true is for GPUs; this worker runs on CPU: set deepspeed.bf16 = false")
        _skip_shm_build()
        _ensure_process_group(world)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.cfg, self.world, self.device = cfg, world, device
        self.stage = cfg.deepspeed.zero_stage
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.gas = micro_steps(cfg, self.world_size)
        self.ds_config = deepspeed_config(cfg, self.world_size, sum(p.numel() for p in model.parameters()))
        self.names = {p: n for n, p in model.named_parameters()}  # before ZeRO-3 replaces .data
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.model = model
        self.optimizer = optimizer  # the client AdamW; ZeRO points its param groups at the fp32 partitions
        self.zero = self.ds.optimizer if self.stage > 0 else None
        self._tensors: dict | None = None

    # ------------------------------------------------------------------------------------------------ one step

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients inside its optimizer step; nothing is pending at a step boundary."""

    def forward_backward(self, batches: Iterable[torch.Tensor], count: int, global_batch: int) -> float:
        scale = self.world_size / global_batch  # undo DeepSpeed's mean over ranks: see the module docstring
        loss_sum, done, last = 0.0, 0, None
        for batch in batches:
            loss_sum += self._micro_step(batch, scale)
            done, last = done + 1, batch
        for _ in range(done, self.gas):  # this rank's share is smaller: keep the collectives in step with peers
            self._micro_step(last[:1], 0.0)  # one real sequence with weight 0: zero gradients, same hooks
        return loss_sum

    def _micro_step(self, batch: torch.Tensor, scale: float) -> float:
        losses = self.ds(batch[:, :-1], batch[:, 1:])
        self.ds.backward(losses.sum() * scale, scale_wrt_gas=False)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # only advances DeepSpeed's micro-step counter; the update runs in step()
        return float(losses.detach().sum()) if scale else 0.0

    def step(self, lr: float, before_step: Callable[[], None]) -> None:
        assert self.ds.is_gradient_accumulation_boundary(), "forward_backward must run all micro-steps first"
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        before_step()
        self.ds.step()  # reduce (stage 0/1), clip, AdamW, copy fp32 masters into the working params

    # ----------------------------------------------------------------------------------------------- checkpoint

    def checkpoint_tensors(self, rebuild: bool = False) -> dict:
        """Name -> live tensor or Shard of live tensors; built once (references stay valid across steps).
        ``rebuild`` after DeepSpeed's own load_checkpoint, which replaces AdamW's state tensors."""
        if self._tensors is None or rebuild:
            masters = None if self.stage < 3 else list(self.zero.fp32_partitioned_groups_flat)
            materialize_adam_state(self.optimizer, masters)
            if self.stage == 0:
                self._tensors = self._replicas()
            elif self.stage in (1, 2):
                self._tensors = self._zero12_shards()
            else:
                self._tensors = self._zero3_shards()
        return self._tensors

    def _add(
        self, tensors: dict, name: str, master: torch.Tensor, flat_state: dict, a: int, b: int, lo: int, hi: int
    ) -> None:
        """Elements [lo, hi) of parameter ``name`` live at [a, b) of this rank's flat fp32 master partition."""
        shape = self.shapes[name]
        tensors[f"model/{name}"] = Shard(_piece(master, a, b), shape, (lo, hi))
        tensors[f"optim/{name}/exp_avg"] = Shard(_piece(flat_state["exp_avg"], a, b), shape, (lo, hi))
        tensors[f"optim/{name}/exp_avg_sq"] = Shard(_piece(flat_state["exp_avg_sq"], a, b), shape, (lo, hi))

    def _replicas(self) -> dict:
        tensors = {}
        for p, name in self.names.items():
            state = self.optimizer.state[p]
            tensors[f"model/{name}"] = p.data
            tensors[f"optim/{name}/exp_avg"] = state["exp_avg"]
            tensors[f"optim/{name}/exp_avg_sq"] = state["exp_avg_sq"]
        return tensors

    def _zero12_shards(self) -> dict:
        z, tensors = self.zero, {}
        for i, group in enumerate(z.bit16_groups):
            flat = z.bit16_groups_flat[i]
            size = int(z.partition_size[i])
            part_start = dist.get_rank(group=z.real_dp_process_group[i]) * size
            master = z.single_partition_of_fp32_groups[i]
            state = self.optimizer.state[master]
            for p in group:
                offset = (p.data_ptr() - flat.data_ptr()) // flat.element_size()
                lo = min(max(part_start - offset, 0), p.numel())
                hi = max(min(part_start + size - offset, p.numel()), lo)
                a = offset + lo - part_start if hi > lo else 0
                self._add(tensors, self.names[p], master, state, a, a + hi - lo, lo, hi)
        return tensors

    def _zero3_shards(self) -> dict:
        z, tensors = self.zero, {}
        for i, group in enumerate(z.fp16_groups):
            lp_flat = z.fp16_partitioned_groups_flat[i]
            master = z.fp32_partitioned_groups_flat[i]
            state = self.optimizer.state[master]
            for p in group:
                part = p.ds_tensor
                a = (part.data_ptr() - lp_flat.data_ptr()) // lp_flat.element_size()
                lo = min(self.rank * part.ds_numel, p.ds_numel)
                hi = min(lo + part.ds_numel, p.ds_numel)
                self._add(tensors, self.names[p], master, state, a, a + hi - lo, lo, hi)
        return tensors

    def after_load(self, step: int) -> None:
        """The fp32 masters and moments were filled in place: set AdamW's step and refresh the working params."""
        set_adam_step(self.optimizer, step)
        if self.stage in (1, 2):
            self.zero.update_lp_params()  # copy masters into the bit16/fp32 partitions and all-gather them
        elif self.stage == 3:
            for i in range(len(self.zero.fp16_groups)):
                self.zero._reassign_or_swap_out_partitioned_parameters(i)
