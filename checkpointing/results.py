"""What CheckpointManager hands back: a save in flight, a committed copy, a restore."""

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
