"""Persisting one checkpoint on one level: write (or copy) owned chunks, gather checksums, commit the manifest.

Runs only in the manager's persist thread. Each function is called on every rank in the same order, so the
collectives inside line up. Write errors (OSError: disk full, permission, I/O) are caught per rank and reported as
data through the gathers, so a failing rank never leaves the others waiting in a collective.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpointing.comm import Comm
from checkpointing.errors import CheckpointError
from checkpointing.manifest import ChunkRecord, Manifest, TensorEntry, read_manifest, write_manifest
from checkpointing.plan import RankPlan, TensorLayout, plan_for_rank
from checkpointing.reshard import Scratch, copy_chunk
from checkpointing.staging import BufferSet
from checkpointing.tiers import LevelSpec, partial_dir, publish, retain
from checkpointing.zarr_store import (array_metadata, fault_pause_hook, fsync_dir, fsync_path, group_metadata,
                                      group_paths, write_file)


@dataclass
class SaveContext:
    """What every rank agreed on for one save (from the all-gathered job info)."""

    step: int
    nonce: str
    layouts: dict[str, TensorLayout]
    extras: list[dict]
    nodes: list[str]
    world: Comm
    local: Comm
    node_id: str
    chunk_bytes: int


@dataclass
class RankOutcome:
    """One rank's result on one level: chunk records, errors (each naming rank and file), bytes written."""

    records: list[list] = field(default_factory=list)      # [name, chunk, file, nbytes, crc32c]
    errors: list[str] = field(default_factory=list)
    nbytes: int = 0


class ChunkWriter:
    """Writes this rank's chunks from the staged buffers; keeps reusable boundary-assembly and padding buffers."""

    def __init__(self) -> None:
        self._assembly: dict[tuple[str, int], torch.Tensor] = {}
        self._zeros = bytes(0)
        self.scratch = Scratch()

    def _pad(self, n: int) -> memoryview:
        if len(self._zeros) < n:
            self._zeros = bytes(n)
        return memoryview(self._zeros)[:n]

    def _assembly_buffer(self, name: str, chunk: int, nbytes: int) -> torch.Tensor:
        buf = self._assembly.get((name, chunk))
        if buf is None or buf.numel() != nbytes:
            buf = torch.zeros(nbytes, dtype=torch.uint8)   # zero padding stays zero: pieces only fill real bytes
            self._assembly[(name, chunk)] = buf
        return buf

    def exchange_pieces(self, ctx: SaveContext, plan: RankPlan, bufset: BufferSet) -> dict[tuple[str, int], torch.Tensor]:
        """Send our boundary pieces to their chunk writers, receive the pieces of chunks we write."""
        sends, recvs, assembled = [], [], {}
        rank = ctx.world.rank
        for name, dst, a, b, tag in plan.sends:
            t = ctx.layouts[name]
            my_start = t.ranges[rank][1]
            isz = t.grid.itemsize
            sends.append((bufset.flat(name).view(torch.uint8)[(a - my_start) * isz:(b - my_start) * isz], dst, tag))
        for task in plan.writes:
            if len(task.pieces) == 1:
                continue
            t = ctx.layouts[task.name]
            isz, (cs, _) = t.grid.itemsize, t.grid.chunk_range(task.chunk)
            buf = self._assembly_buffer(task.name, task.chunk, t.grid.chunk_nbytes)
            assembled[(task.name, task.chunk)] = buf
            for src, a, b, tag in task.pieces:
                dst_view = buf[(a - cs) * isz:(b - cs) * isz]
                if src == rank:
                    my_start = t.ranges[rank][1]
                    dst_view.copy_(bufset.flat(task.name).view(torch.uint8)[(a - my_start) * isz:(b - my_start) * isz])
                else:
                    recvs.append((dst_view, src, tag))
        ctx.world.exchange(sends, recvs)
        return assembled

    def write_level(self, level: LevelSpec, ctx: SaveContext, bufset: BufferSet, out_dir: Path) -> RankOutcome:
        """Write every chunk this rank owns on this level from the staged buffers into out_dir."""
        plan = plan_for_rank(ctx.layouts, ctx.world.rank, writers_for(level, ctx))
        assembled = self.exchange_pieces(ctx, plan, bufset)
        outcome = RankOutcome()
        for i, task in enumerate(plan.writes):
            t = ctx.layouts[task.name]
            rel = f"{task.name}/{t.grid.chunk_key(task.chunk)}"
            if (task.name, task.chunk) in assembled:
                parts = [memoryview(assembled[(task.name, task.chunk)].numpy())]
            else:
                parts = self._own_parts(ctx, t, task.chunk, bufset)
            try:
                path = out_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                crc = write_file(path, parts, fsync=False)
            except OSError as e:
                outcome.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: {out_dir / rel}: {e}")
                break
            outcome.records.append([task.name, task.chunk, rel, t.grid.chunk_nbytes, crc])
            outcome.nbytes += t.grid.chunk_nbytes
            fault_pause_hook(ctx.step, i + 1)
        if level.fsync and not outcome.errors:
            self._fsync_written(level, ctx, out_dir, outcome)
        return outcome

    @staticmethod
    def _fsync_written(level: LevelSpec, ctx: SaveContext, out_dir: Path, outcome: RankOutcome) -> None:
        """fsync after writing everything (not after each file): writeback of earlier chunks overlaps later writes."""
        paths = [out_dir / rec[2] for rec in outcome.records]
        try:
            for path in paths:
                fsync_path(path)
            for d in sorted({p.parent for p in paths}, key=lambda p: -len(p.parts)):
                fsync_dir(d)
        except OSError as e:
            outcome.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: fsync in {out_dir}: {e}")

    def _own_parts(self, ctx: SaveContext, t: TensorLayout, chunk: int, bufset: BufferSet) -> list[memoryview]:
        my_start = t.ranges[ctx.world.rank][1]
        isz = t.grid.itemsize
        a, b = t.grid.chunk_range(chunk)
        data = memoryview(bufset.flat(t.name).view(torch.uint8).numpy())[(a - my_start) * isz:(b - my_start) * isz]
        pad = t.grid.chunk_nbytes - len(data)
        return [data, self._pad(pad)] if pad else [data]

    def copy_level(self, level: LevelSpec, ctx: SaveContext, src_dir: Path, out_dir: Path) -> RankOutcome:
        """Promotion: copy the chunks this rank owns on `level` from a committed copy on a faster level."""
        plan = plan_for_rank(ctx.layouts, ctx.world.rank, writers_for(level, ctx))
        outcome = RankOutcome()
        try:
            source = read_manifest(src_dir)
        except CheckpointError as e:
            outcome.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: promotion source: {e}")
            return outcome
        for task in plan.writes:
            record = source.tensors[task.name].chunks.get(task.chunk)
            if record is None:
                outcome.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: chunk {task.chunk} of "
                                      f"{task.name} is not in the source copy {src_dir}")
                break
            try:
                new = copy_chunk(src_dir, out_dir, record, self.scratch, level.fsync)
            except (OSError, CheckpointError) as e:
                outcome.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: {out_dir / record.file}: {e}")
                break
            outcome.records.append([task.name, task.chunk, new.file, new.nbytes, new.crc32c])
            outcome.nbytes += new.nbytes
        return outcome


def writers_for(level: LevelSpec, ctx: SaveContext) -> list[str] | None:
    """The node of every rank on a node-local level (each node writes its own copy); None on a shared level."""
    return ctx.nodes if level.node_local else None


def level_comm(level: LevelSpec, ctx: SaveContext) -> Comm:
    return ctx.local if level.node_local else ctx.world


def build_manifest(level: LevelSpec, ctx: SaveContext, records: list[list]) -> Manifest:
    tensors = {name: TensorEntry(list(t.shape), t.dtype, t.layout, t.grid.chunk_rows, t.grid.n_chunks)
               for name, t in ctx.layouts.items()}
    for name, chunk, rel, nbytes, crc in records:
        tensors[name].chunks[int(chunk)] = ChunkRecord(rel, int(nbytes), int(crc))
    extra = ctx.extras[0]
    rank_extra = {r: e for r, e in enumerate(ctx.extras) if r and e != extra}
    return Manifest(step=ctx.step, level=level.name, node_id=ctx.node_id if level.node_local else "",
                    node_local=level.node_local, world_size=ctx.world.size, chunk_bytes=ctx.chunk_bytes,
                    tensors=tensors, extra=extra, rank_extra=rank_extra)


def write_zarr_metadata(out_dir: Path, manifest: Manifest, fsync: bool) -> None:
    """zarr.json for the root group, every intermediate group and every array (so zarr.open reads the checkpoint)."""
    written = []
    for group in group_paths(list(manifest.tensors)):
        path = out_dir / group / "zarr.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        attrs = {"ecpt_step": manifest.step, "ecpt_level": manifest.level} if group == "" else {}
        written.append(_write_json(path, group_metadata(attrs), manifest, out_dir))
    for name, entry in manifest.tensors.items():
        path = out_dir / name / "zarr.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(_write_json(path, array_metadata(tuple(entry.shape), entry.dtype, entry.grid()), manifest,
                                   out_dir))
    if fsync:
        for path in written:
            fsync_path(path)
        for d in sorted({p.parent for p in written}, key=lambda p: -len(p.parts)):
            fsync_dir(d)


def _write_json(path: Path, doc: dict, manifest: Manifest, out_dir: Path) -> Path:
    data = json.dumps(doc, indent=1).encode()
    crc = write_file(path, [memoryview(data)], fsync=False)
    rel = str(path.relative_to(out_dir))
    manifest.files[rel] = ChunkRecord(rel, len(data), crc)
    return path


def commit_level(level: LevelSpec, ctx: SaveContext, out_dir: Path, records: list[list]) -> Path:
    """Committer only: metadata, manifest (the commit point), rename to the final name, latest.

    Retention runs later (apply_retention), after the save's durable future resolved: deleting an old checkpoint
    is not part of making the new one durable."""
    manifest = build_manifest(level, ctx, records)
    write_zarr_metadata(out_dir, manifest, level.fsync)
    write_manifest(out_dir, manifest, level.fsync)
    return publish(Path(level.root), out_dir, ctx.step, ctx.nonce, level.fsync)


def apply_retention(level: LevelSpec, ctx: SaveContext) -> None:
    """Committer of the level only (every node's on a node-local level): keep the newest keep_last checkpoints."""
    if level_comm(level, ctx).rank == 0:
        retain(Path(level.root), level.keep_last, ctx.nonce)


@dataclass
class LevelResult:
    """A level's outcome as every rank sees it after the final gather."""

    errors: list[str]
    path: Path
    my_nbytes: int
    total_nbytes: int


def persist_level(level: LevelSpec, ctx: SaveContext, writer: ChunkWriter, bufset: BufferSet | None,
                  src_dir: Path | None) -> LevelResult:
    """Write (from buffers) or copy (from src_dir) this level and commit it; errors come from every rank.

    Collectives: one gather of records on the level's group, one gather of outcomes on the world group."""
    out_dir = partial_dir(Path(level.root), ctx.step, ctx.nonce)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        mine = RankOutcome(errors=[f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: {out_dir}: {e}"])
    else:
        mine = writer.copy_level(level, ctx, src_dir, out_dir) if bufset is None else \
            writer.write_level(level, ctx, bufset, out_dir)
    comm = level_comm(level, ctx)
    gathered = comm.all_gather_json({"records": mine.records, "errors": mine.errors})
    errors = [e for g in gathered for e in g["errors"]]
    final = Path(level.root) / out_dir.name.split(".partial-")[0]
    if comm.rank == 0 and not errors:
        try:
            final = commit_level(level, ctx, out_dir, [r for g in gathered for r in g["records"]])
        except OSError as e:
            errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: commit in {out_dir}: {e}")
    if comm.rank == 0 and errors:
        shutil.rmtree(out_dir, ignore_errors=True)   # free the space a failed save took; older ones stay intact
    everyone = ctx.world.all_gather_json({"errors": errors if comm.rank == 0 else mine.errors, "nbytes": mine.nbytes})
    all_errors = sorted({e for g in everyone for e in g["errors"]})
    return LevelResult(all_errors, final, mine.nbytes, sum(g["nbytes"] for g in everyone))
