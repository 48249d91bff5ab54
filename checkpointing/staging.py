"""Lazy snapshot: copy the caller's tensors into preallocated host buffers that are reused across saves.

Allocating a fresh host copy per save costs first-touch page faults (measured here ~5x slower than memcpy) and makes
memory grow when saves overlap (the DCP async_save complaint, pytorch #170163). A `BufferPool` holds a fixed number
of `BufferSet`s (2 by default: stage step s+1 while step s persists); each keeps one flat buffer per tensor name
that is reused as long as the name keeps its size and dtype. Memory is therefore bounded by
n_sets x (bytes this rank saves) and does not grow across saves.

Zero-copy staging into a memory level's files (and its host-memory variant for disk levels) is in slots.py.

Staging only copies (one torch copy per tensor or chunk, GIL released): it is what the caller waits for in
wait_staged(), so it should finish within a training step. Checksums are computed by the persist thread from the
staged bytes, right before it links them or while it writes them: the manifest's crc32c covers exactly the bytes
that became the checkpoint, and load() verifies them. Damage to a staged buffer between the copy and that read
is not detected (the checksum is taken after it); any damage from that read on is.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from checkpointing.direct_io import aligned_empty

if TYPE_CHECKING:
    from checkpointing.slots import Slot


@dataclass(frozen=True)
class Shard:
    """This rank's part of a partitioned tensor (ZeRO): elements [start, stop) of the row-major flattened global
    tensor. `local` holds exactly stop - start elements (any shape); the range may be empty and may cross rows."""

    local: torch.Tensor
    global_shape: tuple[int, ...]
    flat_range: tuple[int, int]


@dataclass(frozen=True)
class StagedTensor:
    """What a rank contributes for one name: the global tensor's description and its flat element range."""

    name: str
    layout: str  # "replica" | "shard"
    shape: tuple[int, ...]
    dtype: str
    start: int
    stop: int

    def describe(self) -> list:
        return [list(self.shape), self.dtype, self.layout, self.start, self.stop]


@dataclass
class BufferSet:
    """One reusable set of host buffers and the step whose values it currently holds."""

    index: int
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int | None = None
    slot: Slot | None = None
    """The memory-level slot that staged `step` zero-copy (then `buffers` is empty), or None."""
    allocations: int = 0
    """Buffers allocated into this set so far: it stops growing once the names, sizes and dtypes settle."""

    def flat(self, name: str) -> torch.Tensor:
        return self.buffers[name]

    def ensure(self, name: str, numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """The buffer for `name`, allocated only the first time (or when its size/dtype changed)."""
        buf = self.buffers.get(name)
        if buf is None or buf.numel() != numel or buf.dtype != dtype:
            if pin:  # page-locked memory is page-aligned already
                buf = torch.empty(numel, dtype=dtype, pin_memory=True)
            else:  # aligned, so a disk level writes its chunks with O_DIRECT (direct_io.py)
                itemsize = torch.empty(0, dtype=dtype).element_size()
                buf = torch.from_numpy(aligned_empty(numel * itemsize)).view(dtype)
            self.buffers[name] = buf
            self.allocations += 1
        return buf

    def drop_buffers(self) -> None:
        """Free every buffer (the save staging now goes into a slot); the set no longer holds a staged step."""
        self.buffers.clear()
        self.step = self.slot = None

    def drop_unused(self, names: set[str]) -> None:
        for stale in set(self.buffers) - names:
            del self.buffers[stale]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


def local_view(value: "torch.Tensor | Shard") -> torch.Tensor:
    return value.local if isinstance(value, Shard) else value


def stage_into(bufset: BufferSet, tensors: dict[str, "torch.Tensor | Shard"], step: int, pin: bool) -> int:
    """Copy every tensor (or Shard.local) into the set's buffers; return bytes copied.

    CUDA sources are copied non_blocking into pinned buffers and we wait on an event recorded after the last copy,
    so the staged values are complete when this returns and the caller may then mutate its tensors."""
    copied = 0
    events = []
    for name, value in tensors.items():
        src = local_view(value)
        buf = bufset.ensure(name, src.numel(), src.dtype, pin)
        if src.numel():
            buf.view(src.shape).copy_(src.detach(), non_blocking=src.is_cuda)
        copied += src.numel() * src.element_size()
        if src.is_cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(src.device))
            events.append(ev)
    for ev in events:
        ev.synchronize()
    bufset.drop_unused(set(tensors))
    bufset.step = step
    return copied


class BufferPool:
    """A fixed number of BufferSets handed out to saves and returned once their data is on the first level."""

    def __init__(self, n_sets: int) -> None:
        if n_sets < 1:
            raise ValueError(f"staging_buffers must be >= 1, got {n_sets}")
        self.sets = [BufferSet(i) for i in range(n_sets)]
        self._free = list(self.sets)
        self._cond = threading.Condition()

    @property
    def size(self) -> int:
        return len(self.sets)

    def acquire(self, block: bool, timeout: float | None = None) -> BufferSet | None:
        """A free set, or None if none is free and block is False / timeout hit.

        Last in, first out: when saves do not overlap the same (already touched) set is reused every time and the
        second set is only allocated when a save really has to stage while the previous one persists."""
        with self._cond:
            if not block and not self._free:
                return None
            if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                return None
            return self._free.pop()

    def in_use(self) -> int:
        """Sets held by saves that are not yet on their first level."""
        with self._cond:
            return len(self.sets) - len(self._free)

    def drop_free_buffers(self) -> None:
        """Free the buffers of every set no save holds: once saves stage zero-copy into slots they are not used
        again (a set then only counts a save in flight), and holding them would keep a second copy of the state."""
        with self._cond:
            for bufset in self._free:
                if bufset.buffers:
                    bufset.drop_buffers()

    def release(self, bufset: BufferSet) -> None:
        with self._cond:
            if bufset not in self._free:
                self._free.append(bufset)
            self._cond.notify_all()

    def acquire_specific(self, bufset: BufferSet) -> BufferSet:
        """Wait until this particular set is free and take it (emergency save of its contents)."""
        with self._cond:
            self._cond.wait_for(lambda: bufset in self._free)
            self._free.remove(bufset)
            return bufset

    def newest(self) -> BufferSet | None:
        """The set holding the highest staged step (for emergency saves)."""
        staged = [s for s in self.sets if s.step is not None]
        return max(staged, key=lambda s: s.step) if staged else None

    def held(self) -> tuple[int, int, int]:
        """(buffers held, bytes held, allocations so far) over every set."""
        buffers = [b for s in self.sets for b in tuple(s.buffers.values())]  # a snapshot: the stager may be busy
        return (len(buffers), sum(b.numel() * b.element_size() for b in buffers), sum(s.allocations for s in self.sets))


def describe(name: str, value: "torch.Tensor | Shard", dtype: str) -> StagedTensor:
    if isinstance(value, Shard):
        shape = tuple(int(s) for s in value.global_shape)
        return StagedTensor(name, "shard", shape, dtype, int(value.flat_range[0]), int(value.flat_range[1]))
    shape = tuple(value.shape)
    return StagedTensor(name, "replica", shape, dtype, 0, math.prod(shape))
