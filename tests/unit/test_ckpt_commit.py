"""The commit protocol (checkpointing/commit.py) driven step by step on one process with the directory storage:
nothing is visible before the commit, a failed save leaves the older checkpoint intact, retention keeps keep_last
and turns the newest retired checkpoint into the next save's skeleton."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from checkpointing import LevelSpec, committed_steps, verify
from checkpointing import commit
from checkpointing.comm import Comm
from checkpointing.commit import LevelState
from checkpointing.commit_fs import FileStorage
from checkpointing.context import SaveContext
from checkpointing.manifest import read_manifest
from checkpointing.persist import write_chunks
from checkpointing.plan import PlanCache, global_layouts
from checkpointing.reshard import LoadTarget, Scratch, read_range
from checkpointing.sources import Buffers, HostBuffers
from checkpointing.staging import BufferSet, stage_into
from support.ckpt_state import SPECS, make_state


def _save_context(step: int, plans: PlanCache) -> SaveContext:
    describes = {
        name: [list(shape), dtype, "replica", 0, int(np.prod(shape))] for name, (shape, dtype) in SPECS.items()
    }
    layouts = global_layouts([{"tensors": describes}], 256)
    one = Comm(None, 0, 1)
    return SaveContext(step, f"n{step}", layouts, [{"step": step}], ["n0"], one, one, "n0", 256, "layout-a", plans)


def _write(state: LevelState, step: int, plans: PlanCache) -> tuple[SaveContext, commit.Target, list[list]]:
    """Steps 1-4 of one save of make_state(0, "replica", step); returns what the commit needs."""
    ctx = _save_context(step, plans)
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


def test_commit_protocol_publishes_discards_and_retains_in_order(tmp_path):
    level = LevelSpec("L1", str(tmp_path / "L1"), 1, 1, node_local=True, memory=False)
    state, plans = LevelState(FileStorage(level)), PlanCache()

    ctx, target, records = _write(state, 1, plans)
    assert not target.reused and committed_steps(Path(level.root)) == [], "visible before its commit"
    result = commit.commit(state, ctx, target, records, failed=False)
    assert result.error is None and result.final == Path(level.root) / "step-00000001"
    assert verify(result.final) == [] and json.loads((Path(level.root) / "latest").read_text())["step"] == 1

    ctx, target, records = _write(state, 2, plans)  # a rank of the group failed: the save is discarded
    assert commit.commit(state, ctx, target, records, failed=True).error is None
    assert not target.location.exists() and [s for s, _ in committed_steps(Path(level.root))] == [1]

    ctx, target, records = _write(state, 3, plans)
    assert commit.commit(state, ctx, target, records, failed=False).error is None
    assert [s for s, _ in committed_steps(Path(level.root))] == [3], "keep_last=1 kept an older step"
    assert state.spare is not None and state.spare.name.startswith(".next-") and state.spare_layout == "layout-a"
    assert not any(p.name != "zarr.json" for p in state.spare.rglob("*") if p.is_file()), "chunks left in skeleton"

    # step 7 of the protocol: every rank takes the spare the committer announced; the next save reuses it
    announced = commit.announcement(state)
    follower = LevelState(FileStorage(level))
    commit.adopt(follower, "n0", [{"next": announced, "node": "n0"}])
    assert follower.spare == state.spare
    ctx, target, records = _write(state, 4, plans)
    assert target.reused and target.location == follower.spare
    assert commit.commit(state, ctx, target, records, failed=False).error is None
    assert verify(Path(level.root) / "step-00000004") == []
    out = make_state(0, "replica", 0, zero=True)
    manifest = read_manifest(Path(level.root) / "step-00000004")
    for name, tensor in out.items():
        read_range(Path(level.root) / "step-00000004", manifest, LoadTarget.of(name, tensor), Scratch())
    want = make_state(0, "replica", 4)
    assert all(torch.equal(out[k], want[k]) for k in want)
