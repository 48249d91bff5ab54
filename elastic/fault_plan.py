"""The fault plan's grammar: one sentence per fault, each firing once per run at the start of a step (``during``:
mid-step).

    kill rank 1 at step 30            SIGKILL that worker (torchrun restarts the worker group)
    kill rank 1 during step 30        the same, mid-step: after its forward/backward of step 30 (replicas mode:
                                      before the gradient all-reduce, so the peers computed their shares too)
    kill rank 1 during step 30 until step 40
                                      replicas mode: the killed replica's replacement waits to rejoin until a
                                      survivor starts step 40 (a slow replacement, e.g. a node swap). Without
                                      'until' the replacement rejoins as soon as it is up, which can be before the
                                      survivors have formed a quorum without it; a test that must see them go on
                                      alone says when the replacement may come back
    kill node n1 at step 50           SIGKILL the agent of node n1 (its workers die with it): the job shrinks
    sigterm all at step 70            SIGTERM every node's agent (preemption): workers save and stop
    stall rank 0 at step 20 for 60s   the rank stops making progress (a hang); the watchdog must catch it. In replicas
                                      mode the whole process is frozen (SIGSTOP, then SIGCONT): heartbeats stop too
    kill coordinator at step 40       replicas mode: SIGKILL the quorum coordinator `ecpt train` started
    corrupt newest at step 40         flip bytes in the first chunk of the newest committed checkpoint
    fill disk at step 60              fill the L1 checkpoint file system (only a small one, e.g. a test tmpfs)

Parsing, describing and the record of what fired live here (the config validates plans with it, and ``ecpt
chaos`` reads the record without importing torch); ``elastic.faults`` carries faults out inside the workers.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from elastic.errors import ConfigError

KINDS = ("kill", "kill_mid_step", "kill_node", "sigterm", "stall", "corrupt", "fill_disk", "kill_coordinator")
_PATTERNS = [
    ("kill", re.compile(r"^kill rank (?P<rank>\d+) at step (?P<step>\d+)(?: until step (?P<until>\d+))?$")),
    (
        "kill_mid_step",
        re.compile(r"^kill rank (?P<rank>\d+) during step (?P<step>\d+)(?: until step (?P<until>\d+))?$"),
    ),
    ("kill_node", re.compile(r"^kill node (?P<node>\S+) at step (?P<step>\d+)$")),
    ("sigterm", re.compile(r"^sigterm all at step (?P<step>\d+)$")),
    ("stall", re.compile(r"^stall rank (?P<rank>\d+) at step (?P<step>\d+) for (?P<seconds>[\d.]+)s$")),
    ("corrupt", re.compile(r"^corrupt newest at step (?P<step>\d+)$")),
    ("fill_disk", re.compile(r"^fill disk at step (?P<step>\d+)$")),
    ("kill_coordinator", re.compile(r"^kill coordinator at step (?P<step>\d+)$")),
]


@dataclass(frozen=True)
class Fault:
    index: int
    kind: str
    step: int
    rank: int | None = None
    node: str | None = None
    seconds: float = 0.0
    until: int | None = None
    """kill: the step a survivor must start before the killed rank's replacement may rejoin (replicas mode)."""

    def describe(self) -> str:
        """The fault as a plan sentence (parse_plan(describe()) gives the fault back)."""
        subject = {
            "kill": f"kill rank {self.rank}",
            "kill_mid_step": f"kill rank {self.rank}",
            "kill_node": f"kill node {self.node}",
            "sigterm": "sigterm all",
            "stall": f"stall rank {self.rank}",
            "corrupt": "corrupt newest",
            "fill_disk": "fill disk",
            "kill_coordinator": "kill coordinator",
        }
        when = "during" if self.kind == "kill_mid_step" else "at"
        return (
            f"{subject[self.kind]} {when} step {self.step}"
            + (f" for {self.seconds:g}s" if self.kind == "stall" else "")
            + (f" until step {self.until}" if self.until is not None else "")
        )


def parse_plan(sentences: list[str]) -> list[Fault]:
    faults = []
    for i, text in enumerate(sentences):
        norm = " ".join(text.lower().split())
        for kind, pattern in _PATTERNS:
            m = pattern.match(norm)
            if m:
                g = m.groupdict()
                faults.append(
                    Fault(
                        index=i,
                        kind=kind,
                        step=int(g["step"]),
                        rank=int(g["rank"]) if g.get("rank") else None,
                        node=g.get("node"),
                        seconds=float(g.get("seconds") or 0),
                        until=int(g["until"]) if g.get("until") else None,
                    )
                )
                if faults[-1].until is not None and faults[-1].until <= faults[-1].step:
                    raise ConfigError(
                        f"faults.plan[{i}] {text!r}: the replacement would rejoin (step {faults[-1].until}) before "
                        f"the kill (step {faults[-1].step}); write an 'until step' after the kill's step"
                    )
                break
        else:
            raise ConfigError(
                f"faults.plan[{i}] {text!r} is not a fault; write e.g. 'kill rank 1 at step 30', 'kill rank 1 "
                f"during step 30', 'kill rank 1 during step 30 until step 40', "
                f"'kill node n1 at step 50', 'sigterm all at step 70', 'stall rank 0 at step 20 for "
                f"60s', 'corrupt newest at step 40', 'fill disk at step 60' or 'kill coordinator at step 40'"
            )
    return faults


def random_plan(seed: int, total_steps: int, count: int, ranks: int) -> list[str]:
    """``count`` worker kills and stalls at distinct random steps, reproducible from ``seed``."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(max(total_steps // 10, 1), max(total_steps - 2, 2)), count))
    plan = []
    for step in steps:
        rank = rng.randrange(ranks)
        plan.append(
            f"kill rank {rank} at step {step}" if rng.random() < 0.7 else f"stall rank {rank} at step {step} for 600s"
        )
    return plan


FIRED_DIR = "faults"
"""``<run_dir>/faults/fired-<i>[-<node>]``: created exclusively when fault i fires, so it fires once per run (once per
node for node-wide faults) even when a restarted worker replays the step."""


def fired_marker(run_dir: Path, fault: Fault, node_id: str) -> Path:
    """The marker file whose exclusive creation claims ``fault`` (a SIGTERM fires once on every node)."""
    suffix = f"-{node_id}" if fault.kind == "sigterm" else ""
    return run_dir / FIRED_DIR / f"fired-{fault.index}{suffix}"


def released_marker(run_dir: Path, fault: Fault) -> Path:
    """Created by the first survivor to start step ``fault.until``: the killed rank's replacement may rejoin."""
    return run_dir / FIRED_DIR / f"released-{fault.index}"


def fired_faults(run_dir: Path) -> list[dict]:
    """The faults that fired in a run, oldest first (from their once-per-run marker files)."""
    rows = [json.loads(p.read_text()) for p in (run_dir / FIRED_DIR).glob("fired-*")]
    return sorted(rows, key=lambda r: r["time"])
