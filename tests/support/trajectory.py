"""What a training run did, read from its run directory: the surviving loss trajectory, the samples it consumed,
and the world sizes it went through."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from elastic.metrics import read_jsonl


def step_rows(run: Path) -> list[dict]:
    """The step rows of metrics.jsonl so far ([] before the first step is written)."""
    return read_jsonl(run / "metrics.jsonl", "step") if (run / "metrics.jsonl").exists() else []


def final_losses(run: Path) -> dict[int, float]:
    """Loss per step of the trajectory that survived: a replayed step's later row replaces the earlier one."""
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl", "step")}


def final_samples(run: Path) -> list[int]:
    """Global sample ids of the surviving trajectory, from every rank's sample log (later runs of a step win)."""
    rows = []
    for path in (run / "samples").glob("rank-*.jsonl"):
        rows += [
            json.loads(line) | {"order": i, "file": path.name} for i, line in enumerate(path.read_text().splitlines())
        ]
    by_step: dict[int, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["time"] if "time" in r else 0):
        by_step.setdefault(r["step"], []).append(r)
    ids = []
    for step, entries in sorted(by_step.items()):
        last_world = entries[-1]["world_size"]
        latest = entries[-last_world:]  # the most recent attempt of this step: one row per rank
        for e in latest:
            ids += range(e["start"], e["start"] + e["count"])
    return sorted(ids)


def node_resizes(run: Path) -> list[int]:
    """World sizes of the step rows with repeats collapsed, e.g. [2, 1, 2] for 2 nodes -> n1 lost -> n1 back.

    A node whose agent reaches the first rendezvous after the 1 s last call (agent start-up on a loaded machine)
    misses the first round: the job starts on the other node alone and grows when it arrives. That leading
    [1] is the launcher behaving as designed, not part of the scenario, so it is dropped here."""
    worlds = [w for w, _ in itertools.groupby(r["world_size"] for r in read_jsonl(run / "metrics.jsonl", "step"))]
    return worlds[1:] if worlds[:2] == [1, 2] else worlds
