"""The cross-replica gradient all-reduce, started in buckets while the backward pass still runs (what DDP's reducer
does for the restart mode), so most of it is hidden behind the backward of the earlier layers.

Call order, one step: ``arm(micro_batches)`` -> the forward/backward of the share -> ``complete()``. Backward passes
outside that (a retry's orphaned samples, orphans computed while a quorum forms) start nothing.

* Each parameter's post-accumulate-grad hook counts its accumulations while armed. On the last micro-batch's
  accumulation the parameter is ready; a bucket whose parameters are all ready copies their ``.grad`` into its slice
  of the flat reduction buffer and starts its SUM all-reduce.
* Buckets start strictly in bucket order on every replica (a bucket that is ready early waits for the ones before
  it): gloo and nccl match collectives by their order, and replicas that started buckets in different orders would
  reduce unrelated slices into each other.
* ``complete()`` starts whatever did not start during the backward (parameters without a gradient reduce zeros) and
  waits for every bucket: afterwards the buffer holds the sum over the quorum.

``.grad`` is never reduced in place: it stays this replica's local gradient, which a discarded step's retry reuses
(``elastic/ft/partial.py``). Buckets follow the reverse of the parameters' registration order, the order in which
backward usually produces them (DDP's heuristic); a different actual order costs overlap, never correctness. So
does a parameter that gets no gradient: its bucket, and every later one, starts only in ``complete()`` (DDP's
find_unused_parameters is not needed for correctness here, only for overlap).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class OverlappedReduce:
    def __init__(self, params: list[torch.Tensor], reduce: Callable[[torch.Tensor], object], bucket_bytes: int):
        """``reduce(tensor)`` starts a SUM all-reduce of ``tensor`` in place and returns its work (``.wait()``);
        ``bucket_bytes`` caps a bucket (one parameter larger than that is a bucket of its own)."""
        self.params = params
        self.reduce = reduce
        self.offsets: list[int] = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.flat = torch.empty(total, dtype=params[0].dtype if params else torch.float32)
        """The reduction buffer, parameters in registration order (``ReplicaStepper._set_grads`` reads it so)."""
        self.buckets: list[list[int]] = []
        """Parameter indices per bucket, buckets in start order; each bucket a contiguous range of ``flat``."""
        current: list[int] = []
        size = 0
        for i in reversed(range(len(params))):
            nbytes = params[i].numel() * params[i].element_size()
            if current and size + nbytes > bucket_bytes:
                self.buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            self.buckets.append(current)
        self.bucket_of = {i: b for b, members in enumerate(self.buckets) for i in members}
        self.expected = 0
        self.accumulations = [0] * len(params)
        self.waiting = [0] * len(self.buckets)
        self.next_bucket = 0
        self.works: list = []
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self._accumulated(i))

    @property
    def in_flight(self) -> bool:
        """A step's reduction is armed or started and not yet completed."""
        return self.expected > 0

    def arm(self, micro_batches: int) -> None:
        """The next ``micro_batches`` backward passes compute this replica's whole share of the step."""
        self.expected = micro_batches
        self.accumulations = [0] * len(self.params)
        self.waiting = [len(members) for members in self.buckets]
        self.next_bucket = 0
        self.works = []

    def _accumulated(self, index: int) -> None:
        if not self.expected:
            return
        self.accumulations[index] += 1
        if self.accumulations[index] != self.expected:
            return
        bucket = self.bucket_of[index]
        self.waiting[bucket] -= 1
        while self.next_bucket < len(self.buckets) and self.waiting[self.next_bucket] == 0:
            self._start(self.next_bucket)

    def _start(self, bucket: int) -> None:
        members = self.buckets[bucket]
        for i in members:
            grad = self.params[i].grad
            part = self.flat[self.offsets[i] : self.offsets[i] + self.params[i].numel()]
            if grad is None:
                part.zero_()
            else:
                part.copy_(grad.reshape(-1))
        first, last = min(members), max(members)
        self.works.append(self.reduce(self.flat[self.offsets[first] : self.offsets[last] + self.params[last].numel()]))
        self.next_bucket = bucket + 1

    def complete(self) -> torch.Tensor:
        """Start the buckets not started yet, wait for all of them; the reduced flat gradient."""
        while self.next_bucket < len(self.buckets):
            self._start(self.next_bucket)
        try:
            for work in self.works:
                work.wait()
        finally:
            self.expected = 0
            self.works = []
        return self.flat
