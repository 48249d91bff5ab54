"""CheckpointManager: lazy, asynchronous, multi-level checkpoints in zarr, loadable into any layout.

Threads and why:
  caller     save() records references and returns; wait_staged() right before optimizer.step().
  stager     copies the tensors while the caller runs forward/backward: into reusable host buffers, or, when the
             save's first level is node memory (tmpfs), straight into the files that become the checkpoint (only
             the chunks this rank writes there; see staging.Slot).
  persister  writes (or links), checksums, fsyncs (disk levels only) and commits level after level, then promotes
             the checkpoint to the slower levels by copying the committed files (so the staging buffer is free as
             soon as the fastest level committed). It is the only thread that talks on the checkpoint process
             group, so collectives on every rank happen in the same order.
  janitor    deletes retired checkpoint directories on disk levels, off the persister's critical path.

save(), wait_durable(), load(), emergency_save() and close() are collective over the checkpoint group: call them on
every rank with the same steps. If ranks disagree on a step (one skipped it because it was busy), the persister
drops that step everywhere instead of deadlocking.

Per save the persister issues one all_gather to agree on the job plus two per level (records, outcome); tensor
descriptions travel only when they changed, and layouts, plans and zarr metadata are computed once per layout.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import queue
import secrets
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from checkpointing.comm import Comm
from checkpointing.errors import CheckpointCorruptError, CheckpointError
from checkpointing.manifest import MANIFEST_NAME, Manifest, read_manifest
from checkpointing.metrics import CheckpointStats, Metrics
from checkpointing.commit import LevelState, Target
from checkpointing.objstore import storage_for
from checkpointing.context import SaveContext, who
from checkpointing.persist import ChunkHook, outcome_dict, persist_level, write_chunks
from checkpointing.sources import Buffers, ChunkSource, CommittedCopy, HostBuffers, StagedSlot
from checkpointing.plan import PlanCache, TensorLayout, global_layouts
from checkpointing.promote import Promoter, Promotion
from checkpointing.reshard import LoadTarget, Scratch, mismatch, missing_chunks, read_range
from checkpointing.staging import (
    BufferPool,
    BufferSet,
    Shard,
    Slot,
    SlotPool,
    StagedTensor,
    StagePlan,
    StagingStats,
    describe,
    stage_into,
)
from checkpointing.tiers import Janitor, LevelSpec, step_dir_name
from checkpointing.zarr_store import check_tensor_name, dtype_name


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
class _Described:
    """The validated description of one save's tensors (cached: the trainer saves the same tensors every step)."""

    staged: list[StagedTensor]
    describes: dict
    tsig: str
    all_cpu: bool


@dataclass
class _WriteJob:
    step: int
    levels: list[LevelSpec]
    handle: SaveHandle
    bufset: BufferSet
    staged: list[StagedTensor]
    extra: dict
    t_save: float
    described: _Described | None = None
    slot: Slot | None = None
    stage_plan: StagePlan | None = None
    dsig: str | None = None  # the agreed layout the slot was staged for (None: host buffers)
    pre: dict | None = None  # chunks already linked into the level's spare skeleton (see _prelink)


@dataclass
class _ControlJob:
    kind: str  # "flush" | "emergency" | "stop"
    seq: int
    done: Future = field(default_factory=Future)


@dataclass(frozen=True)
class _Agreed:
    """The layout of the last save every rank agreed on: what zero-copy staging plans against."""

    sig: str
    layouts: dict[str, TensorLayout]
    nodes: list[str]
    tsigs: list[str]


class CheckpointManager:
    """See the module docstring; the public surface is save/wait_staged/wait_durable/load/latest/list/
    emergency_save/close, plus the read-only stats and staging_stats()."""

    def __init__(
        self,
        levels: list[LevelSpec],
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
        local_rank: int | None = None,
        local_world_size: int | None = None,
        local_group: dist.ProcessGroup | None = None,
        node_id: str = "node-0",
        chunk_bytes: int = 16 << 20,
        on_busy: str = "wait",
        registry: CollectorRegistry | None = None,
        logger: logging.Logger | None = None,
        *,
        staging_buffers: int = 2,
        read_threads: int = 2,
        after_chunk: ChunkHook | None = None,
    ) -> None:
        if not levels:
            raise ValueError("CheckpointManager needs at least one LevelSpec")
        if len({lv.name for lv in levels}) != len(levels):
            raise ValueError(f"LevelSpec names must be unique, got {[lv.name for lv in levels]}")
        if on_busy not in ("wait", "skip"):
            raise ValueError(f"on_busy must be 'wait' or 'skip', got {on_busy!r}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if group is None and world_size != 1:
            raise ValueError(f"world_size={world_size} needs a gloo process group (group=None means one process)")
        self.levels = list(levels)
        self.rank, self.world_size, self.node_id = rank, world_size, node_id
        self.chunk_bytes, self.on_busy = chunk_bytes, on_busy
        self.log = logger or logging.getLogger("checkpointing")
        self._world = Comm(group, rank, world_size)
        self._local = self._local_comm(local_group, local_rank, local_world_size)
        self._metrics = Metrics(registry)
        self._pool = BufferPool(staging_buffers)
        self._pin = torch.cuda.is_available()
        self._buffers = Buffers()  # the persist thread's (the promoter has its own)
        self._scratch = Scratch()
        self._read_threads = max(1, read_threads)
        self._after_chunk = after_chunk  # fault tests: see persist.ChunkHook
        self._manifests: dict[Path, tuple[int, Manifest]] = {}
        self._handles: list[SaveHandle] = []
        self._unstaged: list[SaveHandle] = []
        self._blocked: dict[int, float] = {}
        self._seq = 0
        self._closed = False
        self._staged_meta: dict[int, _WriteJob] = {}
        self._plans = PlanCache()
        self._janitor = Janitor(self.log)
        self._states = {lv.name: LevelState(storage_for(lv, self._janitor)) for lv in self.levels}
        for state in self._states.values():  # an unusable object store (no bucket, refused key) fails here, at once
            state.storage.check()
        self._slots: dict[str, SlotPool] = {}
        self._described_key: tuple | None = None
        self._described: _Described | None = None
        self._agreed: _Agreed | None = None
        self._peer: dict[int, tuple[str, dict]] = {}
        self._sent_tsig: str | None = None
        self._promoter = Promoter(self._states, self.log, self._metrics)
        self._stage_q: queue.Queue = queue.Queue()
        self._persist_q: queue.Queue = queue.Queue()
        self._stager = threading.Thread(target=self._stage_loop, name="ckpt-stager", daemon=True)
        self._persister = threading.Thread(target=self._persist_loop, name="ckpt-persister", daemon=True)
        self._stager.start()
        self._persister.start()

    def _local_comm(self, local_group, local_rank, local_world_size) -> Comm:
        lws = self.world_size if local_world_size is None else local_world_size
        lr = self.rank if local_rank is None else local_rank
        if local_group is not None:
            return Comm(local_group, lr, lws)
        if lws == 1:
            return Comm(None, 0, 1)
        if lws == self.world_size:
            return self._world
        raise ValueError(
            f"local_world_size={lws} < world_size={self.world_size} needs local_group (a gloo group "
            f"of this node's ranks)"
        )

    @property
    def stats(self) -> CheckpointStats:
        return self._metrics.stats

    def staging_stats(self) -> StagingStats:
        """What this rank's staging holds now (slots per level, host buffers): read-only, see StagingStats."""
        buffers, nbytes, allocations = self._pool.held()
        return StagingStats(
            levels={name: pool.stats() for name, pool in self._slots.items()},
            host_buffer_sets=self._pool.size,
            host_buffers=buffers,
            host_buffer_bytes=nbytes,
            host_buffer_allocations=allocations,
        )

    # ------------------------------------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        tensors: dict[str, "torch.Tensor | Shard"],
        extra: dict | None = None,
        levels: list[str] | None = None,
    ) -> SaveHandle | None:
        """Record references and return at once; None if no level is due at this step (or skipped when busy).

        ``levels`` names the levels to write now whatever their intervals (an emergency save of the current step);
        such a save waits for a free staging buffer instead of being skipped."""
        t0 = time.perf_counter()
        if self._closed:
            raise CheckpointError("save() after close()")
        forced = levels is not None
        if forced:
            unknown = sorted(set(levels) - {lv.name for lv in self.levels})
            if unknown:
                raise CheckpointError(
                    f"save(levels={levels}): no level named {unknown}; this manager has "
                    f"{[lv.name for lv in self.levels]}"
                )
        levels = [lv for lv in self.levels if (lv.name in levels if forced else lv.due(step))]
        if not levels:
            return None
        described = self._describe(tensors)
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"save(step={step}): extra is not JSON-serialisable ({e}); store RNG states as lists or base64 strings"
            ) from e
        bufset = self._pool.acquire(block=False)
        if bufset is None:
            if self.on_busy == "skip" and not forced:
                self._metrics.skip([lv.name for lv in levels])
                self.log.info("checkpoint step %d skipped: the previous save is still persisting", step)
                return None
            self.stats.waits += 1
            bufset = self._pool.acquire(block=True)
        # forget saves that committed (failed ones stay until wait_durable reports them): no growth over a long run
        if len(self._handles) > 64:
            self._handles = [h for h in self._handles if not h.durable.done() or h.durable.exception() is not None]
        handle = SaveHandle(step, [lv.name for lv in levels])
        job = _WriteJob(step, levels, handle, bufset, described.staged, extra, t0, described)
        self._zero_copy(job)
        self._handles.append(handle)
        self._unstaged.append(handle)
        self.stats.saves += 1
        self._stage_q.put((job, dict(tensors)))
        self._blocked[step] = time.perf_counter() - t0
        return handle

    def _describe(self, tensors: dict) -> _Described:
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
        staged = self._validate(tensors)
        describes = {t.name: t.describe() for t in staged}
        tsig = hashlib.blake2b(json.dumps(describes, sort_keys=True).encode(), digest_size=12).hexdigest()
        all_cpu = all((v.local if isinstance(v, Shard) else v).device.type == "cpu" for v in tensors.values())
        self._described_key, self._described = key, _Described(staged, describes, tsig, all_cpu)
        return self._described

    def _zero_copy(self, job: _WriteJob) -> None:
        """Stage this save straight into its first level's files if that level is node memory, the tensors are on
        the CPU and the layout is the one every rank agreed on last time (so the chunk plan is known)."""
        level, agreed = job.levels[0], self._agreed
        if agreed is None or not job.described.all_cpu:
            return
        if agreed.tsigs[self.rank] != job.described.tsig:
            return  # this rank's tensors changed: plan with everyone first
        files = level.is_memory and (level.node_local or len(set(agreed.nodes)) == 1)  # else nothing to link into
        pool = self._slots.get(level.name)
        if pool is None:
            slots = level.keep_last + self._pool.size + 1 + Promoter.MAX_PENDING if files else self._pool.size + 1
            pool = self._slots[level.name] = SlotPool(
                Path(level.root) if files else None, f"{self.node_id}-r{self.rank}", slots
            )
        slot = pool.acquire()
        if slot is None:
            return
        job.slot = slot
        job.stage_plan = self._plans.stage_plan(
            agreed.sig, agreed.layouts, self.rank, agreed.nodes if level.node_local else None
        )
        job.dsig = agreed.sig

    def _validate(self, tensors: dict) -> list[StagedTensor]:
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
                raise CheckpointError(
                    f"tensor names {a!r} and {names[i]!r} collide: {a!r} would be both array and group"
                )
        return out

    def wait_staged(self) -> float:
        """Block until every save's tensors are copied; return seconds blocked here. Call before mutating them."""
        t0 = time.perf_counter()
        unstaged, self._unstaged = self._unstaged, []
        for h in unstaged:
            h.staged.exception()
        waited = time.perf_counter() - t0
        for h in unstaged:
            self._metrics.observe_blocked(h.levels[0], self._blocked.pop(h.step, 0.0) + waited)
        return waited

    def wait_durable(self) -> list[str]:
        """Block until every save so far is committed on all its levels; raise one CheckpointError naming every
        failing rank, level and file. Returns the names of levels committed by the saves since the last call
        (saves that committed long ago may have been forgotten already). Collective."""
        for h in self._handles:
            h.staged.exception()  # every save is queued for persisting before the flush marker
        self._control("flush")
        self._janitor.drain()
        handles, self._handles = self._handles, []
        errors, committed = [], []
        for h in handles:
            exc = h.durable.exception()
            if exc is not None:
                errors.append(f"step {h.step}: {exc}")
            else:
                committed += h.durable.result()
        if errors:
            raise CheckpointError("; ".join(errors))
        return committed

    def _control(self, kind: str) -> None:
        self._seq += 1
        job = _ControlJob(kind, self._seq)
        self._persist_q.put(job)
        job.done.result()

    def emergency_save(self) -> list[str]:
        """On SIGTERM/SIGUSR1: make the newest staged snapshot durable on the most durable level, now.

        Waits for pending work, then writes the newest staged snapshot to the last level unless that step is
        already committed there. Returns the levels written (empty if nothing was needed)."""
        t0 = time.perf_counter()
        self.wait_staged()
        self._seq += 1
        job = _ControlJob("emergency", self._seq)
        self._persist_q.put(job)
        written = job.done.result()
        self.log.warning(
            "emergency checkpoint: wrote %s in %.2f s", written or "nothing (already durable)", time.perf_counter() - t0
        )
        return written

    def close(self) -> None:
        """Finish in-flight saves, stop the threads. Errors of unwaited saves are logged, not raised."""
        if self._closed:
            return
        try:
            self.wait_durable()
        except CheckpointError as e:
            self.log.error("checkpoint saves failed before close: %s", e)
        self._control("stop")
        self._stage_q.put(None)
        self._closed = True
        self._stager.join()
        self._persister.join()
        self._janitor.close()
        for state in self._states.values():
            state.storage.close()
        for pool in self._slots.values():
            pool.close()
        for state in self._states.values():
            if state.spare is not None:  # an empty skeleton kept for a next save that won't come
                shutil.rmtree(state.spare, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- threads

    def _stage_loop(self) -> None:
        while (item := self._stage_q.get()) is not None:
            job, tensors = item
            try:
                if job.slot is not None:  # host buffers are not needed while saves stage into slots: freed
                    job.bufset.drop_buffers()  # first, so one save in flight holds one copy of the state, not two
                    self._slots[job.levels[0].name].open()
                    nbytes = job.slot.stage(tensors, job.stage_plan, job.step)
                else:
                    nbytes = stage_into(job.bufset, tensors, job.step, self._pin)
            except (RuntimeError, OSError) as e:
                self._release(job, linked=False)
                err = CheckpointError(f"staging step {job.step} on rank {self.rank} failed: {e}")
                job.handle.staged.set_exception(err)
                job.handle.durable.set_exception(err)
                continue
            job.bufset.step, job.bufset.slot = job.step, job.slot
            self._staged_meta[job.bufset.index] = job
            self._persist_q.put(job)  # queued before `staged` resolves: a later control job queues after it
            job.handle.staged.set_result(nbytes)

    def _release(self, job: _WriteJob, linked: bool) -> None:
        """Give back the save's staging resources: the slot (free at once, or once its checkpoint is retired) and
        the buffer set (the in-flight ticket). linked=False: the save was not written, undo its pre-links."""
        if job.pre is not None and not linked:
            storage = self._states[job.levels[0].name].storage
            storage.unlink_chunks(storage.root / job.pre["dir"], [rec[2] for rec in job.pre["records"]])
            job.pre = None
        if job.slot is not None:
            self._slots[job.levels[0].name].release(job.slot, linked)
            job.slot = None
        self._pool.release(job.bufset)

    def _persist_loop(self) -> None:
        job = None
        while True:
            job = job or self._persist_q.get()
            if isinstance(job, _WriteJob) and job.pre is None:
                self._prelink(job)
            info = self._job_info(job)
            info["promo"] = self._promoter.report()
            infos = self._world.all_gather_json(info)
            self._learn_layouts(infos)
            self._promoter.advance(infos, self._world.rank)
            target = max(tuple(i["key"]) for i in infos)
            if tuple(infos[self._world.rank]["key"]) < target:
                self._drop(job, infos)
                job = None
                continue
            if any(tuple(i["key"]) != target for i in infos):
                continue  # others are dropping older jobs; agree again with the same job
            try:
                if isinstance(job, _WriteJob):
                    self._run_write(job, infos)
                elif job.kind == "emergency":
                    self._drain_promotions()
                    job.done.set_result(self._run_emergency(infos))
                else:
                    self._drain_promotions()
                    job.done.set_result(None)
                    if job.kind == "stop":
                        self._promoter.close()
                        return
            except (RuntimeError, ValueError, OSError) as e:  # a broken process group or an unexpected file state
                self._fail(job, e)
            job = None

    def _fail(self, job, exc: Exception) -> None:
        """Resolve a job whose execution raised, so no caller waits forever; the persist thread carries on."""
        err = CheckpointError(f"rank {self.rank}: checkpoint persist thread failed: {type(exc).__name__}: {exc}")
        self.log.error("%s", err)
        if isinstance(job, _WriteJob):
            self._release(job, linked=True)
            if not job.handle.durable.done():
                job.handle.durable.set_exception(err)
        elif not job.done.done():
            job.done.set_exception(err)

    def _job_info(self, job) -> dict:
        if isinstance(job, _ControlJob):
            newest = self._pool.newest() if job.kind == "emergency" else None
            return {
                "key": [1, job.seq],
                "kind": job.kind,
                "node": self.node_id,
                "newest": None if newest is None else newest.step,
            }
        d = job.described
        return {
            "key": [0, job.step],
            "kind": "write",
            "node": self.node_id,
            "nonce": secrets.token_hex(6),
            "tsig": d.tsig,
            "tensors": None if d.tsig == self._sent_tsig else d.describes,
            "dsig": job.dsig,
            "pre": job.pre,
            "extra": job.extra,
            "levels": [lv.name for lv in job.levels],
        }

    def _prelink(self, job: _WriteJob) -> None:
        """Zero-copy save into a spare skeleton: link the staged files before the job's gather, so the records
        travel in that gather and the level needs no records gather of its own. Undone if the job is dropped."""
        level = job.levels[0]
        state = self._states[level.name]
        sp = job.stage_plan
        if (
            job.slot is None
            or not job.slot.files
            or state.spare is None
            or state.spare_sig != job.dsig
            or sp.sends
            or not all(c.whole for c in sp.chunks)
        ):
            return
        chunks = StagedSlot(job.slot).chunks(None, None)
        outcome = write_chunks(
            state.storage, Target(state.spare, True), chunks, who(self.rank, self.node_id, level.name)
        )
        job.pre = outcome_dict(outcome, state.spare)

    def _learn_layouts(self, infos: list[dict]) -> None:
        """Remember every rank's tensor descriptions: a rank sends them only when they changed, and every rank
        sees every gather, so this table is the same everywhere."""
        for r, info in enumerate(infos):
            if info.get("tensors") is not None:
                self._peer[r] = (info["tsig"], info["tensors"])
        mine = infos[self._world.rank]
        if mine.get("tsig") is not None:
            self._sent_tsig = mine["tsig"]

    def _drop(self, job, infos: list[dict], why: str | None = None) -> None:
        """Another rank is already past this job (or the job cannot be written as staged): resolve it without
        writing (counted as a skip)."""
        behind = [r for r, i in enumerate(infos) if tuple(i["key"]) > tuple(infos[self._world.rank]["key"])]
        if isinstance(job, _WriteJob):
            self._release(job, linked=False)
            self._metrics.skip([lv.name for lv in job.levels])
            self.log.warning(
                "checkpoint step %d dropped: %s", job.step, why or f"ranks {behind} did not stage it (busy)"
            )
            job.handle.durable.set_result([])
        else:
            job.done.set_exception(
                CheckpointError(
                    f"checkpoint control call {job.kind} #{job.seq} is out of step with ranks {behind}: "
                    f"call wait_durable/emergency_save/close the same number of times on every rank"
                )
            )

    def _context(self, step: int, infos: list[dict], describes: list[dict] | None = None) -> SaveContext:
        """The agreed save context; layouts come from the cache when every rank's tensors are unchanged."""
        tsigs = [i["tsig"] for i in infos]
        nodes = [i["node"] for i in infos]
        sig = hashlib.blake2b(json.dumps([tsigs, nodes, self.chunk_bytes]).encode(), digest_size=12).hexdigest()
        agreed = self._agreed
        if agreed is None or agreed.sig != sig:
            if describes is None:
                missing = [r for r, t in enumerate(tsigs) if self._peer.get(r, ("",))[0] != t]
                if missing:
                    raise ValueError(f"tensor descriptions of ranks {missing} are unknown")
                describes = [self._peer[r][1] for r in range(len(infos))]
            layouts = global_layouts([{"tensors": d} for d in describes], self.chunk_bytes)
            agreed = _Agreed(sig, layouts, nodes, tsigs)
            self._agreed = agreed
        return SaveContext(
            step=step,
            nonce=infos[0]["nonce"],
            layouts=agreed.layouts,
            extras=[i["extra"] for i in infos],
            nodes=nodes,
            world=self._world,
            local=self._local,
            node_id=self.node_id,
            chunk_bytes=self.chunk_bytes,
            sig=sig,
            plans=self._plans,
        )

    def _run_write(self, job: _WriteJob, infos: list[dict]) -> None:
        try:
            ctx = self._context(job.step, infos)
        except ValueError as e:
            self._release(job, linked=False)
            job.handle.durable.set_exception(CheckpointError(f"checkpoint step {job.step}: {e}"))
            return
        stale = [r for r, i in enumerate(infos) if i["dsig"] not in (None, ctx.sig)]
        if stale:  # staged zero-copy for a layout that changed meanwhile: the chunks it holds are not the plan
            self._drop(job, infos, f"ranks {stale} staged it for a tensor layout that changed")
            return
        first = StagedSlot(job.slot) if job.slot is not None else HostBuffers(job.bufset, self._buffers)
        pre = [i.get("pre") for i in infos]
        handle = job.handle

        def done(committed: list[str], errors: list[str]) -> None:
            if errors:
                handle.durable.set_exception(
                    CheckpointError(
                        f"checkpoint step {job.step} failed ({'; '.join(errors)}). Committed on: "
                        f"{committed or 'no level'}; older checkpoints are intact and training can continue"
                    )
                )
            else:
                handle.durable.set_result(committed)

        self._write_levels(
            ctx, job.levels, job, first, job.t_save, pre if any(p is not None for p in pre) else None, done
        )
        for pool in self._slots.values():
            pool.refresh()

    def _drain_promotions(self, keep: int = 0) -> None:
        """Finish pending promotions now until at most `keep` are left: each round waits for this rank's promoter,
        then gathers. Called at the same point of the job sequence on every rank, so the rounds line up."""
        while len(self._promoter.pending) > keep:
            self._promoter.wait_idle()
            infos = self._world.all_gather_json({"promo": self._promoter.report()})
            self._promoter.advance(infos, self._world.rank)

    def _write_levels(
        self,
        ctx: SaveContext,
        levels: list[LevelSpec],
        job: _WriteJob | None,
        first: ChunkSource,
        t_save: float,
        pre: list | None = None,
        done=None,
    ) -> tuple[list[str], list[str]]:
        """Write the first level from the staged data, release it, promote to the others by copying files.

        If a level fails, the next one is written from the still-held staged data instead of from a copy. With
        `done`, the promotions run on the promoter thread and `done(committed, errors)` is called once they are
        finished; otherwise everything happens here."""
        committed, errors, source, source_level = [], [], None, None
        for i, level in enumerate(levels):
            if source is not None and done is not None:
                if len(self._promoter.pending) >= Promoter.MAX_PENDING:
                    self.stats.waits += 1
                    self._drain_promotions(keep=Promoter.MAX_PENDING - 1)
                self._promoter.add(
                    Promotion(
                        ctx.step,
                        list(levels[i:]),
                        source,
                        source_level,
                        ctx,
                        lambda c, e: done(committed + c, errors + e),
                        t_save=t_save,
                    )
                )
                return committed, errors
            if self._promoter.targets(level):
                self._drain_promotions()  # this level is written here: no promotion may touch it meanwhile
            t0 = time.perf_counter()
            if source is not None:
                src = CommittedCopy(source, self._buffers)
            elif isinstance(first, StagedSlot) and level is not levels[0]:
                src = StagedSlot(first.slot, fallback=True)  # the first level failed: write from the staging files
            else:
                src = first
            res = persist_level(
                level,
                ctx,
                src,
                self._states[level.name],
                pre if level is levels[0] else None,
                self._after_chunk,
            )
            self._metrics.observe_write(level.name, time.perf_counter() - t0)
            if res.retention_error:
                self.log.warning("checkpoint retention on %s failed: %s", level.name, res.retention_error)
            if res.errors:
                errors += res.errors
                self._metrics.failure(level.name)
                self.log.error("checkpoint step %d on %s failed: %s", ctx.step, level.name, "; ".join(res.errors))
                continue
            committed.append(level.name)
            self._metrics.observe_durable(level.name, time.perf_counter() - t_save)
            self._metrics.add_bytes(level.name, res.my_nbytes)
            # res is the job's agreed outcome (errors gathered from every rank, every node): one line says it all,
            # so rank 0 logs it and the other ranks keep theirs at DEBUG (also on node-local levels: a commit there
            # means every node committed its copy, and a line per node would flood a large job the same way).
            self.log.log(
                logging.INFO if self.rank == 0 and not level.is_memory else logging.DEBUG,
                "checkpoint step %d committed on %s (%s%s): %.1f MB in %.2f s",
                ctx.step,
                level.name,
                self._states[level.name].storage.display(res.path),
                ", on every node" if level.node_local else "",
                res.total_nbytes / 1e6,
                time.perf_counter() - t0,
            )
            if source is None and job is not None:
                self._release(job, linked=isinstance(first, StagedSlot) and first.slot.files)
            if source is None:
                source, source_level = res.path, level
        if source is None and job is not None:
            self._release(job, linked=True)
        if done is not None:
            done(committed, errors)
        return committed, errors

    def _run_emergency(self, infos: list[dict]) -> list[str]:
        """Write the newest staged snapshot to the most durable level unless every rank already has it there: from
        a committed copy on a faster level if every rank has one, else from the staged data."""
        steps = {i["newest"] for i in infos}
        if len(steps) != 1 or None in steps:
            self.log.error("emergency checkpoint impossible: ranks hold staged steps %s", sorted(map(str, steps)))
            return []
        step = steps.pop()
        last = self.levels[-1]
        faster = [lv for lv in self.levels[:-1] if (Path(lv.root) / step_dir_name(step) / MANIFEST_NAME).exists()]
        have = self._world.all_gather_json(
            {
                "last": any(s == step for s, _ in self._committed(last)),
                "fast": faster[0].name if faster else None,
            }
        )
        if all(h["last"] for h in have):
            return []
        bufset = self._pool.newest()
        staged = self._staged_meta[bufset.index]
        d = staged.described
        ctx_infos = self._world.all_gather_json(
            {
                "key": [0, step],
                "node": self.node_id,
                "nonce": secrets.token_hex(6),
                "extra": staged.extra,
                "tsig": d.tsig,
                "tensors": d.describes,
            }
        )
        ctx = self._context(step, ctx_infos, [i["tensors"] for i in ctx_infos])
        held = self._pool.acquire_specific(bufset)
        fast = {h["fast"] for h in have}
        if len(fast) == 1 and None not in fast:
            level = next(lv for lv in self.levels if lv.name == fast.pop())
            source = CommittedCopy(Path(level.root) / step_dir_name(step), self._buffers)
        elif bufset.slot is not None:
            source = StagedSlot(bufset.slot, fallback=True)
        else:
            source = HostBuffers(held, self._buffers)
        try:
            committed, errors = self._write_levels(ctx, [last], None, source, time.perf_counter())
        finally:
            self._pool.release(held)
        if errors:
            self.log.error("emergency checkpoint step %d failed: %s", step, "; ".join(errors))
        return committed

    # ------------------------------------------------------------------------------------------- loading

    def _committed(self, level: LevelSpec) -> list[tuple[int, Path]]:
        """The level's committed steps; none (and a warning) when its storage cannot be listed (a lost server)."""
        try:
            return self._states[level.name].storage.committed()
        except OSError as e:
            self.log.warning("checkpoint level %s (%s) cannot be listed, skipping it: %s", level.name, level.root, e)
            return []

    def _manifest(self, level: LevelSpec, path: Path) -> Manifest:
        """Manifests are immutable once committed; cache by modification time (not on object stores: read again)."""
        storage = self._states[level.name].storage
        if level.is_object:
            return storage.read_manifest(path)
        mtime = (path / "manifest.json").stat().st_mtime_ns
        cached = self._manifests.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        manifest = read_manifest(path)
        self._manifests[path] = (mtime, manifest)
        return manifest

    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint copy this rank can see, oldest first, fastest level first within a step."""
        out = []
        for order, level in enumerate(self.levels):
            shown = self._states[level.name].storage.display
            for step, path in self._committed(level):
                try:
                    m = self._manifest(level, path)
                except (CheckpointCorruptError, OSError):
                    out.append((step, order, CheckpointInfo(step, level.name, shown(path), complete=False)))
                    continue
                out.append(
                    (
                        step,
                        order,
                        CheckpointInfo(step, level.name, shown(path), m.nbytes, m.complete, m.node_id, m.created_unix),
                    )
                )
        return [info for _, _, info in sorted(out, key=lambda x: (x[0], x[1]))]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint over all levels (this rank's view; load() agrees across ranks)."""
        infos = self.list()
        return max(infos, key=lambda i: i.step) if infos else None

    def _candidates(self, targets: list[LoadTarget], strict: bool, excluded: set, reasons: dict) -> dict[int, list]:
        """step -> [(level, path, manifest)] this rank can serve (all needed chunks present, shapes match)."""
        found: dict[int, list] = {}
        for level in self.levels:
            for step, path in self._committed(level):
                if (step, level.name) in excluded:
                    continue
                try:
                    manifest = self._manifest(level, path)
                except (CheckpointCorruptError, OSError) as e:
                    reasons[step] = f"step {step} on {level.name}: {e}"
                    continue
                why = self._cannot_serve(manifest, targets, strict)
                if why:
                    reasons[step] = f"step {step} on {level.name} ({path}): {why}"
                    continue
                found.setdefault(step, []).append((level, path, manifest))
        return found

    @staticmethod
    def _cannot_serve(manifest: Manifest, targets: list[LoadTarget], strict: bool) -> str | None:
        for t in targets:
            entry = manifest.tensors.get(t.name)
            if entry is None and not strict:
                continue
            problem = mismatch(entry, t)
            if problem:
                return problem
            holes = missing_chunks(entry, t.start, t.stop)
            if holes:
                return f"this copy lacks chunks {holes[:4]} of {t.name} needed by this rank"
        return None

    def load(
        self, tensors: dict[str, "torch.Tensor | Shard"], step: int | None = None, strict: bool = True
    ) -> LoadResult:
        """Fill `tensors` in place from the newest checkpoint every rank can serve (or `step`); fall back to older
        valid checkpoints on a missing or corrupt chunk. Collective over the checkpoint group."""
        t0 = time.perf_counter()
        try:
            self.wait_durable()  # collective: every rank drains its queue, so load's collectives line up
        except CheckpointError as e:
            self.log.error("pending checkpoint saves failed before load: %s", e)
        targets = [LoadTarget.of(name, value) for name, value in tensors.items()]
        excluded, fallbacks, reasons = set(), [], {}
        while True:
            mine = self._candidates(targets, strict, excluded, reasons)
            if step is not None:
                mine = {s: v for s, v in mine.items() if s == step}
            views = self._world.all_gather_json(sorted(mine))
            common = set(views[0]).intersection(*map(set, views[1:]))
            if not common:
                fallbacks += [reasons[s] for s in sorted(reasons, reverse=True)]
                raise CheckpointError(
                    f"rank {self.rank}: no checkpoint{'' if step is None else f' at step {step}'} that every rank can "
                    f"load in {[lv.root for lv in self.levels]}. Skipped: {fallbacks or 'none found'}"
                )
            chosen = max(common)
            level, path, manifest = mine[chosen][0]
            error, nread = self._read_all(level, path, manifest, targets)
            statuses = self._world.all_gather_json(error)
            failed = [(r, e) for r, e in enumerate(statuses) if e]
            if not failed:
                break
            for r, e in failed:
                fallbacks.append(f"rank {r}: step {chosen}: {e}")
                self.log.warning("checkpoint step %d unusable on rank %d, falling back: %s", chosen, r, e)
            if error:
                excluded.add((chosen, level.name))
        fallbacks = [reasons[s] for s in sorted(reasons, reverse=True) if s > chosen] + fallbacks
        missing = [t.name for t in targets if t.name not in manifest.tensors]
        rank_extra = manifest.rank_extra.get(self.rank, manifest.extra) if self.rank < manifest.world_size else None
        seconds = time.perf_counter() - t0
        self.log.info(
            "restored step %d from %s (%s) in %.2f s, %.1f MB read%s",
            chosen,
            level.name,
            self._states[level.name].storage.display(path),
            seconds,
            nread / 1e6,
            f", {len(fallbacks)} newer skipped" if fallbacks else "",
        )
        shown = self._states[level.name].storage.display(path)
        return LoadResult(chosen, manifest.extra, level.name, shown, seconds, nread, fallbacks, rank_extra, missing)

    def discard_after(self, step: int) -> list[str]:
        """The run continues from ``step`` (just loaded): retire committed checkpoints of later steps on the levels
        this rank commits (every node's first rank on node-local levels, rank 0 on shared ones).

        They belong to an abandoned trajectory, typically newer copies that only some nodes held. Left in place,
        they would outrank the new saves of the same steps: retention would retire the fresh checkpoints (and a
        promotion reading one would find it gone), and a later load could pick a stale one. Not done by load()
        itself, which may be asked for an older step on purpose. Returns the retired paths."""
        self.wait_durable()
        retired = []
        for level in self.levels:
            committer = (self._local.rank if level.node_local else self.rank) == 0
            if committer:
                storage = self._states[level.name].storage
                try:
                    retired += [storage.display(p) for p in storage.retire_after(step, secrets.token_hex(4))]
                except OSError as e:  # a lost object store: its later steps stay until it can be reached
                    self.log.warning("could not retire steps after %d on %s: %s", step, level.name, e)
        if retired:
            self.log.warning(
                "continuing from step %d: retired %d later checkpoint(s) of an abandoned trajectory: %s",
                step,
                len(retired),
                retired,
            )
        return retired

    def _read_all(
        self, level: LevelSpec, path: Path, manifest: Manifest, targets: list[LoadTarget]
    ) -> tuple[str | None, int]:
        nread = 0
        reader = self._states[level.name].storage.read_chunk
        try:
            with ThreadPoolExecutor(self._read_threads, thread_name_prefix="ckpt-read") as pool:
                for t in targets:
                    if t.name in manifest.tensors:
                        nread += read_range(path, manifest, t, self._scratch, pool, reader)
        except (CheckpointCorruptError, OSError) as e:
            return str(e), nread
        return None, nread
