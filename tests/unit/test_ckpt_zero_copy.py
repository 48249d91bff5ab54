"""Memory levels (tmpfs): zero-copy staging into the checkpoint's own files, reused skeletons, no fsync.

The staging copy of a save goes straight into files on the level (only the chunks this rank writes), which are then
hard-linked into the checkpoint; the files (and their pages) are reused once the checkpoint holding them is retired.
These tests check that this changes nothing a user can observe (values, laziness, corruption fallback, retention,
levels, emergency saves) and that memory stays flat. Most run on /dev/shm; `memory=True` forces the behaviour on
any filesystem.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from checkpointing import CheckpointError, CheckpointManager, LevelSpec, verify
from checkpointing.zarr_store import is_memory_fs
from support.ckpt_state import SPECS, full_tensor, make_state, matches
from support.waiting import wait_for


@pytest.fixture
def shm():
    """A private directory on /dev/shm (node memory), removed afterwards."""
    if not Path("/dev/shm").is_dir() or not is_memory_fs("/dev/shm"):
        pytest.skip("/dev/shm is not a tmpfs here")
    root = Path("/dev/shm") / f"ecpt-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def save_steps(mgr, steps, layout="replica", specs=SPECS):
    """Save each step; the first one is waited for: zero-copy staging starts once a save agreed on the layout."""
    committed = []
    for i, step in enumerate(steps):
        mgr.save(step, make_state(0, layout, step, specs), {"step": step})
        mgr.wait_staged()
        if i == 0:
            committed += mgr.wait_durable()
    return committed + mgr.wait_durable()


def stager_faults() -> int:
    """Minor page faults of the manager's stager thread so far: the staging copy runs there, so these are the faults
    a save's staging costs. (Process-wide counts also catch the persist thread preparing the next slot, which can
    run before a loaded machine wakes the caller after wait_staged.)"""
    stager = next(t for t in threading.enumerate() if t.name == "ckpt-stager")
    stat = Path(f"/proc/self/task/{stager.native_id}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[7])  # field 10, minflt


def committed(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def chunk_files(ckpt: Path) -> list[Path]:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    return [ckpt / c["file"] for t in manifest["tensors"].values() for c in t["chunks"].values()]


def test_memory_levels_are_detected_and_skip_fsync(shm, tmp_path):
    assert LevelSpec("L0", str(shm / "L0"), 1, 2, True).is_memory  # not created yet: its parent decides
    assert not LevelSpec("L1", str(tmp_path), 1, 2, True).is_memory or is_memory_fs(tmp_path)
    level = LevelSpec("L0", str(tmp_path), 1, 2, True, memory=True)
    assert level.is_memory and not level.sync
    assert LevelSpec("L1", str(shm), 1, 2, True, memory=False).sync


def test_saves_are_staged_into_the_checkpoint_files_and_values_are_exact(shm):
    mgr = CheckpointManager([LevelSpec("L0", str(shm / "L0"), 1, 2, node_local=True)], chunk_bytes=256)
    save_steps(mgr, range(1, 7))
    root = shm / "L0"
    assert committed(root) == ["step-00000005", "step-00000006"]
    files = chunk_files(root / "step-00000006")
    assert files and all(f.stat().st_nlink == 2 for f in files), "chunk files are not the staging files"
    target = make_state(0, "replica", 0, zero=True)
    res = mgr.load(target)
    assert res.step == 6 and matches(target, 6) == []
    assert verify(root / "step-00000005") == [] and verify(root / "step-00000006") == []
    group = zarr.open_group(str(root / "step-00000006"), mode="r")
    for name, (shape, dtype) in SPECS.items():
        got = torch.from_numpy(np.asarray(group[name][...]))
        assert torch.equal(got.view(torch.bfloat16) if dtype == "bfloat16" else got, full_tensor(name, shape, dtype, 6))
    mgr.close()
    assert not list((root / ".staging").iterdir()), "close() left staging files behind"
    assert [p for p in root.iterdir() if p.name.startswith(".next-")] == []
    assert committed(root) == ["step-00000005", "step-00000006"]  # the checkpoints outlive the process
    again = CheckpointManager([LevelSpec("L0", str(root), 1, 2, node_local=True)], chunk_bytes=256)
    target = make_state(0, "replica", 0, zero=True)
    assert again.load(target).step == 6 and matches(target, 6) == []
    again.close()


def test_values_are_those_at_save_time_with_large_mapped_chunks(shm):
    mgr = CheckpointManager([LevelSpec("L0", str(shm / "L0"), 1, 2, node_local=True)], chunk_bytes=1 << 20)
    w = torch.zeros(1024, 700)  # 2.8 MB: three 1 MB chunks, the last one padded
    for step in range(1, 5):
        mgr.save(step, {"w": w}, {"step": step})
        mgr.wait_staged()
        w.add_(1.0)  # the optimizer step right after wait_staged()
        if step == 1:
            mgr.wait_durable()
    mgr.wait_durable()
    staged = mgr.staging_stats().levels
    assert "L0" in staged and staged["L0"].slots and staged["L0"].in_files, (
        f"the saves after the first were not staged zero-copy: {staged}"
    )
    out = torch.full((1024, 700), -1.0)
    assert mgr.load({"w": out}).step == 4 and torch.equal(out, torch.full((1024, 700), 3.0))
    assert mgr.load({"w": out}, step=3).step == 3 and torch.equal(out, torch.full((1024, 700), 2.0))
    mgr.close()


def test_staging_files_are_reused_and_memory_stays_flat(shm):
    mgr = CheckpointManager([LevelSpec("L0", str(shm / "L0"), 1, 2, node_local=True)], chunk_bytes=1 << 20)
    state = {"w": torch.randn(1024, 1024), "b": torch.randn(4096)}  # 4 MB
    inodes, shm_used = [], []
    for step in range(1, 21):
        mgr.save(step, state, {"step": step})
        mgr.wait_staged()
        mgr.wait_durable()
        inodes.append(frozenset(f.stat().st_ino for f in chunk_files(shm / "L0" / f"step-{step:08d}")))
        shm_used.append(_tree_bytes(shm))
    stats = mgr.staging_stats()
    slots = stats.levels["L0"].slots
    assert slots <= 2 + 2 + 1, "more staging slots than keep_last + in flight + 1"
    assert len(set(inodes[5:])) <= slots, "chunk files were not reused across saves"
    assert max(shm_used[5:]) - min(shm_used[5:]) < 1 << 20, f"memory level grew: {shm_used}"
    assert stats.host_buffers == 0, f"host staging buffers kept alongside the slots: {stats}"
    mgr.close()


def _tree_bytes(root: Path) -> int:
    """Bytes held in the tree, counting every inode once (hard links share their data)."""
    seen, total = set(), 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(dirpath, n))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_damaged_newest_copy_falls_back_and_later_saves_are_clean(shm, damage):
    mgr = CheckpointManager([LevelSpec("L0", str(shm / "L0"), 1, 2, node_local=True)], chunk_bytes=256)
    save_steps(mgr, [1, 2])
    chunk = chunk_files(shm / "L0" / "step-00000002")[0]
    if damage == "corrupt":
        data = bytearray(chunk.read_bytes())
        data[3] ^= 0xFF
        chunk.write_bytes(bytes(data))  # writes through the hard link into a staging file
    elif damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:3])
    else:
        chunk.unlink()
    target = make_state(0, "replica", 0, zero=True)
    res = mgr.load(target)
    assert res.step == 1 and matches(target, 1) == [] and str(chunk) in res.fallbacks[0]
    save_steps(mgr, range(3, 9))  # the damaged files' slots are retired and reused
    for step in (7, 8):
        assert verify(shm / "L0" / f"step-{step:08d}") == []
    assert mgr.load(target).step == 8 and matches(target, 8) == []
    mgr.close()


def test_retired_checkpoint_becomes_the_next_skeleton(shm):
    mgr = CheckpointManager([LevelSpec("L0", str(shm / "L0"), 1, 1, node_local=True)], chunk_bytes=256)
    save_steps(mgr, range(1, 5))
    spare = [p for p in (shm / "L0").iterdir() if p.name.startswith(".next-")]
    assert len(spare) == 1 and not (spare[0] / "manifest.json").exists()
    assert not [f for f in spare[0].rglob("*") if f.is_file() and f.name != "zarr.json"], "spare holds chunk files"
    assert committed(shm / "L0") == ["step-00000004"] and verify(shm / "L0" / "step-00000004") == []
    manifest = json.loads((shm / "L0" / "step-00000004" / "manifest.json").read_text())
    root_meta = json.loads((shm / "L0" / "step-00000004" / "zarr.json").read_text())
    assert manifest["step"] == 4 and root_meta["attributes"]["ecpt_step"] == 4
    mgr.close()


def test_layout_change_mid_run_and_other_filesystems(tmp_path):
    """memory=True on a disk directory: same behaviour (the files just live in the page cache)."""
    mgr = CheckpointManager([LevelSpec("L0", str(tmp_path / "L0"), 1, 3, True, memory=True)], chunk_bytes=256)
    save_steps(mgr, [1, 2, 3])
    bigger = {**SPECS, "extra/w": ((9, 5), "float32")}
    save_steps(mgr, [4, 5, 6], specs=bigger)  # a new tensor: plan again, then zero-copy again
    save_steps(mgr, [7, 8], specs=SPECS)
    for step in (6, 7, 8):
        assert verify(tmp_path / "L0" / f"step-{step:08d}") == []
    target = make_state(0, "replica", 0, bigger, zero=True)
    res = mgr.load(target, step=6)
    assert res.step == 6 and matches(target, 6, bigger) == []
    target = make_state(0, "replica", 0, zero=True)
    assert mgr.load(target).step == 8 and matches(target, 8) == []
    mgr.close()


def test_memory_level_promotes_to_disk_and_emergency_save(shm, tmp_path):
    levels = [
        LevelSpec("L0", str(shm / "L0"), 1, 2, node_local=True),
        LevelSpec("L1", str(tmp_path / "L1"), 3, 2, node_local=False),
        LevelSpec("L2", str(tmp_path / "L2"), 100, 1, node_local=False),
    ]
    mgr = CheckpointManager(levels, chunk_bytes=256)
    assert save_steps(mgr, range(1, 8)).count("L1") == 2
    assert [i.step for i in mgr.list() if i.level == "L1"] == [3, 6]
    assert verify(tmp_path / "L1" / "step-00000006") == []
    assert mgr.emergency_save() == ["L2"]
    assert [i.step for i in mgr.list() if i.level == "L2"] == [7]
    shutil.rmtree(shm / "L0")  # node memory lost
    target = make_state(0, "replica", 0, zero=True)
    res = mgr.load(target)
    assert (res.step, res.level) == (7, "L2") and matches(target, 7) == []
    mgr.close()


def test_stale_staging_of_a_dead_process_is_removed(shm):
    stale = shm / "L0" / ".staging" / "node-0-r0-999999-abcdef" / "s0"
    stale.mkdir(parents=True)
    (stale / "0").write_bytes(b"x" * 4096)
    mgr = CheckpointManager([LevelSpec("L0", str(shm / "L0"), 1, 2, node_local=True)], chunk_bytes=256)
    save_steps(mgr, [1, 2])
    assert not stale.parent.exists(), "the staging directory of a gone process was kept"
    assert len(list((shm / "L0" / ".staging").iterdir())) == 1  # this process's own
    mgr.close()


def test_manifest_encoder_matches_the_manifest_object():
    """The commit path encodes manifests from cached per-tensor JSON; it must parse to what Manifest gives."""
    from checkpointing.comm import Comm
    from checkpointing.manifest import ChunkRecord, Manifest
    from checkpointing.commit import MetadataCache
    from checkpointing.context import SaveContext
    from checkpointing.checksums import CRC_BLOCK_BYTES
    from checkpointing.persist import build_manifest
    from checkpointing.plan import global_layouts

    describes = {
        name: [list(shape), dtype, "replica", 0, int(np.prod(shape))] for name, (shape, dtype) in SPECS.items()
    }
    layouts = global_layouts([{"tensors": describes}], 256)
    extras = [{"step": 3, "cfg": {"a": [1, 2]}}, {"step": 3, "rank": 1}]
    ctx = SaveContext(3, "abc", layouts, extras, ["n0", "n0"], Comm(None, 0, 2), Comm(None, 0, 2), "n0", 256, "sig")
    records = [
        [name, c, f"{name}/{t.grid.chunk_key(c)}", t.grid.chunk_nbytes, 1000 + c, f"{c:08x}"]
        for name, t in layouts.items()
        for c in range(t.grid.n_chunks)
        if c != 1
    ]
    level = LevelSpec("L0", "/nonexistent", 1, 2, True)
    files = {"zarr.json": ChunkRecord("zarr.json", 10, 7)}
    data = (
        MetadataCache()
        .encoder("sig", layouts)
        .encode(
            step=3,
            level="L0",
            node_id="n0",
            node_local=True,
            world_size=2,
            chunk_bytes=256,
            crc_block_bytes=CRC_BLOCK_BYTES,
            records=records,
            extra=extras[0],
            rank_extra={1: extras[1]},
            files=files,
        )
    )
    got = Manifest.from_json(json.loads(data), "encoded")
    want = build_manifest(level, ctx, records)
    want.files, want.created_unix = files, got.created_unix
    assert got == want and got.complete is False and json.loads(data)["complete"] is False


def test_disk_levels_stage_checksummed_chunks_in_reused_host_buffers(tmp_path):
    """A disk level cannot hold staging files, but the same plan applies: after the first save the chunks this rank
    writes are copied (and checksummed) into reused host buffers, not whole tensors into a full copy."""
    mgr = CheckpointManager([LevelSpec("L1", str(tmp_path / "L1"), 1, 2, True, memory=False)], chunk_bytes=256)
    committed = save_steps(mgr, range(1, 7))
    assert committed == ["L1"] * 6
    stats = mgr.staging_stats()
    level = stats.levels["L1"]
    assert level.slots and not level.in_files and level.chunk_files == 0 and level.slots <= 3, stats
    assert stats.host_buffers == 0, f"full host copies kept alongside the slots: {stats}"
    for step in (5, 6):
        assert verify(tmp_path / "L1" / f"step-{step:08d}") == []
    target = make_state(0, "replica", 0, zero=True)
    assert mgr.load(target).step == 6 and matches(target, 6) == []
    mgr.close()


@pytest.mark.parametrize("memory", [False, True])
def test_the_next_saves_slot_is_prepared_off_the_training_loop(tmp_path, shm, memory):
    """The first save of a layout stages into host buffers (the chunk plan is agreed in its gather). The persist
    thread then prepares the slot the next save stages into, pages faulted in, and frees the host buffers: the
    second save's staging faults in (almost) no memory on the caller's path, and one copy of the state is held.
    On a memory level the same holds for the slot after that (the first stays linked into its checkpoint)."""
    root = (shm if memory else tmp_path) / "L"
    state = {f"t{i}": torch.randn(1 << 18) for i in range(8)}  # 8 MiB in 1 MiB chunks: arrays too small for THP
    pages = sum(t.numel() * t.element_size() for t in state.values()) // os.sysconf("SC_PAGE_SIZE")
    mgr = CheckpointManager([LevelSpec("L", str(root), 1, 1, True, memory=memory)], chunk_bytes=1 << 20)
    # Hand the heap memory earlier tests freed back to the kernel: the first save's host buffers are malloc'd, and
    # recycled pages that are still mapped would not fault, so the check below that the counter sees them could fail.
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    try:
        faults = []
        for step in (1, 2, 3):
            if step > 1:  # a training step's compute comes between saves: the persist thread prepares the slot then
                # (a save that came before it started would stage into a new slot of its own)
                wait_for(lambda: mgr.staging_stats().levels["L"].ready >= 1, 30, "the next save's slot to be ready")
            before = stager_faults()
            mgr.save(step, state)
            mgr.wait_staged()
            faults.append(stager_faults() - before)
            mgr.wait_durable()
            stats = mgr.staging_stats()
            assert stats.host_buffers == 0, f"host buffers kept beside the slots after step {step}: {stats}"
            assert stats.levels["L"].slots == (min(step, 2) if memory else 1), stats  # memory: two alternate
        assert faults[0] > pages // 10, f"the first save's new host buffers were not counted: {faults} (pages {pages})"
        assert max(faults[1:]) < pages // 10, f"saves 2 and 3 faulted in staging memory: {faults} (pages {pages})"
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        assert mgr.load(target).step == 3 and all(torch.equal(target[k], state[k]) for k in state)
    finally:
        mgr.close()


@pytest.mark.parametrize("memory", [False, True])
def test_prepare_lets_the_first_save_stage_into_a_ready_slot(tmp_path, shm, memory):
    """prepare() agrees on the plan before any save and faults the slot in on the persist thread: the first save
    stages zero-copy like a steady-state one (no host buffers, almost no page faults on the caller's path)."""
    root = (shm if memory else tmp_path) / "L"
    state = {f"t{i}": torch.randn(1 << 18) for i in range(8)}  # 8 MiB in 1 MiB chunks
    pages = sum(t.numel() * t.element_size() for t in state.values()) // os.sysconf("SC_PAGE_SIZE")
    mgr = CheckpointManager([LevelSpec("L", str(root), 1, 1, True, memory=memory)], chunk_bytes=1 << 20)
    try:
        assert mgr.prepare(state).result(timeout=60) is True
        assert mgr.staging_stats().levels["L"].ready == 1
        before = stager_faults()
        mgr.save(1, state, {"step": 1})
        mgr.wait_staged()
        faults = stager_faults() - before
        assert mgr.wait_durable() == ["L"]
        stats = mgr.staging_stats()
        assert stats.host_buffer_allocations == 0, f"the first save staged into host buffers: {stats}"
        assert stats.levels["L"].slots == (2 if memory else 1), stats  # memory: the next save's slot, prepared
        assert faults < pages // 10, f"the first save faulted in staging memory: {faults} (pages {pages})"
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        assert mgr.load(target).step == 1 and all(torch.equal(target[k], state[k]) for k in state)
    finally:
        mgr.close()


def test_prepare_names_a_level_it_does_not_have(tmp_path):
    mgr = CheckpointManager([LevelSpec("L1", str(tmp_path / "L1"), 1, 1, True)])
    try:
        with pytest.raises(CheckpointError, match=r"prepare\(level='L9'\): this manager has levels \['L1'\]"):
            mgr.prepare({"w": torch.zeros(4)}, level="L9")
    finally:
        mgr.close()
    with pytest.raises(CheckpointError, match=r"prepare\(\) after close\(\)"):
        mgr.prepare({"w": torch.zeros(4)})


@pytest.mark.parametrize("memory", [True, False], ids=["memory", "disk"])
def test_staging_follows_tensors_replaced_or_swapped_between_saves(tmp_path, memory):
    """A slot reuses its copy views while the same tensor objects hold the same storage (Slot._copies_for). Every
    way a loop can change what a name points at must still stage the values of the moment: a new tensor object
    under the name, `.data` swapped to new storage, and a non-contiguous tensor (its flat bytes are a copy)."""
    level = LevelSpec("L0", str(tmp_path / "L0"), 1, 1, node_local=True, memory=memory)  # keep 1: slots cycle fast
    mgr = CheckpointManager([level])
    a, b, base_c = torch.zeros(300, 400), torch.zeros(300, 400), torch.zeros(400, 300)
    c = base_c.t()  # non-contiguous, the same object every save, updated in place (through base_c) below
    mgr.prepare({"a": a, "b": b, "c": c}).result()
    for step in range(1, 9):
        if step == 5:
            a = torch.full((300, 400), 100.0)  # a new object under the same name
        if step == 7:
            b.data = torch.full((300, 400), 200.0)  # the same object, new storage
        state = {"a": a, "b": b, "c": c}
        mgr.save(step, state, {"step": step})
        mgr.wait_staged()
        expected = {k: v.clone() for k, v in state.items()}
        for t in (a, b, base_c):
            t.add_(1.0)  # the optimizer step right after wait_staged()
        mgr.wait_durable()
        out = {"a": torch.empty(300, 400), "b": torch.empty(300, 400), "c": torch.empty(300, 400)}
        assert mgr.load(out).step == step
        for name, want in expected.items():
            assert torch.equal(out[name], want), f"step {step}: {name} staged stale bytes"
    stats = mgr.staging_stats()
    assert stats.host_buffers == 0 and stats.levels["L0"].slots <= 3, f"the saves did not reuse slots: {stats}"
    mgr.close()
