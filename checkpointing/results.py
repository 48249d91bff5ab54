"""What CheckpointManager hands back: a save in flight, a committed copy, a restore, what staging holds."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass
class SaveHandle:
    """One save in flight. `staged` resolves when the caller may mutate its tensors again, `durable` with the list
    of level names committed (an empty list if the save was dropped), or a CheckpointError."""

    step: int
    levels: list[str]
    staged: Future = field(default_factory=Future)
    durable: Future = field(default_factory=Future)


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint copy as seen from this rank."""

    step: int
    level: str
    path: str
    nbytes: int = 0
    complete: bool = True
    node_id: str = ""
    created_unix: float = 0.0


@dataclass
class LoadResult:
    """What load() restored. `extra` is rank 0's extra at save time; `rank_extra` the extra saved by this rank
    number (None if the saving world had no such rank); `fallbacks` the newer checkpoints skipped and why."""

    step: int
    extra: dict
    level: str
    path: str
    seconds: float
    bytes_read: int
    fallbacks: list[str]
    rank_extra: dict | None = None
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LevelStaging:
    """The zero-copy staging slots of one level on this rank (see Slot)."""

    slots: int
    """Slots created so far; bounded by keep_last + saves in flight + 1, reused once their checkpoints retire."""
    in_files: bool
    """True: the slots are files on the level's file system, hard-linked into each checkpoint (a memory level).
    False: host-memory slots the persister writes out (a disk level)."""
    chunk_files: int
    """Chunk files the slots hold open and rewrite in place every save (0 for host-memory slots)."""
    ready: int = 0
    """Free slots already prepared for a plan, pages faulted in: the next save of that layout stages into one
    without faulting memory in. 0 right after a save while the persist thread still prepares the next one."""


@dataclass(frozen=True)
class StagingStats:
    """What staging holds on this rank (CheckpointManager.staging_stats()): steady-state saves must neither add
    slots nor allocate host buffers, so these figures stay flat over a long run; watch or export them as gauges.
    A snapshot: taken while a save is staging it may show that save half done."""

    levels: dict[str, LevelStaging]
    """Per level that staged at least one save zero-copy or was prepared (CheckpointManager.prepare); without
    prepare, the first save of a layout stages into host buffers."""
    host_buffer_sets: int
    """Host buffer sets (``staging_buffers``): how many saves can be in flight before save() waits or skips."""
    host_buffers: int
    """Tensors held in host buffers now; 0 while saves stage zero-copy."""
    host_buffer_bytes: int
    host_buffer_allocations: int
    """Host buffers allocated since the manager started: grows only when names, sizes or dtypes change."""
