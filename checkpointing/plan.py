"""Who writes which chunk: computed identically on every rank from the all-gathered layout, so no negotiation.

Replicated tensors (every rank holds the whole tensor): chunks are spread over the writing ranks, balanced by bytes
(node-local level: the ranks of this node, so every node writes a complete copy; shared level: all ranks).
Shard tensors: a chunk lying inside one rank's flat range is written by that rank; a chunk straddling a partition
boundary is written once per copy, by the copy's rank holding most of it, after the other holders send it their few
pieces point-to-point (never the whole tensor to one rank).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from checkpointing.slots import OwnedChunk, StagePlan
from checkpointing.zarr_store import Grid, torch_dtype


@dataclass(frozen=True)
class TensorLayout:
    """The global picture of one tensor at save time."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    grid: Grid
    ranges: tuple[tuple[int, int, int], ...]  # (rank, start, stop) of every rank's flat range (shard layout)


@dataclass(frozen=True)
class ChunkTask:
    """A chunk this rank writes: pieces (source rank, start, stop) that together cover the chunk's real data."""

    name: str
    chunk: int
    pieces: tuple[tuple[int, int, int, int], ...]  # (src rank, start, stop, tag)


@dataclass
class RankPlan:
    """This rank's work on one level: chunks to write and boundary pieces to send to their chunk's writer."""

    writes: list[ChunkTask] = field(default_factory=list)
    sends: list[tuple[str, int, int, int, int]] = field(default_factory=list)  # (name, dst, start, stop, tag)


def global_layouts(infos: list[dict], chunk_bytes: int) -> dict[str, TensorLayout]:
    """Merge every rank's view into one layout per tensor; ValueError names the tensor and ranks that disagree."""
    first = infos[0]["tensors"]
    layouts = {}
    for rank, info in enumerate(infos):
        if set(info["tensors"]) != set(first):
            diff = sorted(set(info["tensors"]) ^ set(first))
            raise ValueError(f"rank {rank} saves a different set of tensors than rank 0 (differing: {diff[:5]})")
    for name in sorted(first):
        shape, dtype, layout = tuple(first[name][0]), first[name][1], first[name][2]
        ranges = []
        for rank, info in enumerate(infos):
            r_shape, r_dtype, r_layout, start, stop = info["tensors"][name]
            if (tuple(r_shape), r_dtype, r_layout) != (shape, dtype, layout):
                raise ValueError(
                    f"tensor {name}: rank {rank} has {r_layout} {r_dtype}{list(r_shape)} but rank 0 has "
                    f"{layout} {dtype}{list(shape)}"
                )
            ranges.append((rank, int(start), int(stop)))
        grid = Grid.for_shape(shape, torch_dtype(dtype).itemsize, chunk_bytes)
        layouts[name] = TensorLayout(name, shape, dtype, layout, grid, tuple(ranges))
    return layouts


def _shard_chunk_pieces(
    t: TensorLayout, chunk: int, load: dict[int, int], copy_ranks: set[int] | None
) -> tuple[int, list[tuple[int, int, int]]] | None:
    """(writer rank, pieces) for one chunk of a Shard tensor in one copy, or None if no rank of the copy holds any of
    it. The writer is a rank of the copy (`copy_ranks`, None = every rank); pieces may come from any rank."""
    cs, ce = t.grid.chunk_range(chunk)
    holders = [(r, max(a, cs), min(b, ce)) for r, a, b in t.ranges if min(b, ce) > max(a, cs)]
    local = [h for h in holders if copy_ranks is None or h[0] in copy_ranks]
    if not local:
        if copy_ranks is None:
            raise ValueError(
                f"tensor {t.name}: elements [{cs}, {ce}) are held by no rank (Shard flat ranges leave a gap)"
            )
        return None
    full = [r for r, a, b in local if a == cs and b == ce]
    if full:
        writer = min(full, key=lambda r: (load[r], r))
        return writer, [(writer, cs, ce)]
    writer = max(local, key=lambda h: (h[2] - h[1], -h[0]))[0]
    pieces, pos = [], cs
    while pos < ce:
        covering = [(r, a, b) for r, a, b in holders if a <= pos < b]
        if not covering:
            raise ValueError(f"tensor {t.name}: element {pos} is held by no rank (Shard flat ranges leave a gap)")
        own = [h for h in covering if h[0] == writer]
        r, _, b = own[0] if own else max(covering, key=lambda h: (h[2], -h[0]))
        pieces.append((r, pos, b))
        pos = b
    return writer, pieces


def plan_for_rank(layouts: dict[str, TensorLayout], rank: int, nodes: list[str] | None) -> RankPlan:
    """This rank's chunk writes and piece sends on one level.

    nodes=None: a shared level, one copy written by all ranks. Otherwise nodes[r] is rank r's node and every node
    writes its own copy: all replicated chunks, and every Shard chunk one of its ranks holds a piece of (boundary
    chunks included, so a node can restore its own ranks from its own copy)."""
    world = 1 + max([rank, *(x[0] for t in layouts.values() for x in t.ranges)])
    copies = [None] if nodes is None else [{r for r, n in enumerate(nodes) if n == node} for node in sorted(set(nodes))]
    load = {r: 0 for r in range(world)}
    plan, tag = RankPlan(), 0
    for copy_ranks in copies:
        for t in layouts.values():
            if t.layout != "shard":
                continue
            for c in range(t.grid.n_chunks):
                owned = _shard_chunk_pieces(t, c, load, copy_ranks)
                if owned is None:
                    continue
                writer, pieces = owned
                load[writer] += t.grid.chunk_nbytes
                tagged = []
                for src, a, b in pieces:
                    piece_tag = -1 if src == writer else tag
                    tag += src != writer
                    tagged.append((src, a, b, piece_tag))
                    if src == rank and writer != rank:
                        plan.sends.append((t.name, writer, a, b, piece_tag))
                if writer == rank:
                    plan.writes.append(ChunkTask(t.name, c, tuple(tagged)))
        writers = sorted(copy_ranks) if copy_ranks is not None else list(range(world))
        for t in layouts.values():
            if t.layout == "shard":
                continue
            for c in range(t.grid.n_chunks):
                writer = min(writers, key=lambda r: (load[r], r))
                load[writer] += t.grid.chunk_nbytes
                if writer == rank:
                    a, b = t.grid.chunk_range(c)
                    plan.writes.append(ChunkTask(t.name, c, ((rank, a, b, -1),)))
    return plan


class PlanCache:
    """plan_for_rank and the matching StagePlan, computed once per (layout, writers) and reused every save:
    the planner is a Python loop over every chunk of every tensor."""

    def __init__(self) -> None:
        self._digest: str | None = None
        self._plans: dict[tuple, RankPlan] = {}
        self._stage: dict[tuple, StagePlan] = {}
        self._lock = threading.RLock()  # the caller's thread plans zero-copy staging, the persister writes

    def _key(self, layout_digest: str, rank: int, nodes: list[str] | None) -> tuple:
        if layout_digest != self._digest:
            self._digest, self._plans, self._stage = layout_digest, {}, {}
        return rank, None if nodes is None else tuple(nodes)

    def rank_plan(
        self, layout_digest: str, layouts: dict[str, TensorLayout], rank: int, nodes: list[str] | None
    ) -> RankPlan:
        with self._lock:
            key = self._key(layout_digest, rank, nodes)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = plan_for_rank(layouts, rank, nodes)
            return plan

    def stage_plan(
        self, layout_digest: str, layouts: dict[str, TensorLayout], rank: int, nodes: list[str] | None
    ) -> StagePlan:
        with self._lock:
            key = self._key(layout_digest, rank, nodes)
            sp = self._stage.get(key)
            if sp is None:
                plan = self.rank_plan(layout_digest, layouts, rank, nodes)
                sp = self._stage[key] = stage_plan(
                    f"{layout_digest}/{rank}/{','.join(nodes or ['*'])}", layouts, rank, plan
                )
            return sp


def stage_plan(key: str, layouts: dict[str, TensorLayout], rank: int, plan: RankPlan) -> StagePlan:
    """Byte ranges of this rank's local tensors that go into each chunk it writes, and into each piece it sends."""
    chunks = []
    for task in plan.writes:
        t = layouts[task.name]
        isz, my_start = t.grid.itemsize, t.ranges[rank][1]
        cs, ce = t.grid.chunk_range(task.chunk)
        rel = f"{task.name}/{t.grid.chunk_key(task.chunk)}"
        if len(task.pieces) == 1 and task.pieces[0][0] == rank:
            chunks.append(
                OwnedChunk(
                    task.name, task.chunk, rel, t.grid.chunk_nbytes, True, (cs - my_start) * isz, (ce - my_start) * isz
                )
            )
        else:
            own = tuple(
                ((a - my_start) * isz, (b - my_start) * isz, (a - cs) * isz)
                for src, a, b, _ in task.pieces
                if src == rank
            )
            chunks.append(OwnedChunk(task.name, task.chunk, rel, t.grid.chunk_nbytes, False, own=own))
    sends = []
    for name, _, a, b, _ in plan.sends:
        t = layouts[name]
        isz, my_start = t.grid.itemsize, t.ranges[rank][1]
        sends.append((name, (a - my_start) * isz, (b - my_start) * isz))
    return StagePlan(key, tuple(chunks), tuple(sends))
