"""O_DIRECT chunk writes (checkpointing/direct_io.py) on this machine's real file systems: the bytes and checksums
equal a buffered write's whatever the alignment, aligned runs really go through an O_DIRECT descriptor, and the
level setting is honoured (an impossible `direct_io = true` is an error naming the level and root)."""

import errno
import fcntl
import logging
import os

import numpy as np
import pytest

from checkpointing import direct_io
from checkpointing.direct_io import ALIGN, aligned_empty, aligned_zeros, direct_length
from checkpointing.zarr_store import write_file


def _bytes(n: int, seed: int) -> np.ndarray:
    out = aligned_empty(n)
    out[:] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    return out


def test_aligned_buffers_are_aligned_and_sized():
    for n in (0, 1, ALIGN - 1, ALIGN, 3 * ALIGN + 17, 1 << 20):
        a = aligned_empty(n)
        assert a.nbytes == n and (n == 0 or a.ctypes.data % ALIGN == 0)
    assert not aligned_zeros(5 * ALIGN).any()


@pytest.mark.parametrize(
    "view_start, length, offset, expected",
    [
        (0, 3 * ALIGN, 0, 3 * ALIGN),  # all aligned
        (0, 3 * ALIGN + 100, 0, 3 * ALIGN),  # the odd tail goes buffered
        (0, ALIGN - 1, 0, 0),  # shorter than one block
        (8, 3 * ALIGN, 0, 0),  # unaligned address
        (0, 3 * ALIGN, 512, 0),  # unaligned file offset
        (0, 2 * ALIGN, 5 * ALIGN, 2 * ALIGN),
    ],
)
def test_direct_length(view_start, length, offset, expected):
    base = aligned_empty(4 * ALIGN + 64)
    assert direct_length(memoryview(base)[view_start : view_start + length], offset) == expected


@pytest.mark.parametrize(
    "sizes",
    [
        [16 * ALIGN],  # one aligned chunk
        [5 * ALIGN + 123, 700],  # an odd tail, then zero padding
        [3 * ALIGN, 2 * ALIGN, 7],  # pieces that stay aligned, then a short one
        [100, 4 * ALIGN],  # unaligned from the start: all buffered
        [(9 << 20) + 4 * ALIGN],  # longer than one O_DIRECT piece
    ],
)
def test_direct_write_equals_a_buffered_write(tmp_path, sizes):
    parts = [memoryview(_bytes(n, i)) for i, n in enumerate(sizes)]
    direct = write_file(tmp_path / "direct", parts, fsync=True, direct=True)
    buffered = write_file(tmp_path / "buffered", parts, fsync=True, direct=False)
    expected = b"".join(bytes(p) for p in parts)
    assert (tmp_path / "direct").read_bytes() == expected == (tmp_path / "buffered").read_bytes()
    assert (direct.crc32c, direct.blocks) == (buffered.crc32c, buffered.blocks)


def test_aligned_runs_go_through_an_o_direct_descriptor(tmp_path, monkeypatch):
    """What each write call was given: the aligned 5 blocks through O_DIRECT, the 123-byte tail and the padding
    through the ordinary descriptor, at the right offsets."""
    assert direct_io.probe(tmp_path) is None, "this test needs a file system that accepts O_DIRECT (ext4 here)"
    calls = []
    real = direct_io._pwrite_all

    def spy(fd, view, offset):
        calls.append((bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT), offset, len(view)))
        real(fd, view, offset)

    monkeypatch.setattr(direct_io, "_pwrite_all", spy)
    write_file(
        tmp_path / "f", [memoryview(_bytes(5 * ALIGN + 123, 1)), memoryview(aligned_zeros(700))], False, None, True
    )
    assert [c for c in calls if c[2]] == [(True, 0, 5 * ALIGN), (False, 5 * ALIGN, 123), (False, 5 * ALIGN + 123, 700)]


def test_level_setting(tmp_path, monkeypatch):
    assert direct_io.resolve(tmp_path, None, "L1") == (True, "the file system accepts O_DIRECT")
    assert direct_io.resolve(tmp_path, False, "L1") == (False, "direct_io = false")
    # a file system that refuses O_DIRECT (none here accepts to: tmpfs takes it since Linux 6.6)
    monkeypatch.setattr(direct_io, "probe", lambda root: "the file system refuses O_DIRECT (Invalid argument)")
    assert direct_io.resolve(tmp_path, None, "L1") == (False, "the file system refuses O_DIRECT (Invalid argument)")
    with pytest.raises(OSError, match=rf"level L1: direct_io = true but {tmp_path}: the file system refuses") as e:
        direct_io.resolve(tmp_path, True, "L1")
    assert e.value.errno == errno.EINVAL


def test_a_disk_level_logs_its_choice_and_commits_readable_checkpoints(tmp_path, caplog):
    import torch

    from checkpointing import CheckpointManager, LevelSpec

    state = {"w": torch.arange(3 * 1024 * 1024, dtype=torch.float32), "b": torch.arange(1001, dtype=torch.float32)}
    with caplog.at_level(logging.INFO, logger="checkpointing"):
        mgr = CheckpointManager([LevelSpec("L1", str(tmp_path / "l1"), 1, 2, node_local=False, memory=False)])
        try:
            mgr.save(1, state)
            assert mgr.wait_durable() == ["L1"]
            out = {k: torch.zeros_like(v) for k, v in state.items()}
            mgr.load(out)
        finally:
            mgr.close()
    assert "checkpoint level L1" in caplog.text and "O_DIRECT chunk writes on" in caplog.text, caplog.text
    assert all(torch.equal(out[k], state[k]) for k in state)
