"""Load any saved layout into any current layout, reading only the chunks each rank needs, verifying each one.

A target is a flat element range [start, stop) of a logical tensor: the whole tensor for a replica, Shard.flat_range
for a partition. The chunks overlapping that range are read (no others), each checked against the manifest's size
and crc32c before it counts. Chunks lying wholly inside the range are read straight into the destination tensor's
memory (no intermediate copy); boundary chunks go through one reused scratch buffer.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from checkpointing.errors import CheckpointCorruptError
from checkpointing.manifest import ChunkRecord, Manifest, TensorEntry
from checkpointing.staging import Shard
from checkpointing.zarr_store import read_into


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
    """One growable byte buffer reused for boundary chunks and copies (no allocation per chunk)."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)

    def view(self, nbytes: int) -> memoryview:
        if self._buf.nbytes < nbytes:
            self._buf = np.empty(nbytes, dtype=np.uint8)
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


def verify_record(path: Path, record: ChunkRecord, crc: int, size: int) -> None:
    if size != record.nbytes:
        raise CheckpointCorruptError(f"chunk {path}: {size} bytes on disk, manifest says {record.nbytes} (truncated)")
    if crc != record.crc32c:
        raise CheckpointCorruptError(
            f"chunk {path}: crc32c {crc:#010x} does not match the manifest's {record.crc32c:#010x} (corrupt bytes)"
        )


def read_chunk_checked(path: Path, record: ChunkRecord, views: list[memoryview]) -> None:
    try:
        crc, size = read_into(path, views)
    except FileNotFoundError as e:
        raise CheckpointCorruptError(f"chunk {path}: missing (listed in the manifest)") from e
    verify_record(path, record, crc, size)


ChunkReader = Callable[[Path, ChunkRecord, list[memoryview]], None]
"""Fills the views with one chunk's bytes after checking them against its record (raises CheckpointCorruptError):
read_chunk_checked for files, ObjectStorage.read_chunk for an object store (the path is then the object's key)."""


def read_range(
    ckpt_dir: Path,
    manifest: Manifest,
    t: LoadTarget,
    scratch: Scratch,
    pool: ThreadPoolExecutor | None = None,
    read_chunk: ChunkReader = read_chunk_checked,
) -> int:
    """Fill t.dest with elements [t.start, t.stop) of the saved tensor; return bytes read.

    With a pool, chunks are read concurrently (disjoint parts of the destination): keeps several reads in flight
    and overlaps checksumming with I/O."""
    entry = manifest.tensors[t.name]
    grid = entry.grid()
    direct = t.dest.device.type == "cpu" and t.dest.is_contiguous()
    flat = t.dest.view(-1) if direct else torch.empty(t.stop - t.start, dtype=t.dest.dtype)
    if flat.numel() == 0:
        return 0
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
    if pool is None or len(jobs) < 2:
        for job in jobs:
            _read_one(*job, scratch, read_chunk)
    else:
        for fut in [pool.submit(_read_one, *job, None, read_chunk) for job in jobs]:
            fut.result()
    if not direct:
        t.dest.copy_(flat.view(t.dest.shape))
    return sum(job[1].nbytes for job in jobs)


def _read_one(
    path: Path,
    record: ChunkRecord,
    dest: memoryview,
    offset: int | None,
    scratch: Scratch | None,
    read_chunk: ChunkReader = read_chunk_checked,
) -> None:
    """One chunk: straight into the destination if it lies wholly inside it, else via a scratch buffer."""
    if offset is None:
        read_chunk(path, record, [dest])
        return
    buf = (scratch or Scratch()).view(record.nbytes)
    read_chunk(path, record, [buf])
    dest[:] = buf[offset : offset + len(dest)]
