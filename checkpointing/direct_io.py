"""Direct I/O for disk levels: chunk bytes go from the staging buffers to the disk without the page cache.

Why: a buffered write copies every byte into the page cache and the kernel writes it back later, and on these
machines that costs far more CPU than the copy suggests. Writing 2 GiB as 128 files of 16 MiB with 8 threads and
fsync took 3.7-11 s of system CPU buffered and 0.07-0.15 s with O_DIRECT, and 2.6-6.1 s against 1.3-1.4 s of wall
time. On 2 cores that CPU is taken from the training loop. (`benchmarks/checkpoint.py --only loop` shows the
effect on a training loop.) DCP's FileSystemWriter writes through the page cache.

O_DIRECT needs the buffer address, the file offset and the length to be multiples of the device's logical block
size. `ALIGN` (4096) covers every common device. The staging buffers are allocated aligned (`aligned_empty`), and
chunk sizes are usually multiples of it. Any bytes that are not aligned (a chunk's odd tail, a zero padding view)
go through the same file's ordinary descriptor, and fsync makes them durable as before.

Call order: `resolve(root, setting, level name)` once per level, at its first write (it probes the file system);
then `write_parts` per chunk file (through `zarr_store.write_file`). The level's `direct_io` setting decides: None
uses O_DIRECT where the file system accepts it, True requires it (an error names the level and root), False never
uses it. Memory levels never use it (`commit_fs.FileStorage`): their files are the page cache.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

ALIGN = 4096
"""Alignment of buffer addresses, file offsets and lengths for O_DIRECT (the largest common logical block size)."""

DIRECT_PIECE = 8 << 20
"""Bytes per O_DIRECT write call. Each call waits for the device, so pieces are larger than buffered ones."""

O_DIRECT = getattr(os, "O_DIRECT", 0)


def aligned_empty(nbytes: int) -> np.ndarray:
    """A byte array of ``nbytes`` whose address is a multiple of ALIGN (numpy and torch align to 64 bytes only)."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]


def aligned_zeros(nbytes: int) -> np.ndarray:
    out = aligned_empty(nbytes)
    out.fill(0)
    return out


def address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


def direct_length(view: memoryview, offset: int) -> int:
    """How many leading bytes of ``view``, written at ``offset``, O_DIRECT can take (0: none)."""
    if offset % ALIGN or len(view) < ALIGN or address(view) % ALIGN:
        return 0
    return len(view) - len(view) % ALIGN


def probe(directory: Path) -> str | None:
    """None if ``directory``'s file system accepts an aligned O_DIRECT write, else the reason it does not."""
    if not O_DIRECT:
        return "this platform has no O_DIRECT"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".direct-io-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:  # tmpfs, some FUSE and network file systems
            return f"the file system refuses O_DIRECT ({e.strerror})"
        raise
    try:
        os.write(fd, memoryview(aligned_zeros(ALIGN)))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return f"the file system refuses an aligned O_DIRECT write ({e.strerror})"
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return None


def resolve(root: Path, setting: bool | None, level_name: str) -> tuple[bool, str]:
    """Whether a disk level writes with O_DIRECT, and why (for the log). Raises OSError when ``setting`` is True
    and the file system refuses it."""
    if setting is False:
        return False, "direct_io = false"
    refused = probe(root)
    if refused is None:
        return True, "the file system accepts O_DIRECT"
    if setting:
        raise OSError(
            errno.EINVAL,
            f"level {level_name}: direct_io = true but {root}: {refused}; set direct_io = false (or leave it "
            f"unset to detect) for this level",
        )
    return False, refused


def write_parts(
    fd: int, direct_fd: int, parts: list[memoryview], piece: int, before_write: Callable[[memoryview], None] | None
) -> None:
    """Write ``parts`` one after another from offset 0: aligned runs through ``direct_fd`` (O_DIRECT), the rest
    through ``fd`` (same file, ordinary). ``before_write`` sees every byte once, in order (the checksum)."""
    offset = 0
    for part in parts:
        step = DIRECT_PIECE if direct_fd >= 0 else piece
        for pos in range(0, len(part), step):
            view = part[pos : pos + step]
            if before_write is not None:
                before_write(view)
            n = direct_length(view, offset) if direct_fd >= 0 else 0
            if n:
                _pwrite_all(direct_fd, view[:n], offset)
            _pwrite_all(fd, view[n:], offset + n)
            offset += len(view)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
