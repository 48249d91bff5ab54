"""Persisting one checkpoint on one level: write (or link, or copy) owned chunks, gather checksums, commit.

Runs only in the manager's persist thread. Each function is called on every rank in the same order, so the
collectives inside line up. Write errors (OSError: disk full, permission, I/O) are caught per rank and reported as
data through the gathers, so a failing rank never leaves the others waiting in a collective.

Per level and save there are two collectives (records to the level's committer, outcome to everyone), each a single
all_gather in the common case. The per-save fixed cost is kept small: plans, zarr metadata and directory lists are
computed once per layout; fsync runs only on disk levels, several files at a time; retiring old checkpoints is a
rename (deletion happens on the janitor thread, except on memory levels where it is a few unlinks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpointing import commit
from checkpointing.commit import LevelState
from checkpointing.context import SaveContext, level_comm
from checkpointing.errors import CheckpointError
from checkpointing.manifest import ChunkRecord, Manifest, TensorEntry, read_manifest
from checkpointing.plan import RankPlan, TensorLayout
from checkpointing.reshard import Scratch, read_chunk_checked
from checkpointing.staging import BufferSet, Slot
from checkpointing.tiers import LevelSpec
from checkpointing.zarr_store import fault_pause_hook, write_file


@dataclass
class RankOutcome:
    """One rank's result on one level: chunk records, errors (each naming rank and file), bytes written."""

    records: list[list] = field(default_factory=list)  # [name, chunk, file, nbytes, crc32c]
    errors: list[str] = field(default_factory=list)
    nbytes: int = 0


def _write_new(path: Path, parts: list[memoryview], crc: int | None = None) -> int:
    """write_file() that creates missing parent directories; returns the crc32c (`crc`: already known)."""
    try:
        return write_file(path, parts, fsync=False, crc=crc)
    except FileNotFoundError:
        os.makedirs(path.parent, exist_ok=True)
        return write_file(path, parts, fsync=False, crc=crc)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except FileNotFoundError:
        if not os.path.exists(src):
            raise
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.link(src, dst)


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
            buf = torch.zeros(nbytes, dtype=torch.uint8)  # zero padding stays zero: pieces only fill real bytes
            self._assembly[(name, chunk)] = buf
        return buf

    def exchange_pieces(
        self, ctx: SaveContext, plan: RankPlan, bufset: BufferSet
    ) -> dict[tuple[str, int], torch.Tensor]:
        """Send our boundary pieces to their chunk writers, receive the pieces of chunks we write."""
        sends, recvs, assembled = [], [], {}
        rank = ctx.world.rank
        for name, dst, a, b, tag in plan.sends:
            t = ctx.layouts[name]
            my_start = t.ranges[rank][1]
            isz = t.grid.itemsize
            sends.append((bufset.flat(name).view(torch.uint8)[(a - my_start) * isz : (b - my_start) * isz], dst, tag))
        for task in plan.writes:
            if len(task.pieces) == 1:
                continue
            t = ctx.layouts[task.name]
            isz, (cs, _) = t.grid.itemsize, t.grid.chunk_range(task.chunk)
            buf = self._assembly_buffer(task.name, task.chunk, t.grid.chunk_nbytes)
            assembled[(task.name, task.chunk)] = buf
            for src, a, b, tag in task.pieces:
                dst_view = buf[(a - cs) * isz : (b - cs) * isz]
                if src == rank:
                    my_start = t.ranges[rank][1]
                    dst_view.copy_(
                        bufset.flat(task.name).view(torch.uint8)[(a - my_start) * isz : (b - my_start) * isz]
                    )
                else:
                    recvs.append((dst_view, src, tag))
        ctx.world.exchange(sends, recvs)
        return assembled

    def write_level(
        self,
        level: LevelSpec,
        ctx: SaveContext,
        bufset: BufferSet,
        out_dir: Path,
        assembled: dict[tuple[str, int], torch.Tensor],
    ) -> RankOutcome:
        """Write every chunk this rank owns on this level from the staged buffers into out_dir (boundary chunks:
        from `assembled`, see exchange_pieces)."""
        plan = ctx.rank_plan(level)
        outcome = RankOutcome()
        for i, task in enumerate(plan.writes):
            t = ctx.layouts[task.name]
            rel = f"{task.name}/{t.grid.chunk_key(task.chunk)}"
            if (task.name, task.chunk) in assembled:
                parts = [memoryview(assembled[(task.name, task.chunk)].numpy())]
            else:
                parts = self._own_parts(ctx, t, task.chunk, bufset)
            try:
                crc = _write_new(out_dir / rel, parts)
            except OSError as e:
                outcome.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: {out_dir / rel}: {e}")
                break
            outcome.records.append([task.name, task.chunk, rel, t.grid.chunk_nbytes, crc])
            outcome.nbytes += t.grid.chunk_nbytes
            fault_pause_hook(ctx.step, i + 1)
        return outcome

    def exchange_slot(self, level: LevelSpec, ctx: SaveContext, slot: Slot) -> str | None:
        """Send the slot's boundary pieces to their chunk writers, receive ours into its assembly buffers and finish
        those chunks. Every rank calls it (point-to-point partners wait for each other); returns an error or None."""
        plan, sp = ctx.rank_plan(level), slot.plan
        if not plan.sends and all(c.whole for c in sp.chunks):
            return None
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
            return f"rank {rank} ({ctx.node_id}) {level.name}: staging file in {slot.dir}: {e}"
        return None

    def slot_level(self, level: LevelSpec, ctx: SaveContext, slot: Slot, out_dir: Path) -> RankOutcome:
        """The slot staged exactly this level's chunks: checksum and hard-link its files into out_dir (memory level,
        zero-copy) or write its buffers there, checksumming while writing (host-memory slot, disk level)."""
        outcome = RankOutcome()
        base = str(out_dir)
        for i, c in enumerate(slot.plan.chunks):
            dst = f"{base}/{c.rel}"
            try:
                if slot.files:
                    crc = slot.checksum(i)  # the file being linked: the checksum covers its bytes
                    _link(slot.names[i], dst)
                else:  # checksummed block by block while written
                    crc = slot.crcs[i] = _write_new(Path(dst), [slot.read(i)], slot.crcs[i])
            except OSError as e:
                outcome.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: {dst}: {e}")
                break
            outcome.records.append([c.name, c.chunk, c.rel, c.nbytes, crc])
            outcome.nbytes += c.nbytes
            fault_pause_hook(ctx.step, i + 1)
        return outcome

    def prelink(self, level: LevelSpec, slot: Slot, out_dir: Path, rank: int, node_id: str) -> RankOutcome:
        """Link a slot's whole chunks into out_dir (all of them must be whole: no pieces to receive)."""
        outcome = RankOutcome()
        base = str(out_dir)
        for i, c in enumerate(slot.plan.chunks):
            try:
                crc = slot.checksum(i)
                _link(slot.names[i], f"{base}/{c.rel}")
            except OSError as e:
                outcome.errors.append(f"rank {rank} ({node_id}) {level.name}: {base}/{c.rel}: {e}")
                break
            outcome.records.append([c.name, c.chunk, c.rel, c.nbytes, crc])
            outcome.nbytes += c.nbytes
        return outcome

    def write_from_slot(self, level: LevelSpec, ctx: SaveContext, slot: Slot, out_dir: Path) -> RankOutcome:
        """A slower level written from a slot because the faster level failed: possible when this rank owns the
        same chunks on both levels (always on one node)."""
        outcome = RankOutcome()
        mine = {(c.name, c.chunk): i for i, c in enumerate(slot.plan.chunks)}
        wanted = [(task.name, task.chunk) for task in ctx.rank_plan(level).writes]
        missing = [key for key in wanted if key not in mine]
        if missing:
            outcome.errors.append(
                f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: the faster level failed and "
                f"this rank did not stage chunks {missing[:3]} it writes here"
            )
            return outcome
        for key in wanted:
            i = mine[key]
            c = slot.plan.chunks[i]
            try:
                crc = _write_new(out_dir / c.rel, [slot.read(i)])
            except OSError as e:
                outcome.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: {out_dir / c.rel}: {e}")
                break
            outcome.records.append([c.name, c.chunk, c.rel, c.nbytes, crc])
            outcome.nbytes += c.nbytes
        return outcome

    def _own_parts(self, ctx: SaveContext, t: TensorLayout, chunk: int, bufset: BufferSet) -> list[memoryview]:
        my_start = t.ranges[ctx.world.rank][1]
        isz = t.grid.itemsize
        a, b = t.grid.chunk_range(chunk)
        data = memoryview(bufset.flat(t.name).view(torch.uint8).numpy())[(a - my_start) * isz : (b - my_start) * isz]
        pad = t.grid.chunk_nbytes - len(data)
        return [data, self._pad(pad)] if pad else [data]

    def copy_level(self, level: LevelSpec, ctx: SaveContext, src_dir: Path, out_dir: Path) -> RankOutcome:
        """Promotion: copy the chunks this rank owns on `level` from a committed copy on a faster level."""
        plan = ctx.rank_plan(level)
        outcome = RankOutcome()
        try:
            source = read_manifest(src_dir)
        except CheckpointError as e:
            outcome.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: promotion source: {e}")
            return outcome
        for task in plan.writes:
            record = source.tensors[task.name].chunks.get(task.chunk)
            if record is None:
                outcome.errors.append(
                    f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: chunk {task.chunk} of "
                    f"{task.name} is not in the source copy {src_dir}"
                )
                break
            try:
                buf = self.scratch.view(record.nbytes)
                read_chunk_checked(src_dir / record.file, record, [buf])
                new = ChunkRecord(record.file, record.nbytes, _write_new(out_dir / record.file, [buf]))
            except (OSError, CheckpointError) as e:
                outcome.errors.append(
                    f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: {out_dir / record.file}: {e}"
                )
                break
            outcome.records.append([task.name, task.chunk, new.file, new.nbytes, new.crc32c])
            outcome.nbytes += new.nbytes
        return outcome


def build_manifest(level: LevelSpec, ctx: SaveContext, records: list[list]) -> Manifest:
    """The manifest as an object (the commit path encodes it directly: MetadataCache.encoder)."""
    tensors = {
        name: TensorEntry(list(t.shape), t.dtype, t.layout, t.grid.chunk_rows, t.grid.n_chunks)
        for name, t in ctx.layouts.items()
    }
    for name, chunk, rel, nbytes, crc in records:
        tensors[name].chunks[int(chunk)] = ChunkRecord(rel, int(nbytes), int(crc))
    extra = ctx.extras[0]
    rank_extra = {r: e for r, e in enumerate(ctx.extras) if r and e != extra}
    return Manifest(
        step=ctx.step,
        level=level.name,
        node_id=ctx.node_id if level.node_local else "",
        node_local=level.node_local,
        world_size=ctx.world.size,
        chunk_bytes=ctx.chunk_bytes,
        tensors=tensors,
        extra=extra,
        rank_extra=rank_extra,
    )


@dataclass
class LevelResult:
    """A level's outcome as every rank sees it after the final gather."""

    errors: list[str]
    path: Path
    my_nbytes: int
    total_nbytes: int
    retention_error: str | None = None


@dataclass
class Source:
    """Where a level's chunks come from: host buffers (bufset), a slot staged for this very level (`link`: its
    files are linked, or its host buffers written), a slot staged for another level (a faster level failed), or a
    committed copy on a faster level (src_dir)."""

    bufset: BufferSet | None = None
    slot: Slot | None = None
    link: bool = False
    src_dir: Path | None = None


def outcome_dict(o: RankOutcome, out_dir: Path) -> dict:
    return {"records": o.records, "errors": o.errors, "nbytes": o.nbytes, "dir": out_dir.name}


def persist_level(
    level: LevelSpec,
    ctx: SaveContext,
    writer: ChunkWriter,
    source: Source,
    state: LevelState,
    pre: list[dict | None] | None = None,
) -> LevelResult:
    """Write, link or copy this level, commit it and retire old checkpoints (commit.py's steps 1-7, in order, on
    this thread); errors come from every rank.

    Collectives: one gather of records on the level's group, one gather of outcomes on the world group. The first
    is skipped when every rank of the group already sent its records in the job's gather (`pre`: chunks linked
    into the spare skeleton before it). On disk levels every rank syncs its files and their directories in one
    concurrent batch before the first gather (the committer's zarr metadata included: it is written first).
    Retention runs before the second gather, so when it returns every rank knows old copies are gone (staging
    slots free) and which skeleton the next save uses."""
    me = ctx.world.rank
    target = commit.begin(state, ctx)
    out_dir = target.location
    comm = level_comm(level, ctx)
    committer = comm.rank == 0
    group = [r for r in range(ctx.world.size) if not level.node_local or ctx.nodes[r] == ctx.node_id]
    my_pre = pre[me] if pre is not None else None
    # boundary pieces first, on every rank whatever happens next: point-to-point partners wait for each other
    assembled, exchange_error = {}, None
    if my_pre is None and source.src_dir is None:
        if source.slot is not None and source.link:
            exchange_error = writer.exchange_slot(level, ctx, source.slot)
        elif source.slot is None:
            assembled = writer.exchange_pieces(ctx, ctx.rank_plan(level), source.bufset)
    if my_pre is not None:
        mine = RankOutcome(my_pre["records"], my_pre["errors"], my_pre["nbytes"])
    elif exchange_error:
        mine = RankOutcome(errors=[exchange_error])
    else:
        try:
            commit.prepare(state, ctx, target, committer)
        except OSError as e:
            mine = RankOutcome(errors=[f"{ctx.who(level)}: {out_dir}: {e}"])
        else:
            if source.src_dir is not None:
                mine = writer.copy_level(level, ctx, source.src_dir, out_dir)
            elif source.slot is not None and source.link:
                mine = writer.slot_level(level, ctx, source.slot, out_dir)
            elif source.slot is not None:
                mine = writer.write_from_slot(level, ctx, source.slot, out_dir)
            else:
                mine = writer.write_level(level, ctx, source.bufset, out_dir, assembled)
        if not mine.errors:
            error = commit.make_durable(state, ctx, target, [rec[2] for rec in mine.records])
            mine.errors += [error] if error else []
    if pre is not None and all(pre[r] is not None for r in group):
        gathered = [pre[r] for r in group]
    else:
        gathered = comm.all_gather_json(outcome_dict(mine, out_dir))
    errors = commit.group_errors(level, gathered)
    final = state.storage.final_location(ctx.step)
    retention_error = None
    if committer:
        result = commit.commit(state, ctx, target, [r for g in gathered for r in g["records"]], bool(errors))
        final, retention_error = result.final, result.retention_error
        errors += [result.error] if result.error else []
    everyone = ctx.world.all_gather_json(
        {
            "errors": errors if committer else mine.errors,
            "nbytes": mine.nbytes,
            "node": ctx.node_id,
            "next": commit.announcement(state) if committer else None,
        }
    )
    commit.adopt(state, ctx.node_id, everyone)
    all_errors = sorted({e for g in everyone for e in g["errors"]})
    return LevelResult(all_errors, final, mine.nbytes, sum(g["nbytes"] for g in everyone), retention_error)
