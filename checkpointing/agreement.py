"""What every rank agreed on about the tensors being saved: their layouts, and the static part of each rank's extra.

A rank sends its tensor descriptions and its static extra (CheckpointManager(static_extra=...): config, HF config)
only in the first job gather after its tensors changed, and every rank sees every gather, so the tables here are
the same on every rank; the global layouts (and plans, zarr metadata) are computed once per layout digest.
"""

from __future__ import annotations

import hashlib
import json

from checkpointing.comm import Comm
from checkpointing.context import SaveContext
from checkpointing.jobs import AgreedLayout
from checkpointing.plan import PlanCache, global_layouts


class Layouts:
    """The persist thread's view of every rank's tensors (see the module docstring)."""

    def __init__(
        self, world: Comm, local: Comm, node_id: str, chunk_bytes: int, plans: PlanCache, static_extra: dict
    ) -> None:
        self.world, self.local, self.node_id, self.chunk_bytes = world, local, node_id, chunk_bytes
        self._plans = plans
        self.static_extra = static_extra
        self.agreed: AgreedLayout | None = None
        self._peer: dict[int, tuple[str, dict]] = {}  # rank -> (tensors digest, tensor descriptions)
        self._peer_static: dict[int, dict] = {}  # rank -> its static extra
        self._sent_digest: str | None = None

    def announce(self, tensors_digest: str, describes: dict, always: bool) -> dict:
        """This rank's part of a job gather: its tensors digest, plus its descriptions and static extra when they
        were not sent yet (or `always`)."""
        changed = always or tensors_digest != self._sent_digest
        return {
            "tensors_digest": tensors_digest,
            "tensors": describes if changed else None,
            "static": self.static_extra if changed else None,
        }

    def learn(self, infos: list[dict]) -> None:
        """Remember every rank's tensor descriptions and static extra: a rank sends them only when its tensors
        changed, and every rank sees every gather, so these tables are the same everywhere."""
        for r, info in enumerate(infos):
            if info.get("tensors") is not None:
                self._peer[r] = (info["tensors_digest"], info["tensors"])
            if info.get("static") is not None:
                self._peer_static[r] = info["static"]
        mine = infos[self.world.rank]
        if mine.get("tensors_digest") is not None:
            self._sent_digest = mine["tensors_digest"]

    def agree(self, infos: list[dict]) -> AgreedLayout:
        """The layout of the tensors every rank announced in this gather (a save's, or CheckpointManager.prepare's);
        computed once per layout digest, then taken from `agreed`. ValueError when a rank's descriptions are unknown."""
        digests = [i["tensors_digest"] for i in infos]
        nodes = [i["node"] for i in infos]
        layout_digest = hashlib.blake2b(
            json.dumps([digests, nodes, self.chunk_bytes]).encode(), digest_size=12
        ).hexdigest()
        agreed = self.agreed
        if agreed is None or agreed.digest != layout_digest:
            missing = [r for r, t in enumerate(digests) if self._peer.get(r, ("",))[0] != t]
            if missing:
                raise ValueError(f"tensor descriptions of ranks {missing} are unknown")
            describes = [self._peer[r][1] for r in range(len(infos))]
            layouts = global_layouts([{"tensors": d} for d in describes], self.chunk_bytes)
            agreed = AgreedLayout(layout_digest, layouts, nodes, digests)
            self.agreed = agreed
        return agreed

    def context(self, step: int, infos: list[dict]) -> SaveContext:
        """The agreed save context; layouts come from the cache when every rank's tensors are unchanged."""
        agreed = self.agree(infos)
        return SaveContext(
            step=step,
            nonce=infos[0]["nonce"],
            layouts=agreed.layouts,
            extras=[{**self._peer_static.get(r, {}), **i["extra"]} for r, i in enumerate(infos)],
            nodes=agreed.nodes,
            world=self.world,
            local=self.local,
            node_id=self.node_id,
            chunk_bytes=self.chunk_bytes,
            layout_digest=agreed.digest,
            plans=self._plans,
        )
