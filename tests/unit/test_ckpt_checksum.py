"""Where the chunk checksums come from, and the snapshot they cover.

Staging only copies (the caller waits for it); the persist thread checksums the staged bytes right before it links
(memory level) or while it writes (disk level) them, so each manifest record covers exactly the bytes that became
the checkpoint. These tests check the two guarantees that move implies: a chunk damaged while the save is being
persisted (after its checksum was taken, before the commit) is caught on load like any later damage, and the
checkpoint is the state at save() time even when the caller mutates every tensor right after wait_staged().

Each chunk record also carries the crc32c of every block of 256 KiB (checksums.py), computed in the same pass: a load
needing only part of a chunk reads and verifies only the covering blocks. The tests below check the bytes such a
load reads, that damage in a block it reads fails it (naming file and block), that damage elsewhere does not (by
design: each rank verifies what it reads), truncation, and that manifests without block crcs still load.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch

from checkpointing import CheckpointError, CheckpointManager, LevelSpec, Shard, verify
from checkpointing.checksums import CRC_BLOCK_BYTES, block_crc, checksum, checksum_buffer
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


# ------------------------------------------------------------------------------------------ block checksums

KIB = 1 << 10
BLOCK = CRC_BLOCK_BYTES  # 256 KiB: 65536 float32 elements
ROWS, COLS = 1024, 1024  # one float32 tensor of 4 MiB, in 4 chunks of 1 MiB (4 blocks each)


@pytest.mark.parametrize("nbytes", [0, 1, 1000, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345])
@pytest.mark.parametrize("piece", [1000, BLOCK, 1 << 20])
def test_block_crcs_and_whole_crc_come_from_one_pass_over_pieces_of_any_size(nbytes, piece):
    data = memoryview(np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    got = checksum([data[pos : pos + piece] for pos in range(0, nbytes, piece)])
    assert got.crc32c == crc32c.crc32c(data), "the whole-chunk crc must stay the one recorded before blocks"
    want = [crc32c.crc32c(data[pos : pos + BLOCK]) for pos in range(0, nbytes, BLOCK)]
    assert [block_crc(got.blocks, i) for i in range(len(want))] == want and len(got.blocks) == 8 * len(want)


@pytest.mark.parametrize("nbytes", [0, 1, 1000, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 777, 3 * BLOCK + 12345])
def test_one_buffer_checksums_like_the_piecewise_pass_first_and_every_later_time(nbytes):
    """checksum_buffer (the persist thread's per-chunk checksum) folds a partial last block with the slow multiply
    the first time a size is seen and with tables after: both must give the piecewise result."""
    data = memoryview(np.random.default_rng(nbytes + 1).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    want = checksum([data[pos : pos + 1000] for pos in range(0, nbytes, 1000)])
    assert want.crc32c == crc32c.crc32c(data)
    assert [checksum_buffer(data) for _ in range(3)] == [want] * 3


@pytest.fixture
def saved(tmp_path):
    """A disk level holding step 1 of one 4 MiB tensor (4 chunks of 1 MiB), and its manager."""
    root = tmp_path / "L1"
    mgr = CheckpointManager([LevelSpec("L1", str(root), 1, 2, node_local=True)], chunk_bytes=1 << 20)
    full = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(1))
    mgr.save(1, {"w": full}, {"step": 1})
    assert mgr.wait_durable() == ["L1"]
    yield mgr, root / "step-00000001", full
    mgr.close()


def load_part(mgr: CheckpointManager, full: torch.Tensor, start: int, stop: int):
    """Load flat elements [start, stop) of "w" as a Shard (what a ZeRO rank asks for)."""
    part = Shard(torch.zeros(stop - start), (ROWS, COLS), (start, stop))
    res = mgr.load({"w": part})
    assert torch.equal(part.local, full.reshape(-1)[start:stop]), "loaded values differ from the saved ones"
    return res


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


E = BLOCK // 4  # float32 elements per block
THIRD = ROWS * COLS // 3


@pytest.mark.parametrize(
    "start,stop,nread",
    [
        (0, ROWS * COLS, 4096 * KIB),  # every chunk whole
        (100, 200, 256 * KIB),  # inside block 0: that block only
        (E - 1, E + 1, 512 * KIB),  # two elements straddling blocks 0 and 1
        (E, 3 * E, 512 * KIB),  # exactly blocks 1 and 2
        (THIRD, 2 * THIRD, 1536 * KIB),  # the middle third (ZeRO at W=3): blocks 5-7 of chunk 1, 8-10 of chunk 2
        (200_000, 800_000, 2560 * KIB),  # block 3 of chunk 0, chunks 1 and 2 whole, block 12 of chunk 3
    ],
)
def test_a_partial_load_reads_only_the_blocks_covering_its_range(saved, start, stop, nread):
    mgr, ckpt, full = saved
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["crc_block_bytes"] == BLOCK
    assert all(len(c["block_crc32c"]) == 8 * 4 for c in manifest["tensors"]["w"]["chunks"].values())
    assert load_part(mgr, full, start, stop).bytes_read == nread


def test_damage_in_a_block_a_rank_reads_fails_its_load_naming_file_and_block(saved):
    mgr, ckpt, full = saved
    chunk1 = ckpt / "w" / "c" / "1" / "0"
    flip_byte(chunk1, BLOCK + 10)  # block 1 of chunk 1 = block 5 of the tensor: the middle third needs it
    with pytest.raises(CheckpointError) as err:
        load_part(mgr, full, THIRD, 2 * THIRD)
    assert str(chunk1) in str(err.value) and f"block 1 (bytes {BLOCK}-{2 * BLOCK})" in str(err.value), err.value
    with pytest.raises(CheckpointError, match=rf"{chunk1}.*block 1 \(bytes"):  # a whole-chunk read names it too
        load_part(mgr, full, 0, ROWS * COLS)


def test_damage_in_a_block_no_part_of_this_range_needs_does_not_fail_this_load(saved):
    """By design each rank verifies the blocks it reads: a rank whose range does not touch the damaged block loads
    correct values; any rank (or layout) that reads that block fails, and `verify` reports it."""
    mgr, ckpt, full = saved
    chunk1 = ckpt / "w" / "c" / "1" / "0"
    flip_byte(chunk1, 10)  # block 0 of chunk 1 (tensor block 4): before the middle third starts (block 5)
    assert load_part(mgr, full, THIRD, 2 * THIRD).bytes_read == 1536 * KIB
    problems = verify(ckpt)
    assert len(problems) == 1 and str(chunk1) in problems[0] and "block [0]" in problems[0], problems
    with pytest.raises(CheckpointError, match=str(chunk1)):
        load_part(mgr, full, 0, THIRD)


def test_a_truncated_chunk_fails_a_partial_load_whichever_blocks_it_needs(saved):
    mgr, ckpt, full = saved
    chunk2 = ckpt / "w" / "c" / "2" / "0"
    chunk2.write_bytes(chunk2.read_bytes()[: 3 * BLOCK])  # the last block of chunk 2 is gone
    with pytest.raises(CheckpointError, match=rf"{chunk2}: {3 * BLOCK} bytes on disk.*\(truncated\)"):
        load_part(mgr, full, 2 * (ROWS * COLS // 4) + 10, 2 * (ROWS * COLS // 4) + 20)  # needs block 0 only


def test_a_manifest_written_before_block_checksums_loads_reading_whole_chunks(saved):
    """Older manifests have no crc_block_bytes and no block_crc32c: a partial load reads (and verifies) every chunk
    it touches whole, as before."""
    mgr, ckpt, full = saved
    doc = json.loads((ckpt / "manifest.json").read_text())
    del doc["crc_block_bytes"]
    for chunk in doc["tensors"]["w"]["chunks"].values():
        del chunk["block_crc32c"]
    (ckpt / "manifest.json").write_text(json.dumps(doc))
    assert load_part(mgr, full, THIRD, 2 * THIRD).bytes_read == 2048 * KIB  # chunks 1 and 2, whole
    assert verify(ckpt) == []
    flip_byte(ckpt / "w" / "c" / "1" / "0", 10)  # a block this range does not need, but the chunk's crc covers it
    with pytest.raises(CheckpointError, match=r"w/c/1/0: crc32c .* \(corrupt bytes\)"):
        load_part(mgr, full, THIRD, 2 * THIRD)


def test_promotion_and_zero_copy_levels_record_the_same_block_crcs(tmp_path, level_root):
    """Every way a chunk reaches a level (staging file linked, host slot written, promotion copied from the faster
    level's committed copy) records block crcs of the bytes on that level."""
    root, memory = level_root
    mgr = CheckpointManager(
        [
            LevelSpec("F", str(root), 1, 2, node_local=True, memory=memory),
            LevelSpec("S", str(tmp_path / "S"), 2, 2, node_local=True, memory=False),
        ],
        chunk_bytes=1 << 20,
    )
    full = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(2))
    for step in (1, 2):  # step 1 stages into host buffers, step 2 zero-copy into slots; step 2 is promoted to S
        mgr.save(step, {"w": full}, {"step": step})
        mgr.wait_staged()
        mgr.wait_durable()
    fast, slow = (json.loads((r / "step-00000002" / "manifest.json").read_text()) for r in (root, tmp_path / "S"))
    assert fast["tensors"]["w"]["chunks"] == slow["tensors"]["w"]["chunks"]
    assert verify(root / "step-00000002") == [] and verify(tmp_path / "S" / "step-00000002") == []
    part = Shard(torch.zeros(10), (ROWS, COLS), (THIRD, THIRD + 10))
    assert mgr.load({"w": part}, step=2).bytes_read == BLOCK
    mgr.close()


@pytest.mark.parametrize("blocks", ["zz" * 16, "0" * 8 * 3, "0" * 8 * 4 + " "])
def test_a_manifest_with_malformed_block_crcs_is_refused_naming_the_chunk(saved, blocks):
    """Not hex, one crc short, trailing junk: the manifest is malformed (never trusted, never copied on)."""
    mgr, ckpt, full = saved
    doc = json.loads((ckpt / "manifest.json").read_text())
    doc["tensors"]["w"]["chunks"]["1"]["block_crc32c"] = blocks
    (ckpt / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"malformed manifest field .*chunk w/c/1/0: block_crc32c"):
        load_part(mgr, full, 0, 10)
