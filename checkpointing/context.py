"""What every rank agreed on for one save: the context the writers and the commit protocol work in."""

from __future__ import annotations

from dataclasses import dataclass, field

from checkpointing.comm import Comm
from checkpointing.plan import PlanCache, RankPlan, TensorLayout
from checkpointing.slots import StagePlan
from checkpointing.tiers import LevelSpec


@dataclass
class SaveContext:
    """What every rank agreed on for one save (from the all-gathered job info)."""

    step: int
    nonce: str
    layouts: dict[str, TensorLayout]
    extras: list[dict]
    nodes: list[str]
    world: Comm
    local: Comm
    node_id: str
    chunk_bytes: int
    layout_digest: str = ""
    plans: PlanCache = field(default_factory=PlanCache)

    def rank_plan(self, level: LevelSpec) -> RankPlan:
        return self.plans.rank_plan(self.layout_digest, self.layouts, self.world.rank, writers_for(level, self))

    def stage_plan(self, level: LevelSpec) -> StagePlan:
        return self.plans.stage_plan(self.layout_digest, self.layouts, self.world.rank, writers_for(level, self))

    def who(self, level: LevelSpec) -> str:
        return who(self.world.rank, self.node_id, level.name)


def who(rank: int, node_id: str, level_name: str) -> str:
    """How an error of one rank on one level starts: 'rank 3 (node-b) L1'."""
    return f"rank {rank} ({node_id}) {level_name}"


def writers_for(level: LevelSpec, ctx: SaveContext) -> list[str] | None:
    """The node of every rank on a node-local level (each node writes its own copy); None on a shared level."""
    return ctx.nodes if level.node_local else None


def level_comm(level: LevelSpec, ctx: SaveContext) -> Comm:
    """The group that commits one copy of the level: this node's ranks on a node-local level, else everyone."""
    return ctx.local if level.node_local else ctx.world
