"""Checkpoint collectives on a dedicated gloo group, metadata as JSON bytes (never pickle, never *_object calls).

Only the persist thread (and load(), after the persist queue is drained) talks on this group, so every rank issues
the same collectives in the same order and the training process group is never touched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Comm:
    """A process group seen from one rank; group=None means a single process (no collectives at all)."""

    group: dist.ProcessGroup | None
    rank: int
    size: int

    def all_gather_json(self, obj) -> list:
        """Every rank's JSON-serialisable `obj`, indexed by group rank."""
        if self.group is None or self.size == 1:
            return [obj]
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        length = torch.tensor([data.numel()], dtype=torch.int64)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(lengths, length, group=self.group)
        longest = max(int(n.item()) for n in lengths)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: data.numel()] = data
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(out, padded, group=self.group)
        return [json.loads(bytes(o[: int(n.item())].numpy())) for o, n in zip(out, lengths)]

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
