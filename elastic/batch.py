"""The global-batch invariant: global_batch sequences per optimizer step, for any world size.

Step ``s`` consumes the global sample indices ``[s * G, (s + 1) * G)``. They are split into contiguous, as-even-as-
possible per-rank ranges (10 over 3 ranks -> 4, 3, 3) and each rank cuts its range into micro-batches of at most
``micro_batch``. Each rank divides its summed per-sample loss by G and gradients are SUM-reduced, so the optimizer
sees the mean gradient over exactly the same G samples whatever the world size.

Replicas mode retries a discarded step without recomputing the survivors' parts: ``orphan_shares`` splits the
departed members' samples over the survivors, so the step's G samples are still each used once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def split_evenly(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``total``, differing by at most one, larger pieces first."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class RankBatch:
    """The samples one rank processes in one optimizer step."""

    start: int
    """First global sample index of this rank's share."""
    count: int
    """How many samples this rank processes (its share of the global batch)."""
    micro_batches: tuple[tuple[int, int], ...]
    """(first global sample index, size) of each micro-batch, in order."""

    @property
    def sample_ids(self) -> range:
        return range(self.start, self.start + self.count)


def rank_batch(step: int, global_batch: int, micro_batch: int, rank: int, world_size: int) -> RankBatch:
    sizes = split_evenly(global_batch, world_size)
    start = step * global_batch + sum(sizes[:rank])
    count = sizes[rank]
    micro = tuple((start + off, min(micro_batch, count - off)) for off in range(0, count, micro_batch))
    return RankBatch(start=start, count=count, micro_batches=micro)


# ---------------------------------------------------------------------------------------------------------------
# Replicas mode: a step whose attempt was discarded runs again without recomputing the survivors' own parts.

Ranges = tuple[tuple[int, int], ...]
"""Pieces of a step's global batch, each (first global sample index, count), in increasing order."""


@dataclass(frozen=True)
class SampleShare:
    """Samples one member computes in one attempt: one or more contiguous pieces, cut into micro-batches."""

    ranges: Ranges
    """(first global sample index, count) of each piece, in the order they are computed."""
    micro_batch: int
    """Largest micro-batch; each piece is cut separately (a micro-batch never spans two pieces)."""

    @property
    def count(self) -> int:
        return sum(count for _, count in self.ranges)

    @property
    def micro_batches(self) -> tuple[tuple[int, int], ...]:
        """(first global sample index, size) of each micro-batch, in order (as ``RankBatch.micro_batches``)."""
        mb = self.micro_batch
        return tuple((start + off, min(mb, count - off)) for start, count in self.ranges for off in range(0, count, mb))

    @property
    def sample_ids(self) -> list[int]:
        return [i for start, count in self.ranges for i in range(start, start + count)]


def rank_ranges(step: int, global_batch: int, world_size: int) -> list[Ranges]:
    """Each rank's samples of ``step`` as ``rank_batch`` assigns them (a rank with no sample has no piece)."""
    shares = (rank_batch(step, global_batch, 1, rank, world_size) for rank in range(world_size))
    return [((s.start, s.count),) if s.count else () for s in shares]


def merge_ranges(pieces) -> Ranges:
    """The same samples as sorted pieces with adjacent and empty ones merged away."""
    merged: list[list[int]] = []
    for start, count in sorted(p for p in pieces if p[1] > 0):
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += count
        else:
            merged.append([start, count])
    return tuple((start, count) for start, count in merged)


def orphan_shares(
    step: int,
    global_batch: int,
    micro_batch: int,
    old_members: Sequence[str],
    new_members: Sequence[str],
    covered: Sequence[Ranges] | None = None,
) -> list[SampleShare]:
    """The samples each new quorum rank computes when it retries ``step`` keeping its own part of a discarded
    attempt: the departed members' parts ("orphans"), split as evenly as possible and in order over the new ranks.

    ``old_members``: the discarded attempt's members, by replica id, in quorum-rank order; ``new_members``: the
    retrying quorum's members, a subset of them, in its rank order. ``covered[i]``: the samples old rank i's kept
    gradient holds; default (a first retry) its ``rank_batch`` share. A retry that is itself discarded and retried
    again passes ``covered_after(...)`` of the previous retry, so chained retries stay exact. Adjacent orphaned
    pieces are merged (fewer, fuller micro-batches).

    With ``covered`` a partition of the step's samples over ``old_members``, the kept parts of ``new_members``
    and the returned shares are a partition of them too: every sample of the step is used exactly once. A pure
    function of its arguments, so every member computes the same split without talking to the others.
    """
    old, new = list(old_members), list(new_members)
    if len(set(old)) != len(old) or len(set(new)) != len(new):
        raise ValueError(f"members must be distinct: old {old}, new {new}")
    if not new or not set(new) <= set(old):
        raise ValueError(f"new members {new} must be a non-empty subset of the attempt's members {old}")
    if covered is None:
        covered = rank_ranges(step, global_batch, len(old))
    if len(covered) != len(old):
        raise ValueError(f"covered has {len(covered)} entries for {len(old)} members")
    staying = set(new)
    orphans = [piece for member, pieces in zip(old, covered, strict=True) if member not in staying for piece in pieces]
    shares: list[SampleShare] = []
    pieces = iter(orphans)
    start, left = 0, 0  # the part of the current orphaned piece not handed out yet
    for size in split_evenly(sum(count for _, count in orphans), len(new)):
        taken: list[tuple[int, int]] = []
        while size > 0:
            if left == 0:
                start, left = next(pieces)
            n = min(size, left)
            taken.append((start, n))
            start, left, size = start + n, left - n, size - n
        shares.append(SampleShare(ranges=merge_ranges(taken), micro_batch=micro_batch))
    return shares


def covered_after(
    old_members: Sequence[str], new_members: Sequence[str], covered: Sequence[Ranges], orphans: Sequence[SampleShare]
) -> list[Ranges]:
    """What each new rank's gradient holds after a retry: its kept part plus the orphans it computed."""
    index = {member: i for i, member in enumerate(old_members)}
    return [
        merge_ranges(covered[index[member]] + share.ranges) for member, share in zip(new_members, orphans, strict=True)
    ]
