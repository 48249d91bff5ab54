"""What a finished arm leaves behind: ``arms/<arm>/result.json`` (its layout, writing and reading it back) and the
metrics recomputed from its curves. The runner writes these files, the report and the plots read them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from elastic.config import ConfigError
from elastic.metrics import read_jsonl
from launch.cpt.metrics import CptMetrics, LossCurves, cpt_metrics

RESULT_VERSION = 2
"""Bump when result.json's layout changes, so older results are rerun instead of misread."""


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _last_per_step(rows: list[dict]) -> list[dict]:
    """After a resume, steps after the checkpoint are logged again: the later row is the surviving trajectory."""
    return list({r["step"]: r for r in rows}.values())


def read_curves(metrics_jsonl: Path) -> dict:
    """Evaluation and step rows of a trainer's metrics.jsonl as lists (eval steps, losses per domain, lr, loss)."""
    evals = sorted(_last_per_step(read_jsonl(metrics_jsonl, "eval")), key=lambda r: r["step"])
    steps = sorted(_last_per_step(read_jsonl(metrics_jsonl, "step")), key=lambda r: r["step"])
    domains = list(evals[0]["losses"]) if evals else []
    return {
        "eval_steps": [r["step"] for r in evals],
        "losses": {d: [r["losses"][d] for r in evals] for d in domains},
        "steps": [r["step"] for r in steps],
        "lr": [r["lr"] for r in steps],
        "train_loss": [r["loss"] for r in steps],
    }


def load_result(run_dir: Path, digest: str) -> dict | None:
    """The finished result of an arm, or None if it has not finished; an arm finished under another config is an
    error, because mixing it into the table would compare different experiments."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("version") != RESULT_VERSION:
        return None
    if result.get("digest") != digest:
        raise ConfigError(
            f"{path} was produced by a different config (digest {result.get('digest')} != {digest}); "
            f"use another --out, or delete {run_dir} to rerun that arm"
        )
    return result


@dataclass
class ArmReport:
    """One finished arm with its metrics, as it appears in the table, the JSON and the plot."""

    name: str
    arm: dict
    result: dict
    metrics: CptMetrics

    @property
    def curves(self) -> LossCurves:
        c = self.result["curves"]
        return LossCurves.from_lists(c["eval_steps"], c["losses"])


def arm_report(result: dict) -> ArmReport:
    """Recompute the metrics of a finished arm from its curves (so metric fixes apply to old runs too)."""
    c, phases = result["curves"], result["phases"]
    curves = LossCurves.from_lists(c["eval_steps"], c["losses"])
    return ArmReport(
        name=result["name"],
        arm=result["arm"],
        result=result,
        metrics=cpt_metrics(curves, phases["domains"], phases["ends"]),
    )


def schedule_label(result: dict) -> str:
    """The arm's schedule in a few words, shared by the summary table and the plot's LR legend."""
    s = result["schedule"]
    return f"{s['kind']}, warmup {s['warmup_steps']}"
