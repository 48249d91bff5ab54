"""Where the chunks a rank writes on a level come from: one protocol, four kinds of source.

A `ChunkSource` first exchanges boundary pieces with the other ranks (`exchange`, on every rank of the job, even
one that will fail afterwards: point-to-point partners wait for each other), then yields, for each chunk this rank
owns on the level, a `Chunk` whose `load()` gives its bytes (to write, checksummed while writing unless their
checksums are known) or a staged file (to hard-link, already checksummed). persist.write_chunks is the one loop that
consumes them. Checksums are checksums.ChunkCrcs: the whole chunk's crc32c and one per block.

  HostBuffers    the save was staged into host buffers (BufferSet): slices of them, boundary chunks assembled from
                 pieces received from their neighbours
  StagedSlot     the save was staged zero-copy for this level (Slot): its files are linked (memory level) or its
                 buffers written (disk level); with `fallback`, a slot staged for a faster level that failed
  CommittedCopy  promotion: the chunks of a committed copy on a faster level, read and verified (their records'
                 checksums are reused when the source has block crcs of this version's block size)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from checkpointing.checksums import CRC_BLOCK_BYTES, ChunkCrcs
from checkpointing.context import SaveContext
from checkpointing.direct_io import aligned_zeros
from checkpointing.errors import CheckpointError
from checkpointing.manifest import read_manifest
from checkpointing.reshard import Scratch, read_chunk_checked
from checkpointing.slots import Slot
from checkpointing.staging import BufferSet
from checkpointing.tiers import LevelSpec


class SourceError(Exception):
    """A source cannot provide what this rank writes on the level (the message says what and where)."""


@dataclass
class Chunk:
    """One chunk file this rank writes. load() -> (bytes as views, their checksums if known) or (a staged file to
    link, its checksums); it runs inside the write loop, so a read error is reported with the chunk's path."""

    name: str
    chunk: int
    rel: str
    nbytes: int
    load: Callable[[], tuple[list[memoryview] | str, ChunkCrcs | None]]


class ChunkSource(Protocol):
    def exchange(self, level: LevelSpec, ctx: SaveContext) -> None:
        """Send and receive boundary pieces (every rank, before anything can fail); raises SourceError."""

    def chunks(self, level: LevelSpec, ctx: SaveContext) -> Iterator[Chunk]:
        """This rank's chunks on `level`, in plan order; raises SourceError when it cannot provide one."""


class Buffers:
    """Reusable buffers the sources share across saves (one per writing thread): boundary-chunk assembly, zero
    padding, promotion read scratch."""

    def __init__(self) -> None:
        self._assembly: dict[tuple[str, int], torch.Tensor] = {}
        self._zeros = aligned_zeros(0)
        self.scratch = Scratch()

    def pad(self, n: int) -> memoryview:
        if len(self._zeros) < n:
            self._zeros = aligned_zeros(n)
        return memoryview(self._zeros)[:n]

    def assembly(self, name: str, chunk: int, nbytes: int) -> torch.Tensor:
        buf = self._assembly.get((name, chunk))
        if buf is None or buf.numel() != nbytes:
            # zero padding stays zero: pieces only fill real bytes; aligned for O_DIRECT writes (direct_io.py)
            buf = torch.from_numpy(aligned_zeros(nbytes))
            self._assembly[(name, chunk)] = buf
        return buf


class HostBuffers:
    """The save's tensors staged in host buffers (see the module docstring)."""

    def __init__(self, bufset: BufferSet, buffers: Buffers) -> None:
        self.bufset = bufset
        self._buffers = buffers
        self._assembled: dict[tuple[str, int], torch.Tensor] = {}

    def _mine(self, ctx: SaveContext, name: str, a: int, b: int) -> torch.Tensor:
        """Elements [a, b) of tensor `name` (global flat indices) from this rank's buffer, as bytes."""
        t = ctx.layouts[name]
        my_start, isz = t.ranges[ctx.world.rank][1], t.grid.itemsize
        return self.bufset.flat(name).view(torch.uint8)[(a - my_start) * isz : (b - my_start) * isz]

    def exchange(self, level: LevelSpec, ctx: SaveContext) -> None:
        plan, rank = ctx.rank_plan(level), ctx.world.rank
        sends = [(self._mine(ctx, name, a, b), dst, tag) for name, dst, a, b, tag in plan.sends]
        recvs, self._assembled = [], {}
        for task in plan.writes:
            if len(task.pieces) == 1:
                continue
            t = ctx.layouts[task.name]
            isz, (cs, _) = t.grid.itemsize, t.grid.chunk_range(task.chunk)
            buf = self._buffers.assembly(task.name, task.chunk, t.grid.chunk_nbytes)
            self._assembled[(task.name, task.chunk)] = buf
            for src, a, b, tag in task.pieces:
                dst_view = buf[(a - cs) * isz : (b - cs) * isz]
                if src == rank:
                    dst_view.copy_(self._mine(ctx, task.name, a, b))
                else:
                    recvs.append((dst_view, src, tag))
        ctx.world.exchange(sends, recvs)

    def chunks(self, level: LevelSpec, ctx: SaveContext) -> Iterator[Chunk]:
        for task in ctx.rank_plan(level).writes:
            t = ctx.layouts[task.name]
            assembled = self._assembled.get((task.name, task.chunk))
            if assembled is not None:
                parts = [memoryview(assembled.numpy())]
            else:
                a, b = t.grid.chunk_range(task.chunk)
                data = memoryview(self._mine(ctx, task.name, a, b).numpy())
                pad = t.grid.chunk_nbytes - len(data)
                parts = [data, self._buffers.pad(pad)] if pad else [data]
            yield Chunk(
                task.name,
                task.chunk,
                f"{task.name}/{t.grid.chunk_key(task.chunk)}",
                t.grid.chunk_nbytes,
                lambda parts=parts: (parts, None),
            )


class StagedSlot:
    """A save staged zero-copy into a Slot for this level, or (`fallback`) for a faster level that failed: then
    this rank can write the level only if it owns the same chunks there (always so on one node)."""

    def __init__(self, slot: Slot, fallback: bool = False) -> None:
        self.slot = slot
        self.fallback = fallback

    def exchange(self, level: LevelSpec, ctx: SaveContext) -> None:
        """Send the slot's boundary pieces, receive ours into its assembly buffers and finish those chunks."""
        slot = self.slot
        plan, sp = ctx.rank_plan(level), slot.plan
        if self.fallback or (not plan.sends and all(c.whole for c in sp.chunks)):
            return
        rank = ctx.world.rank
        sends = [(torch.from_numpy(buf), dst, tag) for buf, (_, dst, _, _, tag) in zip(slot.sendbufs, plan.sends)]
        recvs = []
        for i, task in enumerate(plan.writes):
            if sp.chunks[i].whole:
                continue
            t = ctx.layouts[task.name]
            isz, (cs, _) = t.grid.itemsize, t.grid.chunk_range(task.chunk)
            buf = torch.from_numpy(slot.assembly[i])
            recvs += [(buf[(a - cs) * isz : (b - cs) * isz], src, tag) for src, a, b, tag in task.pieces if src != rank]
        ctx.world.exchange(sends, recvs)
        try:
            slot.finish_assembled()
        except OSError as e:
            raise SourceError(f"staging file in {slot.dir}: {e}") from e

    def chunks(self, level: LevelSpec | None, ctx: SaveContext | None) -> Iterator[Chunk]:
        """level=None: every chunk of the slot (a pre-link, before the job's context exists)."""
        slot = self.slot
        if not self.fallback:
            for i, c in enumerate(slot.plan.chunks):
                yield Chunk(c.name, c.chunk, c.rel, c.nbytes, lambda i=i: self._staged(i))
            return
        mine = {(c.name, c.chunk): i for i, c in enumerate(slot.plan.chunks)}
        wanted = [(task.name, task.chunk) for task in ctx.rank_plan(level).writes]
        missing = [key for key in wanted if key not in mine]
        if missing:
            raise SourceError(
                f"the faster level failed and this rank did not stage chunks {missing[:3]} it writes here"
            )
        for key in wanted:
            i = mine[key]
            c = slot.plan.chunks[i]
            yield Chunk(c.name, c.chunk, c.rel, c.nbytes, lambda i=i: ([slot.read(i)], None))

    def _staged(self, i: int) -> tuple[list[memoryview] | str, ChunkCrcs | None]:
        if self.slot.files:  # the file is linked: the checksum covers its bytes
            return self.slot.names[i], self.slot.checksum(i)
        return [self.slot.read(i)], self.slot.crcs[i]  # None for whole chunks: checksummed while written


class CommittedCopy:
    """Promotion: the chunks this rank owns on the level, read (and verified) from a committed copy."""

    def __init__(self, src_dir: Path, buffers: Buffers) -> None:
        self.src_dir = src_dir
        self._scratch = buffers.scratch

    def exchange(self, level: LevelSpec, ctx: SaveContext) -> None:
        return None  # every rank reads whole chunks: nothing to exchange

    def chunks(self, level: LevelSpec, ctx: SaveContext) -> Iterator[Chunk]:
        try:
            source = read_manifest(self.src_dir)
        except CheckpointError as e:
            raise SourceError(f"promotion source: {e}") from e
        for task in ctx.rank_plan(level).writes:
            record = source.tensors[task.name].chunks.get(task.chunk)
            if record is None:
                raise SourceError(f"chunk {task.chunk} of {task.name} is not in the source copy {self.src_dir}")

            def load(record=record) -> tuple[list[memoryview], ChunkCrcs | None]:
                buf = self._scratch.view(record.nbytes)
                read_chunk_checked(self.src_dir / record.file, record, [buf])
                # the bytes match the record's whole crc32c: its block crcs are theirs too, unless the source
                # predates block checksums or used another block size (then they are checksummed while written)
                known = record.blocks and record.block_bytes == CRC_BLOCK_BYTES
                return [buf], ChunkCrcs(record.crc32c, record.blocks) if known else None

            yield Chunk(task.name, task.chunk, record.file, record.nbytes, load)
