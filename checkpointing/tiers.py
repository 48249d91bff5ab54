"""Levels (tiers) of storage and what happens to directories on them: naming, commit rename, listing, retention.

A level is a root directory plus a policy. L0 is usually node memory (/dev/shm: survives a worker restart, not a
node loss), L1 node-local disk, L2 shared storage. Directory states on a level root:
  step-XXXXXXXX.partial-<nonce>/   being written (or abandoned by a crash: ignored and removed later)
  step-XXXXXXXX/                   committed: has manifest.json; the only kind readers look at
  .trash-<nonce>/                  being deleted
  latest                           JSON {"step", "dir"} of the newest committed checkpoint (for people and tools)
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from checkpointing.manifest import MANIFEST_NAME
from checkpointing.zarr_store import fsync_dir, write_json_atomic

_STEP_RE = re.compile(r"^step-(\d{8,})$")
_PARTIAL_RE = re.compile(r"^step-(\d{8,})\.partial-([0-9a-f]+)$")


@dataclass(frozen=True)
class LevelSpec:
    """One storage level: where, how often, how many to keep, and whether each node holds its own copy."""

    name: str
    root: str
    interval: int
    keep_last: int
    node_local: bool
    fsync: bool = True
    """fsync chunk files and directories. On tmpfs (/dev/shm) it is nearly free, so it stays on by default."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"LevelSpec.name must be a non-empty word without '/', got {self.name!r}")
        if self.interval < 1:
            raise ValueError(f"LevelSpec {self.name}: interval must be >= 1 (steps between saves), got {self.interval}")
        if self.keep_last < 1:
            raise ValueError(f"LevelSpec {self.name}: keep_last must be >= 1, got {self.keep_last}")

    def due(self, step: int) -> bool:
        return step % self.interval == 0


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def partial_dir(root: Path, step: int, nonce: str) -> Path:
    return root / f"{step_dir_name(step)}.partial-{nonce}"


def committed_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every committed checkpoint under root, oldest first. Directories without manifest are ignored."""
    if not root.is_dir():
        return []
    found = []
    for entry in os.scandir(root):
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir() and os.path.exists(os.path.join(entry.path, MANIFEST_NAME)):
            found.append((int(m.group(1)), Path(entry.path)))
    return sorted(found)


def publish(root: Path, partial: Path, step: int, nonce: str, fsync: bool) -> Path:
    """Rename a fully written partial directory (manifest already committed in it) to its final name.

    If the step already exists (a step saved again after a restart from an older checkpoint) the old copy is moved to
    trash first; readers then briefly see neither, never a mix."""
    final = root / step_dir_name(step)
    if final.exists():
        trash = root / f".trash-{nonce}-{step_dir_name(step)}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(partial, final)
    if fsync:
        fsync_dir(root)
    write_json_atomic(root / "latest", {"step": step, "dir": final.name}, fsync)
    return final


def retain(root: Path, keep_last: int, current_nonce: str) -> list[Path]:
    """Delete committed checkpoints beyond the newest `keep_last`, abandoned partial dirs and trash.

    Called right after a commit on this level, so a newer checkpoint is always committed before an older one goes.
    Partial directories of the save in progress (same nonce) are kept."""
    removed = []
    committed = committed_steps(root)
    for _, path in committed[: max(0, len(committed) - keep_last)]:
        trash = root / f".trash-{current_nonce}-{path.name}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    for entry in os.scandir(root):
        m = _PARTIAL_RE.match(entry.name)
        if (m and m.group(2) != current_nonce) or entry.name.startswith(".trash-"):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed
