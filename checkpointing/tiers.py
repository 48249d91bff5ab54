"""Levels (tiers) of storage and what happens to directories on them: naming, commit rename, listing, retention.

A level is a root directory plus a policy. L0 is usually node memory (/dev/shm: survives a worker restart, not a
node loss), L1 node-local disk, L2 shared storage. Directory states on a level root:
  step-XXXXXXXX.partial-<nonce>/   being written (or abandoned by a crash: ignored and removed later)
  step-XXXXXXXX/                   committed: has manifest.json; the only kind readers look at
  .trash-<nonce>-<name>/           retired or replaced: invisible to readers, deleted in the background
  .next-<token>/                   memory levels: a retired checkpoint's directory tree, chunk files removed,
                                   that the next save of the same layout fills and renames (no mkdir, no metadata)
  .staging/                        memory levels: per-process zero-copy staging files (slots.SlotPool)
  latest                           JSON {"step", "dir"} of the newest committed checkpoint (for people and tools)
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from checkpointing.manifest import MANIFEST_NAME
from checkpointing.zarr_store import fsync_dir, is_memory_fs, write_json_atomic

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
    """fsync chunk files and directories on disk levels. Never done on memory levels (see `memory`): there it
    would only cost syscalls and protect nothing."""
    memory: bool | None = None
    """Whether the root is node memory. None: detected (tmpfs/ramfs, e.g. /dev/shm). A memory level skips fsync,
    logs its commits at DEBUG, and (node-local, CPU tensors) is staged zero-copy: the staging copy of a save is
    written straight into the files that become the checkpoint."""
    direct_io: bool | None = None
    """Disk levels: write chunk files with O_DIRECT, bypassing the page cache (checkpointing/direct_io.py: far less
    CPU taken from training). None: used where the file system accepts it (detected at the level's first write);
    True: required, a save fails naming the root if the file system refuses it; False: never."""
    endpoint: str = ""
    """Object levels (root `s3://bucket/prefix`): the S3-compatible endpoint; empty: AWS_ENDPOINT_URL or AWS S3.
    Credentials and region come from the usual AWS variables and files (see checkpointing/objstore.py)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"LevelSpec.name must be a non-empty word without '/', got {self.name!r}")
        if self.interval < 1:
            raise ValueError(f"LevelSpec {self.name}: interval must be >= 1 (steps between saves), got {self.interval}")
        if self.keep_last < 1:
            raise ValueError(f"LevelSpec {self.name}: keep_last must be >= 1, got {self.keep_last}")

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    @property
    def is_object(self) -> bool:
        """The root is an object-store URL (s3://bucket/prefix): no directories, no rename, no fsync."""
        return self.root.startswith("s3://")

    @property
    def is_memory(self) -> bool:
        if self.is_object:
            return False
        return is_memory_fs(self.root) if self.memory is None else self.memory

    @property
    def sync(self) -> bool:
        """fsync on this level: requested and meaningful."""
        return self.fsync and not self.is_memory and not self.is_object


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


def newest_committed(roots: list[Path]) -> Path | None:
    """The directory of the newest committed checkpoint over several level roots (the first root wins a tie)."""
    newest: tuple[int, Path] | None = None
    for root in roots:
        for step, path in committed_steps(root):
            if newest is None or step > newest[0]:
                newest = (step, path)
    return newest[1] if newest else None


def trash_path(root: Path, nonce: str, name: str) -> Path:
    """A fresh trash name for ``name``. The same step can be retired twice under one nonce (saved again after a
    restart, or after a resize, while the janitor has not yet deleted the first copy), and renaming a directory
    onto a non-empty one fails with ENOTEMPTY, so taken names get a counter."""
    trash = root / f".trash-{nonce}-{name}"
    n = 1
    while os.path.lexists(trash):
        trash, n = root / f".trash-{nonce}-{n}-{name}", n + 1
    return trash


def publish(root: Path, partial: Path, step: int, nonce: str, fsync: bool, janitor: "Janitor | None" = None) -> Path:
    """Rename a fully written partial directory (manifest already committed in it) to its final name.

    If the step already exists (a step saved again after a restart from an older checkpoint) the old copy is moved to
    trash first; readers then briefly see neither, never a mix."""
    final = root / step_dir_name(step)
    if final.exists():
        _retire(final, nonce, janitor)
    os.replace(partial, final)
    if fsync:
        fsync_dir(root)
    # `latest` is a pointer for people and tools (readers scan for committed directories): atomic, not synced
    write_json_atomic(root / "latest", {"step": step, "dir": final.name}, fsync=False)
    return final


def retain(
    root: Path,
    keep_last: int,
    current_nonce: str,
    janitor: "Janitor | None" = None,
    reuse: "Callable[[Path], Path | None] | None" = None,
    keep: str | None = None,
    pinned: set[str] = frozenset(),
    others: bool = True,
) -> list[Path]:
    """Retire committed checkpoints beyond the newest `keep_last`, abandoned partial dirs, spare skeletons of other
    processes (`.next-*` except `keep`) and trash.

    Called right after a commit on this level, so a newer checkpoint is always committed before an older one goes.
    Retiring is a rename to a trash name (readers stop seeing it at once); the files are deleted by the janitor
    thread when one is given, else here. `reuse(path)` is offered the retired checkpoints newest first; the one it
    accepts (it renamed it away to reuse its directories and returns the new path) is not deleted. Partial
    directories of the save in progress (same nonce) are kept, and so are `pinned` checkpoints (being promoted:
    retired by a later call). others=False: only retire committed checkpoints (a call made while another rank may
    already be writing the next save's partial directory)."""
    removed = []
    committed = committed_steps(root)
    for _, path in reversed(committed[: max(0, len(committed) - keep_last)]):
        if path.name in pinned:
            continue
        kept = reuse(path) if reuse is not None else None
        if kept is not None:
            reuse, keep = None, kept.name
        else:
            _retire(path, current_nonce, janitor)
        removed.append(path)
    if not others:
        return removed
    for entry in os.scandir(root):
        m = _PARTIAL_RE.match(entry.name)
        if (m and m.group(2) != current_nonce) or (entry.name.startswith(".next-") and entry.name != keep):
            _retire(Path(entry.path), current_nonce, janitor)
            removed.append(Path(entry.path))
        elif entry.name.startswith(".trash-") and (janitor is None or not janitor.owns(entry.path)):
            _delete(Path(entry.path), janitor)
            removed.append(Path(entry.path))
    return removed


def retire_after(root: Path, step: int, nonce: str, janitor: "Janitor | None" = None) -> list[Path]:
    """Retire the committed checkpoints of steps after ``step`` under ``root`` (trash rename, then delete)."""
    retired = []
    for s, path in committed_steps(root) if root.is_dir() else []:
        if s > step:
            _retire(path, nonce, janitor)
            retired.append(path)
    return retired


def _retire(path: Path, nonce: str, janitor: "Janitor | None") -> None:
    """Rename ``path`` to a trash name (readers stop seeing it at once), then delete it (janitor or here)."""
    trash = trash_path(path.parent, nonce, path.name.lstrip("."))
    os.replace(path, trash)
    _delete(trash, janitor)


def _delete(path: Path, janitor: "Janitor | None") -> None:
    if janitor is None:
        shutil.rmtree(path, ignore_errors=True)
    else:
        janitor.delete(path)


class Janitor:
    """One background thread deleting retired checkpoint directories, off the persist thread's critical path.

    Deleting a checkpoint is not part of making a new one durable; on a disk level it is thousands of unlinks."""

    def __init__(self, log: logging.Logger) -> None:
        self._q: queue.Queue = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._log = log
        self._thread = threading.Thread(target=self._loop, name="ckpt-janitor", daemon=True)
        self._thread.start()

    def owns(self, path: str) -> bool:
        with self._lock:
            return str(path) in self._pending

    def delete(self, path: Path) -> None:
        with self._lock:
            if str(path) in self._pending:
                return
            self._pending.add(str(path))
        self._q.put(path)

    def drain(self) -> None:
        """Block until everything queued so far is deleted."""
        self._q.join()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (path := self._q.get()) is not None:
            try:
                shutil.rmtree(path, ignore_errors=True)
            except OSError as e:  # the janitor must outlive a failed delete: the next retention retries
                self._log.warning("checkpoint janitor could not delete %s: %s", path, e)
            finally:
                with self._lock:
                    self._pending.discard(str(path))
                self._q.task_done()
        self._q.task_done()
