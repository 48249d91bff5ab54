"""The cross-rank coordinator: the persist thread, which agrees with every rank on the next job and runs it.

Every rank's persist thread takes its next job (a save, or a control call: flush, emergency, prepare, stop), and all
gather their job's key (jobs.JobKey) with what the job needs to be agreed on: this rank's node and tensors digest,
its tensor descriptions and static extra when they changed, the save's extra, chunks pre-linked into a spare
skeleton, and its promotion progress. The largest key wins: a rank holding a smaller one is behind (it staged a
save the others skipped, or missed a control call) and drops its job, and the others gather again with theirs, so
a disagreement never deadlocks a collective. Then every rank runs the same job with the same data:

  save      the agreed SaveContext (layouts from the cache while every rank's tensors are unchanged), the first
            level written from the staged data (persist.persist_level), then promotion to the slower levels on
            the promoter thread (promote.Promoter), which reports its progress in the next gathers
  flush     drain the promotions, then resolve (wait_durable)
  emergency write the newest staged snapshot to the most durable level (emergency_save)
  prepare   agree on the layout of the tensors every rank announced, then prepare this rank's first staging
            slot (CheckpointManager.prepare; slot_planner.py)
  stop      drain, stop the promoter (close)

This thread is the only one that talks on the checkpoint process group, so collectives line up on every rank.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from pathlib import Path

from checkpointing.comm import Comm
from checkpointing.commit import LevelState, Target
from checkpointing.context import SaveContext, who
from checkpointing.errors import CheckpointError
from checkpointing.agreement import Layouts
from checkpointing.jobs import ControlJob, JobKey, WriteJob
from checkpointing.manifest import MANIFEST_NAME
from checkpointing.metrics import Metrics
from checkpointing.persist import ChunkHook, outcome_dict, persist_level, write_chunks
from checkpointing.plan import PlanCache
from checkpointing.promote import Promoter, Promotion
from checkpointing.sources import Buffers, ChunkSource, CommittedCopy, HostBuffers, StagedSlot
from checkpointing.slot_planner import SlotPlanner
from checkpointing.slots import SlotPool
from checkpointing.staging import BufferPool
from checkpointing.tiers import LevelSpec, step_dir_name


class Coordinator:
    """The persist thread and the state only it changes (see the module docstring). The manager's caller and
    stager threads hand it jobs through `queue`, in order, and the slot planner reads `layouts.agreed` for them
    (replaced, never mutated)."""

    def __init__(
        self,
        levels: list[LevelSpec],
        world: Comm,
        local: Comm,
        node_id: str,
        chunk_bytes: int,
        log: logging.Logger,
        metrics: Metrics,
        pool: BufferPool,
        slots: dict[str, SlotPool],
        states: dict[str, LevelState],
        plans: PlanCache,
        after_chunk: ChunkHook | None,
        static_extra: dict,
    ) -> None:
        self.levels, self.world, self.local, self.node_id = levels, world, local, node_id
        self.chunk_bytes, self.log, self._metrics = chunk_bytes, log, metrics
        self._pool, self._slots, self._states, self._plans = pool, slots, states, plans
        self._after_chunk = after_chunk  # fault tests: see persist.ChunkHook
        self._buffers = Buffers()  # this thread's (the promoter has its own)
        self._promoter = Promoter(states, log, metrics)
        self.staged_jobs: dict[int, WriteJob] = {}
        """BufferSet index -> the save it staged last (the stager fills it; emergency saves read it)."""
        self.layouts = Layouts(world, local, node_id, chunk_bytes, plans, static_extra)
        self.slots = SlotPlanner(world.rank, node_id, pool, slots, plans, lambda: self.layouts.agreed, log)
        """Zero-copy staging decisions; the caller's thread asks it too (save)."""
        self.queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._persist_loop, name="ckpt-persister", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def release(self, job: WriteJob, linked: bool) -> None:
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
            job = job or self.queue.get()
            if isinstance(job, WriteJob) and job.pre is None:
                self._prelink(job)
            info = self._job_info(job)
            info["promo"] = self._promoter.report()
            infos = self.world.all_gather_json(info)
            self.layouts.learn(infos)
            self._promoter.advance(infos, self.world.rank)
            keys = [JobKey.of(i["key"]) for i in infos]
            if keys[self.world.rank] < max(keys):
                self._drop(job, keys)
                job = None
                continue
            if any(k != keys[self.world.rank] for k in keys):
                continue  # others are dropping older jobs; agree again with the same job
            try:
                if isinstance(job, WriteJob):
                    self._run_write(job, infos)
                elif job.kind == "emergency":
                    self._drain_promotions()
                    job.done.set_result(self._run_emergency(infos))
                elif job.kind == "prepare":
                    job.done.set_result(self._run_prepare(job, infos))
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
        err = CheckpointError(f"rank {self.world.rank}: checkpoint persist thread failed: {type(exc).__name__}: {exc}")
        self.log.error("%s", err)
        if isinstance(job, WriteJob):
            self.release(job, linked=True)
            if not job.handle.durable.done():
                job.handle.durable.set_exception(err)
        elif not job.done.done():
            job.done.set_exception(err)

    def _job_info(self, job) -> dict:
        if isinstance(job, ControlJob):
            newest = self._pool.newest() if job.kind == "emergency" else None
            d = job.described
            return {
                "key": job.key,
                "kind": job.kind,
                "node": self.node_id,
                "newest": None if newest is None else newest.step,
                **({} if d is None else self.layouts.announce(d.tensors_digest, d.describes, always=False)),
            }
        d = job.described
        return {
            "key": job.key,
            "kind": "write",
            "node": self.node_id,
            "nonce": secrets.token_hex(6),
            **self.layouts.announce(d.tensors_digest, d.describes, always=False),
            "slot_layout": job.slot_layout,
            "pre": job.pre,
            "extra": job.extra,
            "levels": [lv.name for lv in job.levels],
        }

    def _prelink(self, job: WriteJob) -> None:
        """Zero-copy save into a spare skeleton: link the staged files before the job's gather, so the records
        travel in that gather and the level needs no records gather of its own. Undone if the job is dropped."""
        level = job.levels[0]
        state = self._states[level.name]
        sp = job.stage_plan
        if (
            job.slot is None
            or not job.slot.files
            or state.spare is None
            or state.spare_layout != job.slot_layout
            or sp.sends
            or not all(c.whole for c in sp.chunks)
        ):
            return
        chunks = StagedSlot(job.slot).chunks(None, None)
        outcome = write_chunks(
            state.storage, Target(state.spare, True), chunks, who(self.world.rank, self.node_id, level.name)
        )
        job.pre = outcome_dict(outcome, state.spare)

    def _drop(self, job, keys: list[JobKey], why: str | None = None) -> None:
        """Another rank is already past this job (or the job cannot be written as staged): resolve it without
        writing (counted as a skip)."""
        ahead = [r for r, k in enumerate(keys) if k > keys[self.world.rank]]
        if isinstance(job, WriteJob):
            self.release(job, linked=False)
            self._metrics.skip([lv.name for lv in job.levels])
            self.log.warning(
                "checkpoint step %d dropped: %s", job.step, why or f"ranks {ahead} did not stage it (busy)"
            )
            job.handle.durable.set_result([])
        else:
            job.done.set_exception(
                CheckpointError(
                    f"checkpoint control call {job.kind} #{job.seq} is out of step with ranks {ahead}: "
                    f"call wait_durable/emergency_save/close the same number of times on every rank"
                )
            )

    def _run_write(self, job: WriteJob, infos: list[dict]) -> None:
        try:
            ctx = self.layouts.context(job.step, infos)
        except ValueError as e:
            self.release(job, linked=False)
            job.handle.durable.set_exception(CheckpointError(f"checkpoint step {job.step}: {e}"))
            return
        stale = [r for r, i in enumerate(infos) if i["slot_layout"] not in (None, ctx.layout_digest)]
        if stale:  # staged zero-copy for a layout that changed meanwhile: the chunks it holds are not the plan
            self._drop(
                job, [JobKey.of(i["key"]) for i in infos], f"ranks {stale} staged it for a tensor layout that changed"
            )
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
        self.slots.prewarm(job.levels[0], job.described)

    def _run_prepare(self, job: ControlJob, infos: list[dict]) -> bool:
        """CheckpointManager.prepare: every rank announced its tensors in this gather, so the layout is agreed now,
        before the first save; then this rank's first slot is prepared (SlotPlanner.prepare)."""
        kinds = sorted({i["kind"] for i in infos})
        if kinds != ["prepare"]:
            raise ValueError(
                f"prepare() on rank {self.world.rank} met {kinds} on other ranks: call prepare on every rank of "
                f"the checkpoint group, in the same order as wait_durable/emergency_save/close"
            )
        return self.slots.prepare(job.level, job.described, self.layouts.agree(infos))

    def _superseded(self, replaced: Promotion, newer: Promotion) -> None:
        """A queued promotion gave way to a newer step's (Promoter.replace_queued): its save resolves with the levels
        it reached, and the levels it did not reach count as skipped (the newer step goes there instead)."""
        names = [lv.name for lv in replaced.levels]
        self._metrics.skip(names)
        self.log.log(
            logging.INFO if self.world.rank == 0 else logging.DEBUG,
            "checkpoint step %d not promoted to %s: step %d goes there instead (the slower level is still busy)",
            replaced.step,
            ", ".join(names),
            newer.step,
        )
        replaced.on_done(replaced.committed, replaced.errors)

    def _drain_promotions(self, keep: int = 0) -> None:
        """Finish pending promotions now until at most `keep` are left: each round waits for this rank's promoter,
        then gathers. Called at the same point of the job sequence on every rank, so the rounds line up."""
        while len(self._promoter.pending) > keep:
            self._promoter.wait_idle()
            infos = self.world.all_gather_json({"promo": self._promoter.report()})
            self._promoter.advance(infos, self.world.rank)

    def _write_levels(
        self,
        ctx: SaveContext,
        levels: list[LevelSpec],
        job: WriteJob | None,
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
                promo = Promotion(
                    ctx.step,
                    list(levels[i:]),
                    source,
                    source_level,
                    ctx,
                    lambda c, e: done(committed + c, errors + e),
                    t_save=t_save,
                )
                replaced = self._promoter.replace_queued(promo, self.levels)
                if replaced is not None:
                    self._superseded(replaced, promo)
                    return committed, errors
                if len(self._promoter.pending) >= Promoter.MAX_PENDING:
                    self._metrics.stats.waits += 1
                    self._drain_promotions(keep=Promoter.MAX_PENDING - 1)
                self._promoter.add(promo)
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
                logging.INFO if self.world.rank == 0 and not level.is_memory else logging.DEBUG,
                "checkpoint step %d committed on %s (%s%s): %.1f MB in %.2f s",
                ctx.step,
                level.name,
                self._states[level.name].storage.display(res.path),
                ", on every node" if level.node_local else "",
                res.total_nbytes / 1e6,
                time.perf_counter() - t0,
            )
            if source is None and job is not None:
                self.release(job, linked=isinstance(first, StagedSlot) and first.slot.files)
            if source is None:
                source, source_level = res.path, level
        if source is None and job is not None:
            self.release(job, linked=True)
        if done is not None:
            done(committed, errors)
        return committed, errors

    def _committed(self, level: LevelSpec) -> list[tuple[int, Path]]:
        """The level's committed steps; none when its storage cannot be listed (a lost object store)."""
        try:
            return self._states[level.name].storage.committed()
        except OSError as e:
            self.log.warning("checkpoint level %s (%s) cannot be listed: %s", level.name, level.root, e)
            return []

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
        have = self.world.all_gather_json(
            {
                "last": any(s == step for s, _ in self._committed(last)),
                "fast": faster[0].name if faster else None,
            }
        )
        if all(h["last"] for h in have):
            return []
        bufset = self._pool.newest()
        staged = self.staged_jobs[bufset.index]
        d = staged.described
        ctx_infos = self.world.all_gather_json(
            {
                "key": JobKey.save(step),
                "node": self.node_id,
                "nonce": secrets.token_hex(6),
                "extra": staged.extra,
                **self.layouts.announce(d.tensors_digest, d.describes, always=True),
            }
        )
        self.layouts.learn(ctx_infos)
        ctx = self.layouts.context(step, ctx_infos)
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
