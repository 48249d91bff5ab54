"""Which staging slot a save stages into, and preparing slots off the training loop (see slots.py for the slots).

A save can stage zero-copy into a slot once every rank agreed on the layout of its tensors, because the slot holds
only the chunks this rank writes under that layout's plan. The layout is agreed in a job gather: a save's own (so
that save itself stages into host buffers) or, before any save, CheckpointManager.prepare's. The planner answers
the caller's thread (save: may this save stage zero-copy, into which pool and plan?) and the persist thread (after
a save or on prepare: fault the next slot in now, not on the caller's path). Both threads call it, so the pools and
plans it creates are guarded by one lock.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from checkpointing.jobs import AgreedLayout, Described
from checkpointing.plan import PlanCache
from checkpointing.promote import Promoter
from checkpointing.slots import SlotPool, StagePlan
from checkpointing.staging import BufferPool
from checkpointing.tiers import LevelSpec


class SlotPlanner:
    """The zero-copy staging decisions of one rank (see the module docstring). `slots` is the manager's table of
    pools per level name, filled here; `agreed` returns the layout every rank agreed on last."""

    def __init__(
        self,
        rank: int,
        node_id: str,
        pool: BufferPool,
        slots: dict[str, SlotPool],
        plans: PlanCache,
        agreed,
        log: logging.Logger,
    ) -> None:
        self.rank, self.node_id, self.log = rank, node_id, log
        self._pool, self._slots, self._plans, self._agreed = pool, slots, plans, agreed
        self._lock = threading.Lock()

    def zero_copy_layout(self, described: Described) -> AgreedLayout | None:
        """The agreed layout a save of these tensors can stage zero-copy against, or None: nothing agreed yet,
        tensors off the CPU, or this rank's tensors changed since (then it plans with everyone first)."""
        agreed = self._agreed()
        if agreed is None or not described.all_cpu:
            return None
        return agreed if agreed.tensors_digests[self.rank] == described.tensors_digest else None

    def slot_pool(self, level: LevelSpec, agreed: AgreedLayout) -> SlotPool:
        """The zero-copy staging slots of `level` on this rank, created on first use. Files on the level itself when
        it is node memory every writer of the level can link from, else host memory the persister writes out."""
        with self._lock:
            pool = self._slots.get(level.name)
            if pool is None:
                files = level.is_memory and (level.node_local or len(set(agreed.nodes)) == 1)
                slots = level.keep_last + self._pool.size + 1 + Promoter.MAX_PENDING if files else self._pool.size + 1
                pool = self._slots[level.name] = SlotPool(
                    Path(level.root) if files else None, f"{self.node_id}-r{self.rank}", slots
                )
            return pool

    def stage_plan(self, level: LevelSpec, agreed: AgreedLayout) -> StagePlan:
        """What this rank stages zero-copy for `level` under the agreed layout (cached per layout)."""
        with self._lock:
            return self._plans.stage_plan(
                agreed.digest, agreed.layouts, self.rank, agreed.nodes if level.node_local else None
            )

    def prepare(self, level: LevelSpec, described: Described, agreed: AgreedLayout) -> bool:
        """CheckpointManager.prepare, on the persist thread once `agreed` is: fault in the slot the first save of
        these tensors stages into on `level`. True if a slot is ready; False when they cannot stage zero-copy
        (not on the CPU) or preparing failed (a full memory level: the first save reports it, as without prepare)."""
        return described.all_cpu and self._prewarm(level, agreed, "the first save's")

    def prewarm(self, level: LevelSpec, described: Described) -> None:
        """After a save whose first level is `level`, on the persist thread: prepare the slot the next save of the
        same tensors stages into (see SlotPool.prewarm). It matters twice: after the first save of a layout that no
        prepare() agreed on, which staged into host buffers because its plan was agreed in its own gather (those
        buffers are freed first, so one copy of the state is held, not two), and on memory levels, where the slot
        of the save just committed stays linked into that checkpoint and the next save needs another."""
        agreed = self.zero_copy_layout(described)
        if agreed is not None:
            self._pool.drop_free_buffers()
            self._prewarm(level, agreed, "the next save's")

    def _prewarm(self, level: LevelSpec, agreed: AgreedLayout, whose: str) -> bool:
        """SlotPool.prewarm for `level` under `agreed`; True if a prepared slot is ready. A full memory level
        (OSError) is logged, not raised: the save that needs the slot reports it, as it would without the prewarm."""
        pool = self.slot_pool(level, agreed)
        try:
            pool.prewarm(self.stage_plan(level, agreed))
        except OSError as e:
            self.log.warning("checkpoint level %s: preparing %s staging slot failed: %s", level.name, whose, e)
            return False
        return pool.stats().ready > 0
