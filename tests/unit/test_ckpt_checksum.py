"""Where the chunk checksums come from, and the snapshot they cover.

Staging only copies (the caller waits for it); the persist thread checksums the staged bytes right before it links
(memory level) or while it writes (disk level) them, so each manifest record covers exactly the bytes that became
the checkpoint. These tests check the two guarantees that move implies: a chunk damaged while the save is being
persisted (after its checksum was taken, before the commit) is caught on load like any later damage, and the
checkpoint is the state at save() time even when the caller mutates every tensor right after wait_staged().
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from checkpointing import CheckpointManager, LevelSpec, verify
from checkpointing.zarr_store import CHUNK_DIR, is_memory_fs


@pytest.fixture(params=["disk", "memory"])
def level_root(request, tmp_path):
    """A disk level (host-memory slots, written) or a /dev/shm level (staging files, hard-linked)."""
    if request.param == "disk":
        yield tmp_path / "L1", False
        return
    if not Path("/dev/shm").is_dir() or not is_memory_fs("/dev/shm"):
        pytest.skip("/dev/shm is not a tmpfs here")
    root = Path("/dev/shm") / f"ecpt-test-{uuid.uuid4().hex[:8]}"
    yield root / "L0", True
    shutil.rmtree(root, ignore_errors=True)


def state_at(step: int) -> dict[str, torch.Tensor]:
    """Several tensors, one chunk-sized and some with padded edge chunks, all holding `step` everywhere."""
    return {
        "w": torch.full((256, 64), float(step)),
        "b": torch.full((1000,), float(step)),
        "optim/m": torch.full((300, 7), float(step), dtype=torch.float64),
    }


def flip_first_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))


def test_snapshot_is_the_state_at_save_time_when_every_tensor_is_mutated_after_wait_staged(level_root):
    root, memory = level_root
    mgr = CheckpointManager([LevelSpec("L", str(root), 1, 4, node_local=True, memory=memory)], chunk_bytes=8192)
    state = state_at(0)
    for step in range(1, 7):
        mgr.save(step, state, {"step": step})
        mgr.wait_staged()
        for t in state.values():  # the optimizer step, on every saved tensor, right away
            t.add_(1.0)
        if step == 1:
            mgr.wait_durable()  # later saves stage into slots planned by this one
    mgr.wait_durable()
    assert mgr.staging_stats().levels["L"].slots, "the saves after the first did not stage into slots"
    for step in range(3, 7):
        assert verify(root / f"step-{step:08d}") == []
        out = {k: torch.full_like(v, -1) for k, v in state.items()}
        assert mgr.load(out, step=step).step == step
        bad = [k for k, v in out.items() if not torch.equal(v, torch.full_like(v, float(step - 1)))]
        assert bad == [], f"step {step}: {bad} hold values from after save()"
    mgr.close()


def test_chunk_damaged_while_the_save_persists_is_caught_on_load(level_root):
    """The first chunk of step 3 is damaged right after the persist thread checksummed and linked (memory) or
    wrote (disk) it, before the save commits: the manifest keeps the checksum of the staged bytes, so load()
    names the chunk and falls back to step 2."""
    root, memory = level_root
    # keep_last=3: nothing is retired, so there is no spare skeleton and every chunk is linked or written one by
    # one after the job's gather, through the hook (a skeleton would have memory levels link all chunks before)
    found: list[list[Path]] = []

    def damage_first_chunk(step: int, chunks_written: int) -> None:
        """Runs in the persist thread (so it records instead of asserting): damage the one chunk of step 3 that is
        in the checkpoint directory being written (a partial directory or a skeleton, not a committed step-N)."""
        if step != 3 or chunks_written != 1:
            return
        in_progress = [
            p.relative_to(root)
            for p in root.rglob("*")
            if p.is_file() and CHUNK_DIR in p.parts and not re.fullmatch(r"step-\d+", p.relative_to(root).parts[0])
        ]
        found.append(in_progress)
        if len(in_progress) == 1:
            flip_first_byte(root / in_progress[0])

    mgr = CheckpointManager(
        [LevelSpec("L", str(root), 1, 3, node_local=True, memory=memory)],
        chunk_bytes=8192,
        after_chunk=damage_first_chunk,
    )
    for step in range(1, 4):
        state = state_at(step)
        mgr.save(step, state, {"step": step})
        mgr.wait_staged()
        for t in state.values():
            t.zero_()
        mgr.wait_durable()
    assert len(found) == 1 and len(found[0]) == 1, f"expected one chunk of step 3 just persisted, found {found}"
    damaged = root / "step-00000003" / Path(*found[0][0].parts[1:])
    assert verify(root / "step-00000003"), "the damaged chunk passed verification"
    out = {k: torch.full_like(v, -1) for k, v in state_at(0).items()}
    res = mgr.load(out)
    assert res.step == 2 and str(damaged) in res.fallbacks[0], res.fallbacks
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in out.values())
    mgr.close()
