"""The commit protocol's storage for directory levels (node memory and disk): see commit.py for the call order.

A save goes into `step-XXXXXXXX.partial-<nonce>/` (or the level's `.next-<token>/` spare skeleton of the same
layout), is made durable (fsync of many files at once, then their directories; disk levels only), and commits by
writing manifest.json and renaming the directory to `step-XXXXXXXX/` (then fsync of the level root and `latest`).
Retiring is a rename to a trash name; the files are deleted by the janitor thread on disk levels and at once on
memory levels (a few unlinks, and the memory and staging slots come back before the next save).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from checkpointing import direct_io
from checkpointing.checksums import ChunkCrcs
from checkpointing.commit import LevelState, Target
from checkpointing.context import SaveContext
from checkpointing.manifest import MANIFEST_NAME, ChunkRecord, Manifest, read_manifest
from checkpointing.reshard import FILE_READER, read_chunk_checked
from checkpointing.tiers import (
    Janitor,
    LevelSpec,
    committed_steps,
    partial_dir,
    publish,
    retain,
    retire_after,
    step_dir_name,
)
from checkpointing.zarr_store import fsync_many, write_bytes_atomic, write_file

log = logging.getLogger("checkpointing")


class FileStorage:
    """A level whose root is a directory (see the module docstring). Used by one thread at a time: the persist
    thread, or the promoter thread while a promotion to this level is in flight."""

    def __init__(self, level: LevelSpec, janitor: Janitor | None = None) -> None:
        self.level = level
        self.root = Path(level.root)
        self.janitor = None if level.is_memory else janitor
        self.direct: bool | None = False if level.is_memory else None
        """O_DIRECT chunk writes (direct_io.py); None until the level's first write resolves it."""

    def begin(self, ctx: SaveContext, state: LevelState) -> Target:
        if state.spare is not None and state.spare_layout == ctx.layout_digest:
            return Target(state.spare, True)
        return Target(partial_dir(self.root, ctx.step, ctx.nonce), False)

    def prepare(self, target: Target, docs: list[tuple[str, bytes]]) -> list[str]:
        if not target.reused:
            target.location.mkdir(parents=True, exist_ok=True)
        for rel, data in docs:
            fd = _open_new(target.location / rel)
            try:
                view = memoryview(data)
                while len(view):
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        return [rel for rel, _ in docs]

    def write_chunk(
        self, target: Target, rel: str, parts: list[memoryview], crcs: ChunkCrcs | None = None
    ) -> ChunkCrcs:
        path = target.location / rel
        if self.direct is None:
            self.direct, why = direct_io.resolve(self.root, self.level.direct_io, self.level.name)
            log.info(
                "checkpoint level %s (%s): O_DIRECT chunk writes %s: %s",
                self.level.name,
                self.root,
                "on" if self.direct else "off",
                why,
            )
        try:
            return write_file(path, parts, fsync=False, crcs=crcs, direct=self.direct)
        except FileNotFoundError:
            os.makedirs(path.parent, exist_ok=True)
            return write_file(path, parts, fsync=False, crcs=crcs, direct=self.direct)

    def link_chunk(self, target: Target, rel: str, src: str) -> None:
        dst = f"{target.location}/{rel}"
        try:
            os.link(src, dst)
        except FileNotFoundError:
            if not os.path.exists(src):
                raise
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.link(src, dst)

    def unlink_chunks(self, location: Path, rels: list[str]) -> None:
        """Undo chunk files linked into a skeleton for a save that was dropped (the skeleton stays reusable)."""
        for rel in rels:
            try:
                os.unlink(f"{location}/{rel}")
            except FileNotFoundError:
                pass

    def make_durable(self, target: Target, rels: list[str]) -> None:
        """fsync the files, many at a time, then their directories up to the target (disk levels only)."""
        if not self.level.sync or not rels:
            return
        paths = [target.location / rel for rel in rels]
        fsync_many(paths, _ancestors(paths, target.location))

    def publish(self, target: Target, step: int, nonce: str, manifest: bytes) -> Path:
        write_bytes_atomic(target.location / MANIFEST_NAME, manifest, self.level.sync)
        return publish(self.root, target.location, step, nonce, self.level.sync, self.janitor)

    def retain(
        self, layout_digest: str, nonce: str, state: LevelState, chunk_files: list[str] | None, others: bool
    ) -> None:
        """Keep the newest keep_last; keep the newest retired one of this layout (`layout_digest`) as the next save's
        skeleton when `chunk_files` (the chunk files a checkpoint of this layout has) is given."""
        if others and state.spare is not None and state.spare_layout != layout_digest:  # a skeleton of an older layout
            shutil.rmtree(state.spare, ignore_errors=True)
            state.spare = state.spare_layout = None
        reuse = None
        if chunk_files is not None:

            def reuse(path: Path) -> Path | None:
                if state.created.get(path.name) != layout_digest or state.spare is not None:
                    return None
                spare = self.root / f".next-{state.token}"
                os.replace(path, spare)
                try:
                    self.unlink_chunks(spare, [*chunk_files, MANIFEST_NAME])
                except OSError:
                    shutil.rmtree(spare, ignore_errors=True)
                    return None
                state.spare, state.spare_layout = spare, layout_digest
                return spare

        retain(
            self.root,
            self.level.keep_last,
            nonce,
            self.janitor,
            reuse,
            keep=None if state.spare is None else state.spare.name,
            pinned=state.pinned,
            others=others,
        )
        state.created = {n: s for n, s in state.created.items() if (self.root / n).is_dir()}

    def discard(self, target: Target, state: LevelState) -> None:
        shutil.rmtree(target.location, ignore_errors=True)

    def final_location(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def retire_after(self, step: int, nonce: str) -> list[Path]:
        return retire_after(self.root, step, nonce, self.janitor)

    # reading (the loader's side of the storage)

    def check(self) -> None:
        """Start-up check: nothing to do (the first save creates the directories and reports what fails)."""

    def committed(self) -> list[tuple[int, Path]]:
        return committed_steps(self.root)

    def read_manifest(self, location: Path) -> Manifest:
        return read_manifest(location)

    def read_chunk(self, path: Path, record: ChunkRecord, views: list[memoryview]) -> None:
        read_chunk_checked(path, record, views)

    def read_span(self, path: Path, start: int, views: list[memoryview]) -> int:
        return FILE_READER.read_span(path, start, views)

    def display(self, location: Path) -> str:
        return str(location)

    def close(self) -> None:
        """Nothing held (the janitor belongs to the manager)."""


def _open_new(path: Path) -> int:
    """Create/truncate `path` for writing, creating its directories only when they are missing."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        os.makedirs(path.parent, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


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
