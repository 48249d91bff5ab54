"""What a healing replica receives from a live peer, and how it is applied.

The state is exactly what a checkpoint holds (``elastic.checkpoints``): the engine's named tensors (parameters and
AdamW moments), the step, tokens, run counters and the torch RNG state, so a healed replica continues the same
trajectory (LR from the step, RNG from the peer). Plain containers of tensors, ints and strings only: the receiver
loads it with ``weights_only=True`` (``elastic.ft.transport``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch


@dataclass
class HealRecord:
    """The last heal of this replica, for the log line, the metrics and the tests."""

    step: int
    """The step the replica continued from."""
    source_replica: int
    """The fixed index of the peer that sent the state."""
    seconds: float
    """From asking for the quorum to the state being applied."""


def healing_state(trainer, tensors: dict[str, torch.Tensor], replica_index: int) -> dict:
    """The state a peer serves to a healing replica: references to the live tensors (the transport serves them
    while this replica is still before its optimizer step; torchft blocks the commit until the reads are done)."""
    return {
        "tensors": tensors,
        "step": trainer.state.step,
        "tokens": trainer.state.tokens,
        "counters": json.dumps(trainer.state.counters.to_json()),
        "rng": torch.get_rng_state(),
        "source_replica": replica_index,
    }


def apply_healing_state(trainer, live: dict[str, torch.Tensor], state: dict, started: float) -> HealRecord:
    """Copy a peer's state into the live tensors, in place (the optimizer and checkpoint manager keep their
    references), and continue at the peer's step."""
    missing = sorted(set(live) ^ set(state["tensors"]))
    if missing:
        raise RuntimeError(f"heal: the peer's state and ours name different tensors: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.copy_(state["tensors"][name])
    step = int(state["step"])
    trainer.engine.after_load(step)  # AdamW's step counters follow the step
    torch.set_rng_state(state["rng"])
    trainer.state.step, trainer.state.tokens = step, int(state["tokens"])
    counters = trainer.state.counters
    for key, value in json.loads(state["counters"]).items():
        setattr(counters, key, value)
    return HealRecord(step=step, source_replica=int(state["source_replica"]), seconds=time.perf_counter() - started)
