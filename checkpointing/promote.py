"""Asynchronous promotion: copying a committed checkpoint to the slower levels without holding up the next saves.

Promoting to a disk level costs copies and fsync round trips (tens of ms to seconds). Done inline, the persist
thread could not commit the next fast-level (L0) saves meanwhile, and with every staging buffer in flight the
training loop waits. Here the promoter thread does the slow work (copy + fsync on every rank; manifest, rename and
retention on the level's committer) and the collectives stay on the persist thread: each rank's progress rides in
the all_gather the persister does anyway for the next job (or in a drain loop at flush/close/emergency time), and
every rank advances the same state machine from the same gathered data, so they stay in lockstep:

    copy    every rank copies its chunks from the committed fast copy (kept from retention until done), syncs
            them and reports its records; once all reported, each level committer commits
    commit  the committers report errors and the spare skeleton they prepared; then the next level, or the save's
            `durable` future resolves

Runs only one promotion at a time, with one queued behind it. When a newer step's promotion arrives while that
queue is full, the queued one gives way (replace_queued): the slower level gets the newest step, the steps in between
count as skipped there, and neither the persist thread nor training waits for the slow level.

All state here is touched by the persist thread, except what the promoter thread fills in for the head promotion
(`mine`, `commit_result`), which the persist thread reads only after the promoter said it finished (`idle()`), and
the level's LevelState, which only the promoter uses while that level has a promotion in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from checkpointing import commit
from checkpointing.commit import LevelState, Target
from checkpointing.context import SaveContext, level_comm
from checkpointing.persist import RankOutcome, outcome_dict, write_chunks
from checkpointing.sources import Buffers, CommittedCopy
from checkpointing.tiers import LevelSpec


@dataclass
class Promotion:
    """One save's remaining levels, promoted from `src` (a committed copy on `src_level`)."""

    step: int
    levels: list[LevelSpec]
    src: Path
    src_level: LevelSpec
    ctx: SaveContext
    on_done: object  # callable(committed levels, errors) run by the persist thread
    committed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    t_save: float = 0.0
    phase: str = "copy"
    t_level: float = 0.0
    # filled by the promoter thread for the current level
    target: Target | None = None
    mine: RankOutcome | None = None
    commit_result: dict | None = None
    copy_errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> list:
        return [self.step, self.levels[0].name]


class Promoter:
    """The promoter thread and the lockstep state machine driving it (see the module docstring)."""

    MAX_PENDING = 2

    def __init__(self, states: dict[str, LevelState], log: logging.Logger, metrics) -> None:
        self.pending: list[Promotion] = []
        self._states = states
        self._log = log
        self._metrics = metrics
        self._buffers = Buffers()  # the promoter thread's
        self._q: queue.Queue = queue.Queue()
        self._busy = threading.Event()
        self._idle = threading.Condition()
        self._running = 0
        self._thread = threading.Thread(target=self._loop, name="ckpt-promoter", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ persist thread side

    def targets(self, level: LevelSpec) -> bool:
        return any(level.name in [lv.name for lv in p.levels] for p in self.pending)

    def pinned(self, level_name: str) -> set[str]:
        """Committed directories on `level_name` that pending promotions still read from."""
        return {p.src.name for p in self.pending if p.src_level.name == level_name}

    def replace_queued(self, promo: Promotion, level_order: list[LevelSpec]) -> Promotion | None:
        """With the queue full, the queued promotion (not started: only the head runs) gives way to `promo`, which
        takes over its levels too: a slower level that cannot keep up gets the newest step instead of making the
        persist thread (and through it training) wait. Returns the replaced promotion, or None when the two do not
        promote from the same level (then the caller waits as before). Every rank decides alike: `pending` is
        lockstep state."""
        if len(self.pending) < self.MAX_PENDING:
            return None
        queued = self.pending[-1]
        if queued is self.pending[0] or queued.src_level.name != promo.src_level.name:
            return None
        wanted = {lv.name for lv in queued.levels} | {lv.name for lv in promo.levels}
        promo.levels = [lv for lv in level_order if lv.name in wanted]
        self.pending[-1] = promo
        self._states[promo.src_level.name].pinned = self.pinned(promo.src_level.name)
        return queued

    def add(self, promo: Promotion) -> None:
        self.pending.append(promo)
        self._states[promo.src_level.name].pinned = self.pinned(promo.src_level.name)
        if len(self.pending) == 1:
            self._start_copy(promo)

    def report(self) -> dict | None:
        """This rank's progress on the head promotion, for the next gather (None: nothing to report)."""
        if not self.pending or self._running:
            return None
        head = self.pending[0]
        out = {"id": head.key, "copied": None, "committed": None}
        if head.mine is not None:
            out["copied"] = outcome_dict(head.mine, head.target.location)
        if head.phase == "commit" and head.commit_result is not None:
            out["committed"] = head.commit_result
        return out

    def advance(self, infos: list[dict], world_rank: int) -> None:
        """Move the head promotion along with what every rank reported in a gather (same decision everywhere)."""
        if not self.pending:
            return
        head = self.pending[0]
        reports = [i.get("promo") for i in infos]
        if any(r is None or r["id"] != head.key for r in reports):
            return
        level, ctx = head.levels[0], head.ctx
        if head.phase == "copy":  # commit.py step 5
            if any(r["copied"] is None for r in reports):
                return
            group = [r for rank, r in enumerate(reports) if not level.node_local or ctx.nodes[rank] == ctx.node_id]
            group_errors = commit.group_errors(level, [r["copied"] for r in group])
            head.copy_errors = sorted({e for r in reports for e in r["copied"]["errors"]} | set(group_errors))
            head.phase = "commit"
            if level_comm(level, ctx).rank == 0:
                records = [rec for r in group for rec in r["copied"]["records"]]
                self._submit(("commit", head, records, group_errors))
            else:
                head.commit_result = {"errors": [], "next": None, "node": ctx.node_id}
            return
        if any(r["committed"] is None for r in reports):  # commit.py step 7
            return
        errors = sorted(set(head.copy_errors) | {e for r in reports for e in r["committed"]["errors"]})
        commit.adopt(self._states[level.name], ctx.node_id, [r["committed"] for r in reports])
        self._metrics.observe_write(level.name, time.perf_counter() - head.t_level)
        if errors:
            head.errors += errors
            self._metrics.failure(level.name)
            self._log.error("checkpoint step %d on %s failed: %s", head.step, level.name, "; ".join(errors))
        else:
            head.committed.append(level.name)
            self._metrics.observe_durable(level.name, time.perf_counter() - head.t_save)
            self._metrics.add_bytes(level.name, head.mine.nbytes)
            total = sum(r["copied"]["nbytes"] for r in reports)
            # every rank reached this with the same reports: rank 0 speaks for the job (see CheckpointManager)
            self._log.log(
                logging.INFO if world_rank == 0 and not level.is_memory else logging.DEBUG,
                "checkpoint step %d committed on %s (%s%s): %.1f MB in %.2f s (promoted from %s)",
                head.step,
                level.name,
                self._states[level.name].storage.display(self._states[level.name].storage.final_location(head.step)),
                ", on every node" if level.node_local else "",
                total / 1e6,
                time.perf_counter() - head.t_level,
                head.src_level.name,
            )
        head.levels.pop(0)
        if head.levels:
            self._start_copy(head)
            return
        self.pending.pop(0)
        src_state = self._states[head.src_level.name]
        src_state.pinned = self.pinned(head.src_level.name)
        if level_comm(head.src_level, ctx).rank == 0:  # retire what the promotion kept beyond keep_last
            try:  # only committed ones: another rank may already be writing the next save on that level
                commit.retire_old(src_state, ctx)
            except OSError as e:
                self._log.warning("checkpoint retention on %s failed: %s", head.src_level.name, e)
        head.on_done(head.committed, head.errors)
        if self.pending:
            self._start_copy(self.pending[0])

    def wait_idle(self) -> None:
        """Block until the promoter thread finished what it was given (then report() is complete)."""
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()

    # ----------------------------------------------------------------------------------- promoter thread

    def _start_copy(self, promo: Promotion) -> None:
        promo.phase, promo.mine, promo.commit_result, promo.files = "copy", None, None, {}
        promo.t_level = time.perf_counter()
        self._submit(("copy", promo))

    def _submit(self, task) -> None:
        with self._idle:
            self._running += 1
        self._q.put(task)

    def _loop(self) -> None:
        while (task := self._q.get()) is not None:
            try:
                if task[0] == "copy":
                    self._copy(task[1])
                else:
                    self._commit(*task[1:])
            except Exception as e:  # noqa: BLE001 (thread boundary: reported as this rank's error, so no rank waits)
                promo = task[1]
                msg = f"{promo.ctx.who(promo.levels[0])}: promotion failed: {type(e).__name__}: {e}"
                if task[0] == "copy":
                    promo.mine = RankOutcome(errors=[msg])
                    promo.target = promo.target or Target(Path(promo.levels[0].root), False)
                else:
                    promo.commit_result = {"errors": [msg], "next": {}, "node": promo.ctx.node_id}
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

    def _copy(self, promo: Promotion) -> None:
        """commit.py steps 1-4 for the head promotion's level: copy this rank's chunks from the committed source."""
        level, ctx = promo.levels[0], promo.ctx
        state = self._states[level.name]
        promo.target = target = commit.begin(state, ctx)
        try:
            commit.prepare(state, ctx, target, level_comm(level, ctx).rank == 0)
        except OSError as e:
            mine = RankOutcome(errors=[f"{ctx.who(level)}: {target.location}: {e}"])
        else:
            chunks = CommittedCopy(promo.src, self._buffers).chunks(level, ctx)
            mine = write_chunks(state.storage, target, chunks, ctx.who(level))
        if not mine.errors:
            error = commit.make_durable(state, ctx, target, [rec[2] for rec in mine.records])
            mine.errors += [error] if error else []
        promo.mine = mine

    def _commit(self, promo: Promotion, records: list[list], errors: list[str]) -> None:
        """commit.py step 6 (the level's committer): commit, or discard when a rank of the group failed."""
        level, ctx = promo.levels[0], promo.ctx
        state = self._states[level.name]
        result = commit.commit(state, ctx, promo.target, records, bool(errors))
        if result.retention_error:
            self._log.warning("checkpoint retention on %s failed: %s", level.name, result.retention_error)
        promo.commit_result = {
            "errors": [result.error] if result.error else [],
            "next": commit.announcement(state),
            "node": ctx.node_id,
        }
