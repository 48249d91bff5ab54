"""Load any saved layout into any current layout, reading only the bytes each rank needs, verifying what it reads.

A target is a flat element range [start, stop) of a logical tensor: the whole tensor for a replica, Shard.flat_range
for a partition. Only the chunks overlapping that range are read. A chunk lying wholly inside the range is read
whole, straight into the destination tensor's memory, and checked against the manifest's size and crc32c. Of a
chunk the range only partly covers (a ZeRO partition ends inside it) only the blocks covering the needed bytes are
read (checksums.py: a crc32c per block of `crc_block_bytes`), each checked against its own crc: the blocks wholly
needed go straight into the destination, the at most two it needs only part of through a small scratch buffer.
Chunks of manifests written before block checksums (no block crcs) are read whole into a reused scratch buffer.

Each rank verifies what it reads, by design: damage in a block no rank of this layout needs is not seen by this
load (it fails the load of any layout that needs it, and `ecpt ckpt verify` checks every byte).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import crc32c
import numpy as np
import torch

from checkpointing.checksums import block_crc
from checkpointing.direct_io import aligned_empty
from checkpointing.errors import CheckpointCorruptError
from checkpointing.manifest import ChunkRecord, Manifest, TensorEntry
from checkpointing.staging import Shard
from checkpointing.zarr_store import pread_span, read_into


@dataclass(frozen=True)
class LoadTarget:
    """One tensor the caller wants filled: its global description and the flat range this rank needs."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    start: int
    stop: int
    dest: torch.Tensor

    @staticmethod
    def of(name: str, value: "torch.Tensor | Shard") -> "LoadTarget":
        if isinstance(value, Shard):
            return LoadTarget(
                name,
                tuple(value.global_shape),
                str(value.local.dtype).removeprefix("torch."),
                int(value.flat_range[0]),
                int(value.flat_range[1]),
                value.local,
            )
        return LoadTarget(
            name, tuple(value.shape), str(value.dtype).removeprefix("torch."), 0, math.prod(value.shape), value
        )


class Scratch:
    """One growable byte buffer reused for boundary chunks or blocks and copies (no allocation per chunk)."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)

    def view(self, nbytes: int) -> memoryview:
        if self._buf.nbytes < nbytes:
            self._buf = aligned_empty(nbytes)  # promotion writes from it, with O_DIRECT on disk levels
        return memoryview(self._buf)[:nbytes]


def mismatch(entry: TensorEntry | None, t: LoadTarget) -> str | None:
    """Why a saved tensor cannot fill this target (shape/dtype), or None if it can."""
    if entry is None:
        return f"tensor {t.name} is not in the checkpoint"
    if tuple(entry.shape) != t.shape:
        return f"tensor {t.name}: checkpoint has shape {entry.shape}, the model expects {list(t.shape)}"
    if entry.dtype != t.dtype:
        return f"tensor {t.name}: checkpoint has dtype {entry.dtype}, the model expects {t.dtype}"
    return None


def missing_chunks(entry: TensorEntry, start: int, stop: int) -> list[int]:
    """Chunks this range needs that this copy does not hold (a node-local copy may cover only some ranks)."""
    return [c for c in entry.grid().chunks_overlapping(start, stop) if c not in entry.chunks]


def verify_record(path: Path, record: ChunkRecord, crc: int, size: int, bad_blocks: list[int] | None = None) -> None:
    """Raise CheckpointCorruptError unless the chunk's size and crc32c match its record (`bad_blocks`: the blocks
    found corrupt, to name in the message)."""
    if size != record.nbytes:
        raise CheckpointCorruptError(f"chunk {path}: {size} bytes on disk, manifest says {record.nbytes} (truncated)")
    if crc != record.crc32c:
        named = ", ".join(_block_span(record, i) for i in (bad_blocks or [])[:4])
        where = f" in block{'s' if len(bad_blocks) > 1 else ''} {named}" if named else ""
        raise CheckpointCorruptError(
            f"chunk {path}: crc32c {crc:#010x} does not match the manifest's {record.crc32c:#010x} (corrupt bytes"
            f"{where})"
        )


def corrupt_blocks(record: ChunkRecord, data: memoryview) -> list[int]:
    """The blocks of a whole chunk's bytes whose crc32c differs from the record's (error path only)."""
    size = record.block_bytes
    if not record.blocks or len(data) != record.nbytes:
        return []
    return [
        pos // size
        for pos in range(0, len(data), size)
        if crc32c.crc32c(data[pos : pos + size]) != block_crc(record.blocks, pos // size)
    ]


def _block_span(record: ChunkRecord, i: int) -> str:
    lo = i * record.block_bytes
    return f"{i} (bytes {lo}-{min(record.nbytes, lo + record.block_bytes)})"


def read_chunk_checked(path: Path, record: ChunkRecord, views: list[memoryview]) -> None:
    try:
        crc, size = read_into(path, views)
    except FileNotFoundError as e:
        raise CheckpointCorruptError(f"chunk {path}: missing (listed in the manifest)") from e
    bad = None
    if crc != record.crc32c and size == record.nbytes and record.blocks:  # error path: find the damaged blocks
        try:
            bad = corrupt_blocks(record, memoryview(Path(path).read_bytes()))
        except OSError:
            bad = None
    verify_record(path, record, crc, size, bad)


class ChunkReader(Protocol):
    """Where read_range gets chunk bytes: FILE_READER for files, a level's storage (commit.LevelStorage) for an
    object store (the path is then the object's key)."""

    def read_chunk(self, path: Path, record: ChunkRecord, views: list[memoryview]) -> None:
        """Fill the views with the whole chunk's bytes after checking them against its record (raises
        CheckpointCorruptError)."""

    def read_span(self, path: Path, start: int, views: list[memoryview]) -> int:
        """Fill the views with the chunk's bytes from offset `start` on, unchecked; return the chunk's size
        (CheckpointCorruptError if it is missing)."""


class FileReader:
    """Chunks as files (every directory level)."""

    def read_chunk(self, path: Path, record: ChunkRecord, views: list[memoryview]) -> None:
        read_chunk_checked(path, record, views)

    def read_span(self, path: Path, start: int, views: list[memoryview]) -> int:
        try:
            return pread_span(path, start, views)
        except FileNotFoundError as e:
            raise CheckpointCorruptError(f"chunk {path}: missing (listed in the manifest)") from e


FILE_READER = FileReader()


def read_range(
    ckpt_dir: Path,
    manifest: Manifest,
    t: LoadTarget,
    scratch: Scratch,
    pool: ThreadPoolExecutor | None = None,
    reader: ChunkReader = FILE_READER,
) -> int:
    """Fill t.dest with elements [t.start, t.stop) of the saved tensor; return the bytes read (whole chunks, and
    the covering blocks of chunks only partly needed). One tensor of ``read_ranges``."""
    return read_ranges(ckpt_dir, manifest, [t], scratch, pool, reader)


def read_ranges(
    ckpt_dir: Path,
    manifest: Manifest,
    targets: list[LoadTarget],
    scratch: Scratch,
    pool: ThreadPoolExecutor | None = None,
    reader: ChunkReader = FILE_READER,
) -> int:
    """Fill every target's destination from the saved tensors; return the bytes read.

    With a pool, the chunk reads of all targets run concurrently (disjoint parts of the destinations), so several
    reads stay in flight even when each tensor is one chunk, as with a rank's third of every tensor: read one
    tensor at a time, a 3-way resharded load of 0.65 GB reached only 0.50-0.58 of a raw read's bandwidth."""
    plans, nread, futures = [], 0, []
    for t in targets:  # each target's reads start as soon as it is planned: planning is Python work
        plans.append(_plan(ckpt_dir, manifest, t))
        for job in plans[-1].jobs:
            if pool is None:
                nread += _read_one(*job, scratch, reader)
            else:
                futures.append(pool.submit(_read_one, *job, None, reader))
    nread += sum(f.result() for f in futures)
    for plan in plans:
        if plan.staged is not None:  # a destination that is not one flat CPU range: copy once, after the reads
            plan.target.dest.copy_(plan.staged.view(plan.target.dest.shape))
    return nread


@dataclass
class _RangePlan:
    """The chunk reads that fill one target: (path, record, destination bytes, offset in the chunk or None when
    the chunk is needed whole), and the flat buffer read into when the destination cannot be read into directly."""

    target: LoadTarget
    jobs: list[tuple[Path, ChunkRecord, memoryview, int | None]]
    staged: torch.Tensor | None


def _plan(ckpt_dir: Path, manifest: Manifest, t: LoadTarget) -> _RangePlan:
    entry = manifest.tensors[t.name]
    grid = entry.grid()
    direct = t.dest.device.type == "cpu" and t.dest.is_contiguous()
    flat = t.dest.view(-1) if direct else torch.empty(t.stop - t.start, dtype=t.dest.dtype)
    if flat.numel() == 0:
        return _RangePlan(t, [], None)
    out = memoryview(flat.view(torch.uint8).numpy())
    isz = grid.itemsize
    jobs = []
    for c in grid.chunks_overlapping(t.start, t.stop):
        record = entry.chunks.get(c)
        path = ckpt_dir / t.name / grid.chunk_key(c)
        if record is None:
            raise CheckpointCorruptError(f"chunk {path}: not in this copy's manifest")
        cs, ce = grid.chunk_range(c)
        a, b = max(cs, t.start), min(ce, t.stop)
        dest = out[(a - t.start) * isz : (b - t.start) * isz]
        jobs.append((path, record, dest, (a - cs) * isz if (a, b) != (cs, ce) else None))
    return _RangePlan(t, jobs, None if direct else flat)


def _read_one(
    path: Path,
    record: ChunkRecord,
    dest: memoryview,
    offset: int | None,
    scratch: Scratch | None,
    reader: ChunkReader = FILE_READER,
) -> int:
    """One chunk: whole, straight into the destination, if it lies wholly inside it; else only the blocks covering
    bytes [offset, offset + len(dest)) of it, or (no block crcs) the whole chunk via a scratch buffer. Returns
    the bytes read."""
    if offset is None:
        reader.read_chunk(path, record, [dest])
        return record.nbytes
    if record.blocks:
        return read_blocks(path, record, offset, dest, scratch or Scratch(), reader)
    buf = (scratch or Scratch()).view(record.nbytes)
    reader.read_chunk(path, record, [buf])
    dest[:] = buf[offset : offset + len(dest)]
    return record.nbytes


def read_blocks(
    path: Path,
    record: ChunkRecord,
    offset: int,
    dest: memoryview,
    scratch: Scratch,
    reader: ChunkReader = FILE_READER,
) -> int:
    """Fill `dest` with bytes [offset, offset + len(dest)) of the chunk, reading only the blocks that cover them
    (one read) and checking each block against its crc32c in the record; return the bytes read.

    Blocks wholly inside the range are read straight into `dest`; the first and last block, when the range covers
    them only in part, into `scratch` (at most two blocks). A chunk whose size differs from the record's fails
    (truncated), whichever blocks are read."""
    size, end = record.block_bytes, offset + len(dest)
    lo = offset - offset % size
    hi = min(record.nbytes, end + (-end) % size)
    inner_lo = min(hi, lo if lo == offset else lo + size)  # the first block wholly needed starts here
    inner_hi = end if end == hi else end - end % size  # and the last one wholly needed ends here
    if inner_lo < inner_hi:
        buf = scratch.view(hi - lo - (inner_hi - inner_lo))
        head, tail = buf[: inner_lo - lo], buf[inner_lo - lo :]
        views = [v for v in (head, dest[inner_lo - offset : inner_hi - offset], tail) if len(v)]
    else:  # no block wholly needed: the (at most two) covering blocks into scratch
        head = tail = None
        views = [scratch.view(hi - lo)]
    found = reader.read_span(path, lo, views)
    if found != record.nbytes:
        raise CheckpointCorruptError(f"chunk {path}: {found} bytes on disk, manifest says {record.nbytes} (truncated)")
    pos = lo
    for view in views:  # each view starts on a block boundary and holds whole blocks (the last may end the chunk)
        for at in range(0, len(view), size):
            i = (pos + at) // size
            crc, want = crc32c.crc32c(view[at : at + size]), _want(path, record, i)
            if crc != want:
                raise CheckpointCorruptError(
                    f"chunk {path}: block {_block_span(record, i)} crc32c {crc:#010x} does not match the "
                    f"manifest's {want:#010x} (corrupt bytes)"
                )
        pos += len(view)
    if head is None:
        dest[:] = views[0][offset - lo : end - lo]
    else:
        dest[: inner_lo - offset] = head[offset - lo :]
        dest[inner_hi - offset :] = tail[: end - inner_hi]
    return hi - lo


def _want(path: Path, record: ChunkRecord, i: int) -> int:
    try:
        return block_crc(record.blocks, i)
    except ValueError as e:
        raise CheckpointCorruptError(f"chunk {path}: malformed block crcs in the manifest ({e})") from e
