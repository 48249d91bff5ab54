"""Deterministic checkpoint tensors for the checkpointing tests: the same values in every process for a given name
and step, cut into replica or (uneven, row-crossing) Shard layouts, and a bit-exact check of loaded values."""

from __future__ import annotations

import math
import zlib

import torch

SPECS = {  # name -> (shape, dtype): small, with rows that do not divide the chunk size and a 0-d tensor
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
