"""The commit protocol (checkpointing/commit.py) driven step by step on one process with the directory storage:
nothing is visible before the commit, a failed save leaves the older checkpoint intact, retention keeps keep_last
and turns the newest retired checkpoint into the next save's skeleton."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpointing import LevelSpec, committed_steps, verify
from checkpointing import commit
from checkpointing.commit import LevelState
from checkpointing.commit_fs import FileStorage
from checkpointing.manifest import read_manifest
from checkpointing.plan import PlanCache
from checkpointing.reshard import LoadTarget, Scratch, read_range
from support.ckpt_state import make_state
from support.commit_steps import write_steps


def test_commit_protocol_publishes_discards_and_retains_in_order(tmp_path):
    level = LevelSpec("L1", str(tmp_path / "L1"), 1, 1, node_local=True, memory=False)
    state, plans = LevelState(FileStorage(level)), PlanCache()

    ctx, target, records = write_steps(state, 1, plans)
    assert not target.reused and committed_steps(Path(level.root)) == [], "visible before its commit"
    result = commit.commit(state, ctx, target, records, failed=False)
    assert result.error is None and result.final == Path(level.root) / "step-00000001"
    assert verify(result.final) == [] and json.loads((Path(level.root) / "latest").read_text())["step"] == 1

    ctx, target, records = write_steps(state, 2, plans)  # a rank of the group failed: the save is discarded
    assert commit.commit(state, ctx, target, records, failed=True).error is None
    assert not target.location.exists() and [s for s, _ in committed_steps(Path(level.root))] == [1]

    ctx, target, records = write_steps(state, 3, plans)
    assert commit.commit(state, ctx, target, records, failed=False).error is None
    assert [s for s, _ in committed_steps(Path(level.root))] == [3], "keep_last=1 kept an older step"
    assert state.spare is not None and state.spare.name.startswith(".next-") and state.spare_layout == "layout-a"
    assert not any(p.name != "zarr.json" for p in state.spare.rglob("*") if p.is_file()), "chunks left in skeleton"

    # step 7 of the protocol: every rank takes the spare the committer announced; the next save reuses it
    announced = commit.announcement(state)
    follower = LevelState(FileStorage(level))
    commit.adopt(follower, "n0", [{"next": announced, "node": "n0"}])
    assert follower.spare == state.spare
    ctx, target, records = write_steps(state, 4, plans)
    assert target.reused and target.location == follower.spare
    assert commit.commit(state, ctx, target, records, failed=False).error is None
    assert verify(Path(level.root) / "step-00000004") == []
    out = make_state(0, "replica", 0, zero=True)
    manifest = read_manifest(Path(level.root) / "step-00000004")
    for name, tensor in out.items():
        read_range(Path(level.root) / "step-00000004", manifest, LoadTarget.of(name, tensor), Scratch())
    want = make_state(0, "replica", 4)
    assert all(torch.equal(out[k], want[k]) for k in want)
