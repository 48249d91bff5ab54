"""The commit protocol: how one save becomes a committed checkpoint on one level, crash-consistently.

In the style of torch.distributed.checkpoint's StorageWriter (set_up_storage_writer -> prepare_local_plan ->
prepare_global_plan -> write_data -> finish), a level is driven through fixed steps, and what differs between kinds
of storage (a directory tree on disk or in node memory; an object store) sits behind a small `LevelStorage`:

  step                           who (rank / thread)                               storage calls
  1 begin(state, ctx)            every rank of the level's group; no I/O, the      begin
                                 same answer on each (the spare comes from a gather)
  2 prepare(...)                 every rank: create the location; the level's      prepare
                                 committer also writes the zarr metadata
  3 persist.write_chunks         every rank, the chunks it owns (from a           write_chunk / link_chunk
                                 sources.ChunkSource)
  4 make_durable(...)            every rank, after its writes, before the records  make_durable
                                 leave it (errors become the rank's errors)
  5 gather the records           the caller's collective on the level's group, then  -
                                 group_errors(...) on every rank
  6 commit(...)                  the level's committer only (comm rank 0 of the    publish (manifest = the commit
                                 level's group: every node's first rank on a        point, then the final name and
                                 node-local level)                                 `latest`), retain, discard
  7 gather the outcome           the caller's collective on the world group,        -
                                 carrying announcement(state); then adopt(...) on
                                 every rank: the spare the next save of the level uses

Callers: persist.persist_level runs all steps on the persist thread. Promotion (promote.Promoter) runs 1-4 and 6
on the promoter thread and 5 and 7 on the persist thread (its progress rides in the persister's gathers). A
zero-copy save into a memory level's spare skeleton runs step 3 early (manager._prelink, persist thread, before
the job's gather), so its records travel in that gather and step 5 needs no collective of its own.

Invariants every storage keeps: a reader never trusts a step without its manifest (written after every chunk and
metadata file is durable); retention retires a step only after a newer one committed on the level; a failed or
abandoned save's files are removed (`discard` now; other processes' leftovers by the next `retain`) and never touch
an older checkpoint. Filesystem levels commit by renaming the partial directory (`FileStorage`, commit_fs.py); an
object store commits by putting the manifest, then the `latest` pointer, once every chunk is uploaded and verified
(`ObjectStorage`, objstore.py: the chunks go straight to the step's final keys, and make_durable waits for every
upload and checks each object's size in a listing). `objstore.storage_for(level)` picks the storage of a level.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import crc32c

from checkpointing.checksums import CRC_BLOCK_BYTES, ChunkCrcs
from checkpointing.context import SaveContext
from checkpointing.manifest import ChunkRecord, Manifest, ManifestEncoder
from checkpointing.plan import TensorLayout
from checkpointing.tiers import LevelSpec
from checkpointing.zarr_store import array_metadata, group_metadata, group_paths


@dataclass
class Target:
    """Where one save's files go on one level until the commit (same on every rank of the level's group)."""

    location: Path
    """Filesystem: the partial directory (or the reused spare skeleton). Object store: the step's key prefix."""
    reused: bool
    """The location is the level's spare skeleton of this layout (directories and zarr metadata already there)."""
    meta_files: dict[str, ChunkRecord] | None = None
    """Committer, after prepare(): the zarr metadata records for the manifest (None: not written yet)."""
    meta_written: list[str] = field(default_factory=list)
    """Committer: the metadata files prepare() wrote (relative), to make durable with the chunks."""

    @property
    def name(self) -> str:
        """What ranks compare after the records gather: all must have written into the same place."""
        return self.location.name


@dataclass
class CommitResult:
    """The committer's result of step 6."""

    final: Path
    error: str | None = None
    retention_error: str | None = None


class LevelStorage(Protocol):
    """One level's storage as the commit protocol drives it (see the module docstring for the order)."""

    level: LevelSpec
    root: Path

    def begin(self, ctx: SaveContext, state: LevelState) -> Target:
        """Step 1: this save's target; no I/O."""

    def prepare(self, target: Target, docs: list[tuple[str, bytes]]) -> list[str]:
        """Step 2: create the target location and write `docs` (relative name, bytes); returns what it wrote."""

    def write_chunk(
        self, target: Target, rel: str, parts: list[memoryview], crcs: ChunkCrcs | None = None
    ) -> ChunkCrcs:
        """Step 3: write one chunk file from `parts`, checksumming while writing (`crcs`: the caller already
        checksummed exactly these bytes); returns its checksums."""

    def link_chunk(self, target: Target, rel: str, src: str) -> None:
        """Step 3, zero-copy: make the file `src` (already checksummed) the chunk `rel` (filesystem levels)."""

    def make_durable(self, target: Target, rels: list[str]) -> None:
        """Step 4: the listed files (and what names them) survive a crash once this returns; raises OSError."""

    def publish(self, target: Target, step: int, nonce: str, manifest: bytes) -> Path:
        """Step 6, the commit: write the manifest, make the step visible under its final name, point `latest` at
        it; returns the final location."""

    def retain(
        self, layout_digest: str, nonce: str, state: LevelState, chunk_files: list[str] | None, others: bool
    ) -> None:
        """Step 6, after publish: retire committed steps beyond keep_last (never the one just committed), clean up
        abandoned saves of other processes (others=True); may keep a retired step as state.spare."""

    def discard(self, target: Target, state: LevelState) -> None:
        """Step 6 on failure: remove this save's files; older checkpoints are untouched."""

    def final_location(self, step: int) -> Path:
        """Where step `step` is once committed."""

    def retire_after(self, step: int, nonce: str) -> list[Path]:
        """Retire committed steps after `step` (an abandoned trajectory, after a load of an older step)."""

    # The loader's side (the manager lists, reads and verifies through the same storage):

    def check(self) -> None:
        """At start-up: raise CheckpointError if the level cannot be used (an object store: missing bucket,
        refused credentials)."""

    def committed(self) -> list[tuple[int, Path]]:
        """(step, location) of every committed step (one with a manifest), oldest first."""

    def read_manifest(self, location: Path) -> Manifest:
        """The committed manifest at `location`; CheckpointCorruptError if absent or malformed."""

    def read_chunk(self, path: Path, record: ChunkRecord, views: list[memoryview]) -> None:
        """Fill `views` with the chunk at `path` (location / record.file), verified against `record`."""

    def read_span(self, path: Path, start: int, views: list[memoryview]) -> int:
        """Fill `views` with the chunk's bytes from offset `start` on, unverified (reshard.read_blocks checks each
        block); returns the chunk's size. CheckpointCorruptError if it is missing or unreadable."""

    def display(self, location: Path) -> str:
        """`location` as people and logs name it (a path, or s3://bucket/key)."""

    def close(self) -> None:
        """Finish or abandon background work (uploads) when the manager closes."""


@dataclass
class LevelState:
    """What one rank keeps about one level between saves.

    On filesystem levels the committer does not delete the newest retired checkpoint: it renames it to
    `.next-<token>` and removes its chunk files (on memory levels that frees the staging slots linked there), and
    the next save of the same layout links or writes its chunks into that tree and renames it into place: no
    directories to create, no zarr metadata but the root group's to write (and, on disk, to fsync), nothing to
    delete. `spare` is that tree as announced by the level's committer in the last outcome gather (step 7), so every
    rank of the level's group holds the same value."""

    storage: LevelStorage
    meta: MetadataCache = field(default_factory=lambda: MetadataCache())
    token: str = field(default_factory=lambda: secrets.token_hex(4))
    spare: Path | None = None
    spare_layout: str | None = None
    created: dict[str, str] = field(default_factory=dict)  # committer: dir name -> layout digest of its saves
    pinned: set[str] = field(default_factory=set)  # committed dirs a pending promotion still reads


class MetadataCache:
    """What one layout's commits share, computed once: the zarr.json documents (every group but the root, every
    array) as bytes with their crc32c, and the manifest encoder."""

    def __init__(self) -> None:
        self._digest: str | None = None
        self._docs: list[tuple[str, bytes, int]] = []
        self._encoder: ManifestEncoder | None = None

    def _refresh(self, layout_digest: str, layouts: dict[str, TensorLayout]) -> None:
        if layout_digest == self._digest and layout_digest:
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
        self._digest = layout_digest

    def docs(self, layout_digest: str, layouts: dict[str, TensorLayout]) -> list[tuple[str, bytes, int]]:
        self._refresh(layout_digest, layouts)
        return self._docs

    def encoder(self, layout_digest: str, layouts: dict[str, TensorLayout]) -> ManifestEncoder:
        self._refresh(layout_digest, layouts)
        return self._encoder


def _json_bytes(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def zarr_documents(
    step: int, level_name: str, layouts: dict[str, TensorLayout], cache: MetadataCache, layout_digest: str
) -> list[tuple[str, bytes, int]]:
    """zarr.json for the root group (it names the step), every intermediate group and every array, with crc32c."""
    root = _json_bytes(group_metadata({"ecpt_step": step, "ecpt_level": level_name}))
    return [("zarr.json", root, crc32c.crc32c(root)), *cache.docs(layout_digest, layouts)]


# --------------------------------------------------------------------------------------------- the steps


def begin(state: LevelState, ctx: SaveContext) -> Target:
    """Step 1 (every rank of the level's group; no I/O): this save's target on the level."""
    return state.storage.begin(ctx, state)


def prepare(state: LevelState, ctx: SaveContext, target: Target, committer: bool) -> None:
    """Step 2 (every rank; raises OSError): create the location; the committer writes the zarr metadata (only the
    root group's into a reused skeleton, whose other documents are this layout's already)."""
    docs = []
    if committer:
        level = state.storage.level
        all_docs = zarr_documents(ctx.step, level.name, ctx.layouts, state.meta, ctx.layout_digest)
        target.meta_files = {rel: ChunkRecord(rel, len(data), crc) for rel, data, crc in all_docs}
        docs = [(rel, data) for rel, data, _ in (all_docs[:1] if target.reused else all_docs)]
    target.meta_written = state.storage.prepare(target, docs)


def make_durable(state: LevelState, ctx: SaveContext, target: Target, chunk_rels: list[str]) -> str | None:
    """Step 4 (every rank): this rank's chunks and metadata files durable before the commit; returns the error."""
    try:
        state.storage.make_durable(target, chunk_rels + target.meta_written)
    except OSError as e:
        return f"{ctx.who(state.storage.level)}: fsync in {target.location}: {e}"
    return None


def group_errors(level: LevelSpec, gathered: list[dict]) -> list[str]:
    """Step 5, on the gathered {"errors", "dir"} of the level's group: every rank's errors, and a disagreement on
    where the save went (it cannot be committed: chunks would be missing)."""
    errors = [e for g in gathered for e in g["errors"]]
    dirs = sorted({g["dir"] for g in gathered})
    if len(dirs) > 1:
        errors.append(f"{level.name}: ranks wrote into different directories {dirs}")
    return errors


def commit(state: LevelState, ctx: SaveContext, target: Target, records: list[list], failed: bool) -> CommitResult:
    """Step 6, the level's committer only: publish (manifest, final name, latest), then retention. `failed` (a
    rank of the group reported an error): discard the save instead; older checkpoints stay intact."""
    storage, level = state.storage, state.storage.level
    final = storage.final_location(ctx.step)
    if failed:
        _discard(state, target)
        return CommitResult(final)
    try:
        if target.meta_files is None:  # chunks were pre-linked before prepare(): the metadata comes now
            prepare(state, ctx, target, True)
            storage.make_durable(target, target.meta_written)
        final = storage.publish(target, ctx.step, ctx.nonce, encode_manifest(state, ctx, records, target))
    except OSError as e:
        _discard(state, target)
        return CommitResult(final, error=f"{ctx.who(level)}: commit in {target.location}: {e}")
    if target.reused:
        state.spare = state.spare_layout = None
    state.created[final.name] = ctx.layout_digest
    try:
        storage.retain(ctx.layout_digest, ctx.nonce, state, [r[2] for r in records], True)
    except OSError as e:
        return CommitResult(final, retention_error=f"{level.name} ({level.root}): {e}")
    return CommitResult(final)


def encode_manifest(state: LevelState, ctx: SaveContext, records: list[list], target: Target) -> bytes:
    """The manifest of this save on this level (rank 0's extra, and every other rank's where it differs)."""
    level = state.storage.level
    extra = ctx.extras[0]
    return state.meta.encoder(ctx.layout_digest, ctx.layouts).encode(
        step=ctx.step,
        level=level.name,
        node_id=ctx.node_id if level.node_local else "",
        node_local=level.node_local,
        world_size=ctx.world.size,
        chunk_bytes=ctx.chunk_bytes,
        records=records,
        crc_block_bytes=CRC_BLOCK_BYTES,
        extra=extra,
        rank_extra={r: e for r, e in enumerate(ctx.extras) if r and e != extra},
        files=target.meta_files,
    )


def _discard(state: LevelState, target: Target) -> None:
    state.storage.discard(target, state)
    if target.reused:
        state.spare = state.spare_layout = None


def retire_old(state: LevelState, ctx: SaveContext) -> None:
    """Retention outside a commit (a promotion finished reading the source it kept): committed checkpoints only,
    since another rank may already be writing the next save's partial directory. The level's committer only."""
    state.storage.retain(ctx.layout_digest, ctx.nonce, state, None, False)


def announcement(state: LevelState) -> dict:
    """Step 7, committer: the spare the next save of this level uses ({} when none), for the outcome gather."""
    return {"name": state.spare.name, "layout_digest": state.spare_layout} if state.spare is not None else {}


def adopt(state: LevelState, node_id: str, gathered: list[dict]) -> None:
    """Step 7, every rank: take the spare announced by this level's committer (per rank {"next", "node"}; "next"
    is None from a rank that is not a committer)."""
    node_local = state.storage.level.node_local
    for g in gathered:
        if g["next"] is not None and (g["node"] == node_id if node_local else True):
            nxt = g["next"]
            state.spare = state.storage.root / nxt["name"] if nxt else None
            state.spare_layout = nxt.get("layout_digest")
            return
