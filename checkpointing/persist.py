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

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import torch

from checkpointing.comm import Comm
from checkpointing.errors import CheckpointError
from checkpointing.manifest import MANIFEST_NAME, ChunkRecord, Manifest, ManifestEncoder, TensorEntry, read_manifest
from checkpointing.plan import PlanCache, RankPlan, TensorLayout
from checkpointing.reshard import Scratch, read_chunk_checked
from checkpointing.staging import BufferSet, Slot, StagePlan
from checkpointing.tiers import Janitor, LevelSpec, partial_dir, publish, retain, step_dir_name
from checkpointing.zarr_store import (
    array_metadata,
    fault_pause_hook,
    fsync_many,
    group_metadata,
    group_paths,
    write_bytes_atomic,
    write_file,
)


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
    sig: str = ""
    plans: PlanCache = field(default_factory=PlanCache)

    def rank_plan(self, level: LevelSpec) -> RankPlan:
        return self.plans.rank_plan(self.sig, self.layouts, self.world.rank, writers_for(level, self))

    def stage_plan(self, level: LevelSpec) -> StagePlan:
        return self.plans.stage_plan(self.sig, self.layouts, self.world.rank, writers_for(level, self))


@dataclass
class RankOutcome:
    """One rank's result on one level: chunk records, errors (each naming rank and file), bytes written."""

    records: list[list] = field(default_factory=list)  # [name, chunk, file, nbytes, crc32c]
    errors: list[str] = field(default_factory=list)
    nbytes: int = 0


def _open_new(path: Path) -> int:
    """Create/truncate `path` for writing, creating its directories only when they are missing."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        os.makedirs(path.parent, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


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


def _ancestors(paths: list[Path], top: Path) -> list[Path]:
    """Every directory between the files and `top` (inclusive), deepest first: what to fsync after creating them."""
    dirs = set()
    for p in paths:
        d = p.parent
        while d not in dirs and d != top.parent:
            dirs.add(d)
            if d == top:
                break
            d = d.parent
    return sorted(dirs, key=lambda p: -len(p.parts))


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


def writers_for(level: LevelSpec, ctx: SaveContext) -> list[str] | None:
    """The node of every rank on a node-local level (each node writes its own copy); None on a shared level."""
    return ctx.nodes if level.node_local else None


def level_comm(level: LevelSpec, ctx: SaveContext) -> Comm:
    return ctx.local if level.node_local else ctx.world


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


class MetadataCache:
    """What one layout's commits share, computed once: the zarr.json documents (every group but the root, every
    array) as bytes with their crc32c, and the manifest encoder."""

    def __init__(self) -> None:
        self._sig: str | None = None
        self._docs: list[tuple[str, bytes, int]] = []
        self._encoder: ManifestEncoder | None = None

    def _refresh(self, sig: str, layouts: dict[str, TensorLayout]) -> None:
        if sig == self._sig and sig:
            return
        docs = []
        for group in group_paths(list(layouts)):
            if group:
                docs.append((f"{group}/zarr.json", _json_bytes(group_metadata({}))))
        for name, t in layouts.items():
            docs.append((f"{name}/zarr.json", _json_bytes(array_metadata(tuple(t.shape), t.dtype, t.grid))))
        self._docs = [(rel, data, crc32c.crc32c(data)) for rel, data in docs]
        self._encoder = ManifestEncoder(
            {
                name: (list(t.shape), t.dtype, t.layout, t.grid.chunk_rows, t.grid.n_chunks)
                for name, t in layouts.items()
            }
        )
        self._sig = sig

    def docs(self, sig: str, layouts: dict[str, TensorLayout]) -> list[tuple[str, bytes, int]]:
        self._refresh(sig, layouts)
        return self._docs

    def encoder(self, sig: str, layouts: dict[str, TensorLayout]) -> ManifestEncoder:
        self._refresh(sig, layouts)
        return self._encoder


def _json_bytes(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def write_zarr_metadata(
    out_dir: Path,
    step: int,
    level_name: str,
    layouts: dict[str, TensorLayout],
    cache: MetadataCache,
    sig: str = "",
    only_root: bool = False,
) -> tuple[dict[str, ChunkRecord], list[Path]]:
    """zarr.json for the root group, every intermediate group and every array (so zarr.open reads the checkpoint);
    returns their records for the manifest and the files written (to fsync). only_root: the others are already in
    out_dir (a reused tree of the same layout): only record them."""
    root = _json_bytes(group_metadata({"ecpt_step": step, "ecpt_level": level_name}))
    others = cache.docs(sig, layouts)
    docs = [("zarr.json", root, crc32c.crc32c(root)), *others]
    files = {rel: ChunkRecord(rel, len(data), crc) for rel, data, crc in docs}
    written = []
    for rel, data, crc in docs[:1] if only_root else docs:
        path = out_dir / rel
        fd = _open_new(path)
        try:
            view = memoryview(data)
            while len(view):
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        written.append(path)
    return files, written


def commit_level(
    level: LevelSpec,
    ctx: SaveContext,
    out_dir: Path,
    records: list[list],
    files: dict[str, ChunkRecord],
    cache: MetadataCache | None = None,
    janitor: Janitor | None = None,
) -> Path:
    """Committer only, once every chunk and the zarr metadata (`files`) are written and synced: the manifest (the
    commit point), the rename to the final name, latest."""
    cache = cache or MetadataCache()
    extra = ctx.extras[0]
    data = cache.encoder(ctx.sig, ctx.layouts).encode(
        step=ctx.step,
        level=level.name,
        node_id=ctx.node_id if level.node_local else "",
        node_local=level.node_local,
        world_size=ctx.world.size,
        chunk_bytes=ctx.chunk_bytes,
        records=records,
        extra=extra,
        rank_extra={r: e for r, e in enumerate(ctx.extras) if r and e != extra},
        files=files,
    )
    write_bytes_atomic(out_dir / MANIFEST_NAME, data, level.sync)
    return publish(Path(level.root), out_dir, ctx.step, ctx.nonce, level.sync, _janitor_for(level, janitor))


def _janitor_for(level: LevelSpec, janitor: Janitor | None) -> Janitor | None:
    """Memory levels delete at once (a few unlinks, and the memory and staging slots come back before the next
    save); disk levels hand deletion to the janitor thread."""
    return None if level.is_memory else janitor


@dataclass
class LevelState:
    """What one rank keeps about one level between saves.

    The committer does not delete the newest retired checkpoint: it renames it to `.next-<token>` and removes its
    chunk files (on memory levels that frees the staging slots linked there), and the next save of the same layout
    links or writes its chunks into that tree and renames it into place: no directories to create, no zarr
    metadata but the root group's to write (and, on disk, to fsync), nothing to delete. `spare` is that tree as announced by the
    level's committer in the last outcome gather, so every rank of the level's group holds the same value."""

    meta: MetadataCache = field(default_factory=MetadataCache)
    token: str = field(default_factory=lambda: secrets.token_hex(4))
    spare: Path | None = None
    spare_sig: str | None = None
    created: dict[str, str] = field(default_factory=dict)  # committer: dir name -> layout sig of its saves
    pinned: set[str] = field(default_factory=set)  # committed dirs a pending promotion still reads


def apply_retention(
    level: LevelSpec,
    ctx: SaveContext,
    janitor: Janitor | None = None,
    state: LevelState | None = None,
    chunk_files: list[str] | None = None,
    others: bool = True,
) -> None:
    """Committer of the level only (every node's on a node-local level): keep the newest keep_last checkpoints,
    and the newest retired one of this layout as the next save's skeleton (LevelState)."""
    if level_comm(level, ctx).rank != 0:
        return
    root = Path(level.root)
    reuse = None
    if state is not None and chunk_files is not None:

        def as_spare(path: Path) -> Path | None:
            if state.created.get(path.name) != ctx.sig or state.spare is not None:
                return None
            spare = root / f".next-{state.token}"
            os.replace(path, spare)
            base = str(spare)
            try:
                for rel in [*chunk_files, MANIFEST_NAME]:
                    try:
                        os.unlink(f"{base}/{rel}")
                    except FileNotFoundError:
                        pass
            except OSError:
                shutil.rmtree(spare, ignore_errors=True)
                return None
            state.spare, state.spare_sig = spare, ctx.sig
            return spare

        reuse = as_spare
    retain(
        root,
        level.keep_last,
        ctx.nonce,
        _janitor_for(level, janitor),
        reuse,
        keep=None if state is None or state.spare is None else state.spare.name,
        pinned=set() if state is None else state.pinned,
        others=others,
    )
    if state is not None:
        state.created = {n: sig for n, sig in state.created.items() if (root / n).is_dir()}


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


def target_dir(level: LevelSpec, ctx: SaveContext, state: LevelState) -> tuple[Path, bool]:
    """Where this save's files go on `level`: the spare skeleton if there is one of this layout, else a fresh
    partial directory. The same on every rank of the level's group (state.spare comes from a gather)."""
    if state.spare is not None and state.spare_sig == ctx.sig:
        return state.spare, True
    return partial_dir(Path(level.root), ctx.step, ctx.nonce), False


def outcome_dict(o: RankOutcome, out_dir: Path) -> dict:
    return {"records": o.records, "errors": o.errors, "nbytes": o.nbytes, "dir": out_dir.name}


def unlink_outcome(o: dict, out_dir: Path) -> None:
    """Undo pre-linked chunk files of a save that was dropped (the skeleton stays reusable)."""
    for rec in o["records"]:
        try:
            os.unlink(f"{out_dir}/{rec[2]}")
        except FileNotFoundError:
            pass


def sync_written(level: LevelSpec, ctx: SaveContext, mine: RankOutcome, out_dir: Path, meta_paths: list[Path]) -> None:
    """On a level that syncs: fsync the chunk files this rank wrote, its metadata files and their directories
    (before the commit makes them visible); a failure joins this rank's errors."""
    if not level.sync or mine.errors:
        return
    paths = [out_dir / rec[2] for rec in mine.records] + meta_paths
    try:
        fsync_many(paths, _ancestors(paths, out_dir))
    except OSError as e:
        mine.errors.append(f"rank {ctx.world.rank} ({ctx.node_id}) {level.name}: fsync in {out_dir}: {e}")


def persist_level(
    level: LevelSpec,
    ctx: SaveContext,
    writer: ChunkWriter,
    source: Source,
    state: LevelState,
    janitor: Janitor | None = None,
    pre: list[dict | None] | None = None,
) -> LevelResult:
    """Write, link or copy this level, commit it and retire old checkpoints; errors come from every rank.

    Collectives: one gather of records on the level's group, one gather of outcomes on the world group. The first
    is skipped when every rank of the group already sent its records in the job's gather (`pre`: chunks linked
    into the spare skeleton before it). On disk levels every rank syncs its files and their directories in one
    concurrent batch before the first gather (the committer's zarr metadata included: it is written first).
    Retention runs before the second gather, so when it returns every rank knows old copies are gone (staging
    slots free) and which skeleton the next save uses."""
    me = ctx.world.rank
    out_dir, reused = target_dir(level, ctx, state)
    comm = level_comm(level, ctx)
    committer = comm.rank == 0
    group = [r for r in range(ctx.world.size) if not level.node_local or ctx.nodes[r] == ctx.node_id]
    my_pre = pre[me] if pre is not None else None
    files, meta_paths = {}, []
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
            if not reused:
                out_dir.mkdir(parents=True, exist_ok=True)
            if committer:
                files, meta_paths = write_zarr_metadata(
                    out_dir, ctx.step, level.name, ctx.layouts, state.meta, ctx.sig, reused
                )
        except OSError as e:
            mine = RankOutcome(errors=[f"rank {me} ({ctx.node_id}) {level.name}: {out_dir}: {e}"])
        else:
            if source.src_dir is not None:
                mine = writer.copy_level(level, ctx, source.src_dir, out_dir)
            elif source.slot is not None and source.link:
                mine = writer.slot_level(level, ctx, source.slot, out_dir)
            elif source.slot is not None:
                mine = writer.write_from_slot(level, ctx, source.slot, out_dir)
            else:
                mine = writer.write_level(level, ctx, source.bufset, out_dir, assembled)
        sync_written(level, ctx, mine, out_dir, meta_paths)
    if pre is not None and all(pre[r] is not None for r in group):
        gathered = [pre[r] for r in group]
    else:
        gathered = comm.all_gather_json(outcome_dict(mine, out_dir))
    errors = [e for g in gathered for e in g["errors"]]
    if len({g["dir"] for g in gathered}) > 1:
        errors.append(f"{level.name}: ranks wrote into different directories {sorted({g['dir'] for g in gathered})}")
    final = Path(level.root) / step_dir_name(ctx.step)
    retention_error = None
    if committer and not errors:
        records = [r for g in gathered for r in g["records"]]
        try:
            if not files:  # pre-linked: the metadata is written now (memory levels: nothing to sync)
                files, meta_paths = write_zarr_metadata(
                    out_dir, ctx.step, level.name, ctx.layouts, state.meta, ctx.sig, reused
                )
                if level.sync:
                    fsync_many(meta_paths, _ancestors(meta_paths, out_dir))
            final = commit_level(level, ctx, out_dir, records, files, state.meta, janitor)
        except OSError as e:
            errors.append(f"rank {me} ({ctx.node_id}) {level.name}: commit in {out_dir}: {e}")
        else:
            if reused:
                state.spare = state.spare_sig = None
            state.created[final.name] = ctx.sig
            try:
                if state.spare is not None and state.spare_sig != ctx.sig:  # a skeleton of an older layout
                    shutil.rmtree(state.spare, ignore_errors=True)
                    state.spare = state.spare_sig = None
                apply_retention(level, ctx, janitor, state, [r[2] for r in records])
            except OSError as e:
                retention_error = f"{level.name} ({level.root}): {e}"
    if committer and errors:
        shutil.rmtree(out_dir, ignore_errors=True)  # free the space a failed save took; older ones stay intact
        if reused:
            state.spare = state.spare_sig = None
    announce = None
    if committer:
        announce = {"name": state.spare.name, "sig": state.spare_sig} if state.spare is not None else {}
    everyone = ctx.world.all_gather_json(
        {"errors": errors if committer else mine.errors, "nbytes": mine.nbytes, "node": ctx.node_id, "next": announce}
    )
    for g in everyone:
        if g["next"] is not None and (g["node"] == ctx.node_id if level.node_local else True):
            nxt = g["next"]
            state.spare = Path(level.root) / nxt["name"] if nxt else None
            state.spare_sig = nxt.get("sig")
            break
    all_errors = sorted({e for g in everyone for e in g["errors"]})
    return LevelResult(all_errors, final, mine.nbytes, sum(g["nbytes"] for g in everyone), retention_error)
