"""Persisting one checkpoint on one level: write (or link, or copy) owned chunks, gather checksums, commit.

persist_level runs in the manager's persist thread; each call is made on every rank in the same order, so the
collectives inside line up. It drives commit.py's protocol; the chunks come from a ChunkSource (sources.py) and are
written by write_chunks, the one write loop (also used by promotion and by zero-copy pre-linking). Write errors
(OSError: disk full, permission, I/O) are caught per rank and reported as data through the gathers, so a failing
rank never leaves the others waiting in a collective.

Per level and save there are two collectives (records to the level's committer, outcome to everyone), each a single
all_gather in the common case. The per-save fixed cost is kept small: plans, zarr metadata and directory lists are
computed once per layout; fsync runs only on disk levels, several files at a time; retiring old checkpoints is a
rename (deletion happens on the janitor thread, except on memory levels where it is a few unlinks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from checkpointing import commit
from checkpointing.checksums import CRC_BLOCK_BYTES
from checkpointing.commit import LevelState, LevelStorage, Target
from checkpointing.context import SaveContext, level_comm
from checkpointing.errors import CheckpointError
from checkpointing.manifest import ChunkRecord, Manifest, TensorEntry
from checkpointing.sources import Chunk, ChunkSource, SourceError
from checkpointing.tiers import LevelSpec

ChunkHook = Callable[[int, int], None]
"""Called by the persist thread after each chunk file of a save is written: (step, chunks written so far). For
fault tests (pause or damage a save mid-write); CheckpointManager(after_chunk=...)."""


@dataclass
class RankOutcome:
    """One rank's result on one level: chunk records, errors (each naming rank and file), bytes written."""

    records: list[list] = field(default_factory=list)  # [name, chunk, file, nbytes, crc32c, block crcs (hex)]
    errors: list[str] = field(default_factory=list)
    nbytes: int = 0


def write_chunks(
    storage: LevelStorage,
    target: Target,
    chunks: Iterable[Chunk],
    who: str,
    after_chunk: Callable[[int], None] | None = None,
) -> RankOutcome:
    """The write loop (commit.py step 3): link or write each chunk into the target, checksummed (whole and per
    block, checksums.py) while writing unless its source already knows the checksums. Stops at the first error,
    which names this rank (`who`: "rank 3 (node-b) L1") and the file."""
    outcome = RankOutcome()
    try:
        for n, c in enumerate(chunks, 1):
            try:
                payload, crcs = c.load()
                if isinstance(payload, str):
                    storage.link_chunk(target, c.rel, payload)
                else:
                    crcs = storage.write_chunk(target, c.rel, payload, crcs)
            except (OSError, CheckpointError) as e:
                outcome.errors.append(f"{who}: {target.location}/{c.rel}: {e}")
                break
            outcome.records.append([c.name, c.chunk, c.rel, c.nbytes, crcs.crc32c, crcs.blocks])
            outcome.nbytes += c.nbytes
            if after_chunk is not None:
                after_chunk(n)
    except SourceError as e:
        outcome.errors.append(f"{who}: {e}")
    return outcome


def build_manifest(level: LevelSpec, ctx: SaveContext, records: list[list]) -> Manifest:
    """The manifest as an object (the commit path encodes it directly: MetadataCache.encoder)."""
    tensors = {
        name: TensorEntry(list(t.shape), t.dtype, t.layout, t.grid.chunk_rows, t.grid.n_chunks)
        for name, t in ctx.layouts.items()
    }
    for name, chunk, rel, nbytes, crc, blocks in records:
        tensors[name].chunks[int(chunk)] = ChunkRecord(
            rel, int(nbytes), int(crc), blocks, CRC_BLOCK_BYTES if blocks else 0
        )
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
        crc_block_bytes=CRC_BLOCK_BYTES,
    )


@dataclass
class LevelResult:
    """A level's outcome as every rank sees it after the final gather."""

    errors: list[str]
    path: Path
    my_nbytes: int
    total_nbytes: int
    retention_error: str | None = None


def outcome_dict(o: RankOutcome, out_dir: Path) -> dict:
    return {"records": o.records, "errors": o.errors, "nbytes": o.nbytes, "dir": out_dir.name}


def persist_level(
    level: LevelSpec,
    ctx: SaveContext,
    source: ChunkSource,
    state: LevelState,
    pre: list[dict | None] | None = None,
    after_chunk: ChunkHook | None = None,
) -> LevelResult:
    """Write, link or copy this level, commit it and retire old checkpoints (commit.py's steps 1-7, in order, on
    this thread); errors come from every rank.

    Collectives: one gather of records on the level's group, one gather of outcomes on the world group. The first
    is skipped when every rank of the group already sent its records in the job's gather (`pre`: chunks linked
    into the spare skeleton before it). On disk levels every rank syncs its files and their directories in one
    concurrent batch before the first gather (the committer's zarr metadata included: it is written first).
    Retention runs before the second gather, so when it returns every rank knows old copies are gone (staging
    slots free) and which skeleton the next save uses. after_chunk(step, chunks written): see ChunkHook."""
    me = ctx.world.rank
    target = commit.begin(state, ctx)
    out_dir = target.location
    comm = level_comm(level, ctx)
    committer = comm.rank == 0
    group = [r for r in range(ctx.world.size) if not level.node_local or ctx.nodes[r] == ctx.node_id]
    my_pre = pre[me] if pre is not None else None
    # boundary pieces first, on every rank whatever happens next: point-to-point partners wait for each other
    exchange_error = None
    if my_pre is None:
        try:
            source.exchange(level, ctx)
        except SourceError as e:
            exchange_error = f"{ctx.who(level)}: {e}"
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
            hook = None if after_chunk is None else (lambda n: after_chunk(ctx.step, n))
            mine = write_chunks(state.storage, target, source.chunks(level, ctx), ctx.who(level), hook)
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
