"""Checkpoint collectives on a dedicated gloo group, metadata as JSON bytes (never pickle, never *_object calls).

Only the persist thread (and load(), after the persist queue is drained) talks on this group, so every rank issues
the same collectives in the same order and the training process group is never touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

_HEADER = 8  # int64 payload length in front of every slot
_MIN_CAPACITY = 16 << 10


@dataclass
class Comm:
    """A process group seen from one rank; group=None means a single process (no collectives at all)."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    capacity: int = _MIN_CAPACITY
    """Bytes per rank sent in the one-collective fast path. Grows (identically on every rank: everyone sees the
    same lengths) when a message did not fit, so a steady stream of similar messages costs one all_gather each."""

    def all_gather_json(self, obj) -> list:
        """Every rank's JSON-serialisable `obj`, indexed by group rank.

        One all_gather of fixed-size slots (length header + payload) in the common case; a second one with the full
        payloads only when some rank's message was larger than the current capacity."""
        if self.group is None or self.size == 1:
            return [json.loads(json.dumps(obj))]  # the same copy semantics as the multi-rank path
        data = json.dumps(obj, separators=(",", ":")).encode()
        cap = self.capacity
        slot = torch.empty(_HEADER + cap, dtype=torch.uint8)
        slot[:_HEADER].view(torch.int64)[0] = len(data)
        head = data[:cap]
        if head:
            slot[_HEADER : _HEADER + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        out = torch.empty(self.size, _HEADER + cap, dtype=torch.uint8)
        dist.all_gather(list(out.unbind(0)), slot, group=self.group)
        lengths = out[:, :_HEADER].contiguous().view(torch.int64).reshape(-1).tolist()
        longest = max(lengths)
        if longest > cap:
            self.capacity = 1 << (longest - 1).bit_length()
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            full = torch.empty(self.size, longest, dtype=torch.uint8)
            dist.all_gather(list(full.unbind(0)), padded, group=self.group)
            rows, offset = full.numpy(), 0
        else:
            rows, offset = out.numpy(), _HEADER
        return [json.loads(rows[r, offset : offset + n].tobytes()) for r, n in enumerate(lengths)]

    def exchange(self, sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]]) -> None:
        """Point-to-point: (tensor, peer group rank, tag) for each send and receive; waits for all of them."""
        if self.group is None or self.size == 1:
            if sends or recvs:
                raise RuntimeError("point-to-point exchange requested in a single-process checkpoint group")
            return
        works = [dist.isend(t, group=self.group, group_dst=peer, tag=tag) for t, peer, tag in sends]
        works += [dist.irecv(t, group=self.group, group_src=peer, tag=tag) for t, peer, tag in recvs]
        for w in works:
            w.wait()
