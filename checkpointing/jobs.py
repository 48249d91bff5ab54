"""The jobs the persist thread works through, the key that orders them the same way on every rank, and the
validated description of a save's tensors they carry."""

from __future__ import annotations

from concurrent.futures import Future
import bisect
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from checkpointing.errors import CheckpointError
from checkpointing.plan import TensorLayout
from checkpointing.results import SaveHandle
from checkpointing.slots import Slot, StagePlan
from checkpointing.staging import BufferSet, Shard, StagedTensor, describe
from checkpointing.tiers import LevelSpec
from checkpointing.zarr_store import check_tensor_name, dtype_name


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
    """wait_durable's flush, emergency_save, prepare or close, run by the persist thread in order with the saves."""

    kind: str  # "flush" | "emergency" | "prepare" | "stop"
    seq: int
    done: Future = field(default_factory=Future)
    described: Described | None = None
    """prepare: the tensors whose layout every rank agrees on now, before their first save."""
    level: LevelSpec | None = None
    """prepare: the level whose staging slot is prepared (the first level of the saves to come)."""

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


class Describer:
    """Validates and describes the tensors of a save (the caller's thread), caching the last result."""

    def __init__(self) -> None:
        self._described_key: tuple | None = None
        self._described: Described | None = None

    def describe(self, tensors: dict) -> Described:
        """Validate and describe the tensors; reuse the last result when names, shapes, dtypes and devices match."""
        try:
            key = tuple(
                (name, v.global_shape, v.flat_range, v.local.shape, v.local.dtype, v.local.device.type)
                if isinstance(v, Shard)
                else (name, v.shape, v.dtype, v.device.type)
                for name, v in tensors.items()
            )
        except AttributeError:
            key = None
        if key is not None and key == self._described_key:
            return self._described
        staged = _validate(tensors)
        describes = {t.name: t.describe() for t in staged}
        digest = hashlib.blake2b(json.dumps(describes, sort_keys=True).encode(), digest_size=12).hexdigest()
        all_cpu = all((v.local if isinstance(v, Shard) else v).device.type == "cpu" for v in tensors.values())
        self._described_key, self._described = key, Described(staged, describes, digest, all_cpu)
        return self._described


def _validate(tensors: dict) -> list[StagedTensor]:
    out = []
    for name, value in tensors.items():
        check_tensor_name(name)
        local = value.local if isinstance(value, Shard) else value
        if not isinstance(local, torch.Tensor):
            raise CheckpointError(f"tensor {name}: expected torch.Tensor or Shard, got {type(value).__name__}")
        st = describe(name, value, dtype_name(local.dtype))
        if isinstance(value, Shard):
            numel = math.prod(st.shape)
            if not (0 <= st.start <= st.stop <= numel) or local.numel() != st.stop - st.start:
                raise CheckpointError(
                    f"Shard {name}: flat_range {value.flat_range} must satisfy 0 <= start <= stop <= {numel} "
                    f"(numel of global_shape {list(st.shape)}) and local.numel()={local.numel()} == stop - start"
                )
        out.append(st)
    names = sorted(tensors)
    for a in names:
        prefix = a + "/"
        i = bisect.bisect_left(names, prefix)  # names under a/ sort right after it
        if i < len(names) and names[i].startswith(prefix):
            raise CheckpointError(f"tensor names {a!r} and {names[i]!r} collide: {a!r} would be both array and group")
    return out
