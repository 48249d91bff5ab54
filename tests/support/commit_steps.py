"""commit.py's protocol driven step by step on one process (tests of a LevelStorage: directories or S3)."""

from __future__ import annotations

import numpy as np

from checkpointing import commit
from checkpointing.comm import Comm
from checkpointing.commit import LevelState
from checkpointing.context import SaveContext
from checkpointing.persist import write_chunks
from checkpointing.plan import PlanCache, global_layouts
from checkpointing.sources import Buffers, HostBuffers
from checkpointing.staging import BufferSet, stage_into
from support.ckpt_state import SPECS, make_state


def save_context(step: int, plans: PlanCache) -> SaveContext:
    """One rank's agreed context for saving make_state(0, "replica", step) in 256-byte chunks."""
    describes = {
        name: [list(shape), dtype, "replica", 0, int(np.prod(shape))] for name, (shape, dtype) in SPECS.items()
    }
    layouts = global_layouts([{"tensors": describes}], 256)
    one = Comm(None, 0, 1)
    return SaveContext(step, f"n{step}", layouts, [{"step": step}], ["n0"], one, one, "n0", 256, "layout-a", plans)


def write_steps(state: LevelState, step: int, plans: PlanCache) -> tuple[SaveContext, commit.Target, list[list]]:
    """Steps 1-4 of one save of make_state(0, "replica", step); returns what the commit needs."""
    ctx = save_context(step, plans)
    bufset = BufferSet(0)
    stage_into(bufset, make_state(0, "replica", step), step, pin=False)
    target = commit.begin(state, ctx)
    commit.prepare(state, ctx, target, committer=True)
    source = HostBuffers(bufset, Buffers())
    source.exchange(state.storage.level, ctx)
    outcome = write_chunks(state.storage, target, source.chunks(state.storage.level, ctx), ctx.who(state.storage.level))
    assert outcome.errors == [] and outcome.records
    assert commit.make_durable(state, ctx, target, [r[2] for r in outcome.records]) is None
    return ctx, target, outcome.records
