"""The jobs the persist thread works through, and the key that orders them the same way on every rank."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

from checkpointing.plan import TensorLayout
from checkpointing.results import SaveHandle
from checkpointing.staging import BufferSet, Slot, StagedTensor, StagePlan
from checkpointing.tiers import LevelSpec


class JobKey(NamedTuple):
    """Where a job stands in the sequence every rank's persist thread walks through, in the same order.

    Saves come as (0, step) and control calls (wait_durable's flush, emergency_save, close) as (1, n), n counting
    this manager's control calls; tuples compare element-wise, so a control call ranks after any save, and a rank
    whose key is larger than another's is ahead of it: it skipped the other's job (a busy rank skips a save, so
    its next key is the later step) or the other is behind on control calls. The coordinator works on the largest
    key any rank holds; a rank holding a smaller one drops its job. Sent through JSON as a two-element list."""

    control: int
    """0: a save; 1: a control call."""
    number: int
    """The save's step, or the control call's sequence number."""

    @staticmethod
    def save(step: int) -> JobKey:
        return JobKey(0, step)

    @staticmethod
    def of(wire: list) -> JobKey:
        return JobKey(int(wire[0]), int(wire[1]))


@dataclass(frozen=True)
class Described:
    """The validated description of one save's tensors (cached: the trainer saves the same tensors every step)."""

    staged: list[StagedTensor]
    describes: dict
    """Tensor name -> [global shape, dtype, layout, start, stop] (StagedTensor.describe) of this rank."""
    tensors_digest: str
    """A digest of `describes`: equal digests mean the same tensors, so the descriptions need not travel again."""
    all_cpu: bool


@dataclass
class WriteJob:
    """One save, from save() through staging to its commit on every level."""

    step: int
    levels: list[LevelSpec]
    handle: SaveHandle
    bufset: BufferSet
    staged: list[StagedTensor]
    extra: dict
    t_save: float
    """perf_counter() when save() was called."""
    described: Described | None = None
    slot: Slot | None = None
    stage_plan: StagePlan | None = None
    slot_layout: str | None = None
    """The layout digest (AgreedLayout.digest) the slot was staged for; None: staged into host buffers."""
    pre: dict | None = None
    """Chunks already linked into the level's spare skeleton (see Coordinator._prelink)."""

    @property
    def key(self) -> JobKey:
        return JobKey.save(self.step)


@dataclass
class ControlJob:
    """wait_durable's flush, emergency_save or close, run by the persist thread in order with the saves."""

    kind: str  # "flush" | "emergency" | "stop"
    seq: int
    done: Future = field(default_factory=Future)

    @property
    def key(self) -> JobKey:
        return JobKey(1, self.seq)


@dataclass(frozen=True)
class AgreedLayout:
    """The layout of the last save every rank agreed on: what zero-copy staging plans against."""

    digest: str
    """The layout digest: of every rank's tensors digest, every rank's node and chunk_bytes (SaveContext.layout_digest)."""
    layouts: dict[str, TensorLayout]
    nodes: list[str]
    tensors_digests: list[str]
    """Every rank's Described.tensors_digest."""
