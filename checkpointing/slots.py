"""Zero-copy staging: the chunks a rank writes on a level, staged straight into files that become the checkpoint.

On memory levels (tmpfs) a `Slot` is a set of files on the level's filesystem, one per chunk
this rank writes there. Staging writes the live tensors' bytes straight into those files (one copy, and only the
chunks this rank owns); persisting checksums them and hard-links the files into the checkpoint directory. A slot
is reused once every checkpoint holding its files was retired (each file's link count is back to 1): its pages stay
allocated, so steady-state saves neither allocate nor free memory. The staging directory of a process is locked
(flock) and removed by the next manager on the node once that process is gone.

A disk level cannot hold staging files, but the same plan applies: a host-memory `Slot` (directory None) holds only
the chunks this rank writes there, which the persister writes out, checksumming while writing.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from checkpointing.checksums import BlockChecksummer, ChunkCrcs, checksum_buffer
from checkpointing.direct_io import aligned_zeros
from checkpointing.results import LevelStaging
from checkpointing.staging import Shard, local_view


_BLOCK = 1 << 20  # pwrite + checksum granularity: the piece is still in cache when it is checksummed
_MMAP_MIN = 64 << 10  # chunk files at least this big are written through a shared mapping (a plain memcpy, about
# twice as fast as pwrite into tmpfs); smaller ones with one pwrite (no mapping per file)


def pwrite_all(fd: int, view: memoryview, offset: int, acc: BlockChecksummer | None = None) -> None:
    """Write `view` at `offset` in pieces; with `acc`, checksum each piece right after writing it."""
    pos = 0
    n = len(view)
    while pos < n:
        block = view[pos : pos + _BLOCK]
        done = 0
        while done < len(block):
            done += os.pwrite(fd, block[done:], offset + pos + done)
        if acc is not None:
            acc.update(block)
        pos += len(block)


def flat_bytes(value: "torch.Tensor | Shard") -> torch.Tensor:
    """The local tensor's bytes as a flat uint8 tensor (a view when contiguous, else a copy)."""
    t = local_view(value).detach()
    return t.reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class OwnedChunk:
    """A chunk file this rank writes on a level. `whole`: all its real bytes come from this rank, bytes
    [src_lo, src_hi) of the local tensor, written at staging time; otherwise it is assembled from `own` pieces
    (src_lo, src_hi, offset in chunk) and pieces received from other ranks at persist time."""

    name: str
    chunk: int
    rel: str
    nbytes: int
    whole: bool
    src_lo: int = 0
    src_hi: int = 0
    own: tuple[tuple[int, int, int], ...] = ()


@dataclass
class _StageCopies:
    """One save's copies into a slot (Slot._copies_for): torch copies, and pwrites for chunks too small to map."""

    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    pwrites: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    nbytes: int = 0
    sources: list[tuple[str, object, int]] = field(default_factory=list)
    """(name, live tensor or Shard, its data_ptr) the views were taken from: reused only while all still hold."""
    volatile: set[str] = field(default_factory=set)
    """Names of non-contiguous tensors, left out of the reused copies: their views are built per save."""


@dataclass(frozen=True)
class StagePlan:
    """What a rank stages for one level layout: its owned chunks and the boundary pieces it sends away
    (name, src_lo, src_hi) in the order of the level plan's sends."""

    key: str
    chunks: tuple[OwnedChunk, ...]
    sends: tuple[tuple[str, int, int], ...]


class Slot:
    """Files receiving one save's owned chunks (see the module docstring), plus host buffers for boundary pieces.

    directory=None: a host-memory slot, for saves whose first level is a disk: the same plan (only the chunks this
    rank writes there, checksummed while copying), in reusable buffers that the persister writes out."""

    def __init__(self, index: int, directory: Path | None) -> None:
        self.index = index
        self.dir = directory
        self.key: str | None = None
        self.plan: StagePlan | None = None
        self.fds: list[int] = []
        self.paths: list[Path] = []
        self.names: list[str] = []  # str(paths): hard-linked every save
        self.maps: list[mmap.mmap | None] = []
        self.views: list[np.ndarray | None] = []
        self.crcs: list[ChunkCrcs | None] = []
        self.assembly: dict[int, np.ndarray] = {}
        self.sendbufs: list[np.ndarray] = []
        self.step: int | None = None
        self._copies: _StageCopies | None = None  # see _copies_for; views into the maps: dropped before unmapping

    @property
    def files(self) -> bool:
        return self.dir is not None

    def prepare(self, plan: StagePlan, touch: bool = False) -> None:
        """Make the files match `plan` (same plan as last time: nothing to do, the pages are reused).

        touch=True (SlotPool.prewarm, on the persist thread): also write every page once now. A new slot's memory
        is otherwise faulted in by the first save that stages into it, on the training loop's path: 4 GiB staged
        in 4.8 s into a new slot against 0.2-0.3 s into a used one, measured here."""
        if self.key == plan.key and not self.files:
            return
        if self.key == plan.key:
            for fd, c in zip(self.fds, plan.chunks):
                if os.fstat(fd).st_size != c.nbytes:  # someone truncated a committed copy by hand
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, c.nbytes)
                    os.posix_fallocate(fd, 0, c.nbytes)
            return
        self.close()
        if not self.files:
            # aligned: a disk level writes them with O_DIRECT (direct_io.py)
            self.views = [aligned_zeros(c.nbytes) if c.whole else None for c in plan.chunks]
            self.assembly = {i: aligned_zeros(c.nbytes) for i, c in enumerate(plan.chunks) if not c.whole}
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(plan.chunks if self.files else ()):
            path = self.dir / str(i)
            if path.exists():
                path.unlink()  # may still be linked into a checkpoint: never write through it
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self.fds.append(fd)
            self.paths.append(path)
            self.names.append(str(path))
            os.ftruncate(fd, c.nbytes)
            if c.nbytes:
                os.posix_fallocate(fd, 0, c.nbytes)  # a full tmpfs is ENOSPC here, never SIGBUS in a mapped write
            mapped = mmap.mmap(fd, c.nbytes) if c.whole and c.nbytes >= _MMAP_MIN else None
            self.maps.append(mapped)
            self.views.append(None if mapped is None else np.frombuffer(mapped, dtype=np.uint8))
            if not c.whole:
                self.assembly[i] = np.zeros(c.nbytes, dtype=np.uint8)
        self.crcs = [None] * len(plan.chunks)
        self.sendbufs = [np.empty(hi - lo, dtype=np.uint8) for _, lo, hi in plan.sends]
        self.key, self.plan = plan.key, plan
        if touch:
            for array in [*self.views, *self.assembly.values(), *self.sendbufs]:
                if array is not None:
                    array.fill(0)  # zero padding must stay zero; filling faults every page in

    def stage(self, tensors: dict, plan: StagePlan, step: int) -> int:
        """Copy this save's owned bytes into the files (and pieces into host buffers); return bytes copied.

        Only copies, one torch copy per chunk (the GIL is released and large copies use several threads): the
        caller waits for this in wait_staged(). The checksums are left to the persist thread (see checksum()),
        which reads the staged bytes while the caller already runs its next step."""
        self.prepare(plan)
        self.crcs = [None] * len(plan.chunks)
        copied = 0
        for copies in self._copies_for(tensors, plan):
            for dst, src in copies.copies:
                dst.copy_(src)
            for fd, src in copies.pwrites:
                pwrite_all(fd, memoryview(src.numpy()), 0)
            copied += copies.nbytes
        self.step = step
        return copied

    def _copies_for(self, tensors: dict, plan: StagePlan) -> "list[_StageCopies]":
        """The (destination, source) views of a save's copies. Those of contiguous tensors are built once and reused
        while the same live tensor objects hold the same storage: a training loop saves the same tensors every step,
        and building the views (flat byte views, slices, numpy wrappers) took a fifth of the stager thread's time at
        the default model's ~60 chunks a rank. A non-contiguous tensor's flat bytes are a copy taken at save time,
        so its views are built again for every save."""
        cached = self._copies
        if cached is None or not all(
            tensors.get(name) is value and local_view(value).data_ptr() == ptr for name, value, ptr in cached.sources
        ):
            names = {c.name for c in plan.chunks} | {name for name, _, _ in plan.sends}
            steady = {name for name in names if local_view(tensors[name]).is_contiguous()}
            cached = self._copies = self._build_copies(tensors, plan, steady)
            cached.sources = [(name, tensors[name], local_view(tensors[name]).data_ptr()) for name in sorted(steady)]
            cached.volatile = names - steady
        if not cached.volatile:
            return [cached]
        return [cached, self._build_copies(tensors, plan, cached.volatile)]

    def _build_copies(self, tensors: dict, plan: StagePlan, names: set[str]) -> "_StageCopies":
        """The copies of the chunks and pieces whose source tensor is in `names`."""
        flats = {name: flat_bytes(tensors[name]) for name in names}
        copies = _StageCopies()
        for i, c in enumerate(plan.chunks):
            if c.name not in names:
                continue
            src = flats[c.name]
            if c.whole:
                view = src[c.src_lo : c.src_hi]
                mapped = self.views[i]
                if mapped is None:
                    copies.pwrites.append((self.fds[i], view))
                else:
                    copies.copies.append((torch.from_numpy(mapped[: c.src_hi - c.src_lo]), view))
                copies.nbytes += c.src_hi - c.src_lo
            else:
                buf = torch.from_numpy(self.assembly[i])
                for lo, hi, off in c.own:
                    copies.copies.append((buf[off : off + hi - lo], src[lo:hi]))
                    copies.nbytes += hi - lo
        for buf, (name, lo, hi) in zip(self.sendbufs, plan.sends):
            if name in names:
                copies.copies.append((torch.from_numpy(buf), flats[name][lo:hi]))
                copies.nbytes += hi - lo
        return copies

    def checksum(self, i: int) -> ChunkCrcs:
        """Checksums of owned chunk i as staged (padding included), computed once per save by the persist thread:
        the record covers exactly the bytes that are linked (the same file) or written (see write_file) afterwards."""
        crcs = self.crcs[i]
        if crcs is None:
            crcs = self.crcs[i] = checksum_buffer(self.read(i))
        return crcs

    def finish_assembled(self) -> None:
        """Persist time, after the pieces were received: write the assembled chunks into their files."""
        for i, buf in self.assembly.items():
            if self.files:
                acc = BlockChecksummer()
                pwrite_all(self.fds[i], memoryview(buf), 0, acc)
                self.crcs[i] = acc.result()
            else:
                self.crcs[i] = checksum_buffer(memoryview(buf))
                self.views[i] = buf

    def read(self, i: int) -> memoryview:
        """The bytes of owned chunk i as staged (to write them to another level when this one failed)."""
        if self.views[i] is not None:
            return memoryview(self.views[i])
        size = self.plan.chunks[i].nbytes
        buf = np.empty(size, dtype=np.uint8)
        got = os.preadv(self.fds[i], [memoryview(buf)], 0)
        if got != size:
            raise OSError(f"staging file {self.paths[i]}: read {got} of {size} bytes")
        return memoryview(buf)

    def linked_elsewhere(self) -> bool:
        """True while any file is still linked into a checkpoint (or a partial directory)."""
        return self.files and any(os.fstat(fd).st_nlink > 1 for fd in self.fds)

    def close(self) -> None:
        self._copies = None
        self.views = []
        for mapped in self.maps:
            if mapped is not None:
                mapped.close()
        self.maps = []
        for fd in self.fds:
            os.close(fd)
        for path in self.paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self.fds, self.paths, self.names, self.crcs, self.assembly, self.sendbufs = [], [], [], [], {}, []
        self.key = self.plan = None


class SlotPool:
    """The slots of one level on this rank: at most `max_slots`, created on demand, reused when free. root=None:
    host-memory slots (a disk level)."""

    def __init__(self, root: Path | None, owner: str, max_slots: int) -> None:
        self.root = None if root is None else Path(root)
        self.max_slots = max_slots
        self.dir = None if root is None else self.root / ".staging" / f"{owner}-{os.getpid()}-{secrets.token_hex(3)}"
        self._slots: list[Slot] = []
        self._free: list[Slot] = []
        self._linked: list[Slot] = []
        self._preparing = 0
        self._lock = threading.Condition()
        self._lock_fd: int | None = None

    def acquire(self) -> Slot | None:
        """A free slot (creating one while under max_slots), or None: then the save stages into host buffers.

        While prewarm() prepares a slot and none is free, waits for that one rather than creating another: a
        second slot would stay allocated for the rest of the run."""
        with self._lock:
            self._lock.wait_for(lambda: self._free or not self._preparing)
            if self._free:
                return self._free.pop()
            return self._new_slot()

    def _new_slot(self) -> Slot | None:
        if len(self._slots) >= self.max_slots:
            return None
        slot = Slot(len(self._slots), None if self.dir is None else self.dir / f"s{len(self._slots)}")
        self._slots.append(slot)
        return slot

    def prewarm(self, plan: StagePlan) -> bool:
        """Make sure the next save finds a slot prepared for `plan`, its memory already faulted in (persist thread,
        after a save: see Slot.prepare). Prepares a free slot of another plan, or a new one if none is free and
        the pool may grow; True if it prepared one. Raises OSError (a full memory level): the slot stays free and
        unprepared, and the next save reports the error as it would have without the prewarm."""
        with self._lock:
            if any(s.key == plan.key for s in self._free):
                return False
            slot = self._free.pop() if self._free else self._new_slot()
            if slot is None:
                return False
            self._preparing += 1
        try:
            self.open()
            slot.prepare(plan, touch=True)
        except OSError:
            slot.close()
            raise
        finally:
            with self._lock:
                self._preparing -= 1
                self._free.append(slot)
                self._lock.notify_all()
        return True

    def release(self, slot: Slot, maybe_linked: bool) -> None:
        """A save is done with the slot; if its files may be linked into a checkpoint, it is free only later."""
        with self._lock:
            (self._linked if maybe_linked else self._free).append(slot)

    def stats(self) -> LevelStaging:
        with self._lock:
            return LevelStaging(
                slots=len(self._slots),
                in_files=self.dir is not None,
                chunk_files=sum(len(s.fds) for s in self._slots),
                ready=sum(1 for s in self._free if s.key is not None),
            )

    def refresh(self) -> None:
        """Free the slots whose checkpoints were all retired. Persist thread, after each save."""
        with self._lock:
            linked = list(self._linked)
        done = [s for s in linked if not s.linked_elsewhere()]
        with self._lock:
            for s in done:
                self._linked.remove(s)
                self._free.append(s)

    def open(self) -> None:
        """Create and lock this process's staging directory; remove those of processes that are gone. Called by the
        stager before each save and by prewarm (the persist thread): the first call does the work, under the lock."""
        with self._lock:
            self._open()

    def _open(self) -> None:
        if self._lock_fd is not None or self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd
        for entry in os.scandir(self.dir.parent):
            if entry.path == str(self.dir) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                other = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds only if its owner is gone
            except OSError:
                continue
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
            finally:
                os.close(other)

    def close(self) -> None:
        with self._lock:
            for slot in self._slots:
                slot.close()
            self._slots, self._free, self._linked = [], [], []
        if self._lock_fd is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.close(self._lock_fd)
            self._lock_fd = None
