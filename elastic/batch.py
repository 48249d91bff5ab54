"""The global-batch invariant: global_batch sequences per optimizer step, for any world size.

Step ``s`` consumes the global sample indices ``[s * G, (s + 1) * G)``. They are split into contiguous, as-even-as-
possible per-rank ranges (10 over 3 ranks -> 4, 3, 3) and each rank cuts its range into micro-batches of at most
``micro_batch``. Each rank divides its summed per-sample loss by G and gradients are SUM-reduced, so the optimizer
sees the mean gradient over exactly the same G samples whatever the world size.
"""

from __future__ import annotations

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
