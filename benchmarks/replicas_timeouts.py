"""Replicas mode: where the survivors' pause after a kill -9 goes, for several torchft heartbeat timeouts.

For each timeout: `ecpt train` in replicas mode (2 replicas) with "kill rank 1 during step K" (after both replicas
computed their shares of step K, before the gradient all-reduce: the case a kill mid-step lands in) or "... at step
K" (`--when at`: between steps). The pause is the time from the kill (the fault's record) to the first step the
survivor completes alone, split with the survivor's own records (metrics.jsonl events, ECPT_FT_TIMING=1 lines):

    detect      kill -> the survivor's attempt of step K discarded (its all-reduce failed)
    quorum      the survivor's wait for the next quorum (the dead replica's heartbeats must be older than the
                heartbeat timeout: the coordinator's split-brain rule needs more than half of the heartbeating
                replicas, so one survivor of two cannot form a quorum before that)
    compute     the retried step's forward/backward after the quorum (launch.ft_reuse_partial_step: only the
                orphaned samples; 0 when a survivor of two computed them while the quorum formed, then the quorum
                wait holds them)
    rest        vote, all-reduce, commit, optimizer step, logging

`--fault-free-steps N` also runs N steps without faults per timeout and counts steps a quorum did not hold both
replicas or discarded (a live replica dropped because its heartbeats were late): the evidence for a timeout being
safe on this machine. Issue 15's target: pause <= 1 s.

    python benchmarks/replicas_timeouts.py --heartbeat-ms 500,300,200 --repeat 2 --fault-free-steps 200
    python benchmarks/replicas_timeouts.py --heartbeat-ms 500 --set launch.ft_reuse_partial_step=false
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL: list[str] = []
"""The default config's model (5.16 M parameters; 2 replicas on 2 cores: ~0.45 s steps, ~0.9 s alone)."""
SMALL_MODEL = ["model.dim=128", "model.n_layers=2", "model.n_heads=4"]
TIMING = re.compile(
    r"\[rank 0 step \d+\] timing: step (?P<step>\d+) committed: quorum (?P<quorum>[\d.]+) s, vote (?P<vote>[\d.]+) "
    r"s, forward/backward (?P<fb>[\d.]+) s \((?P<samples>\d+) samples\), all-reduce (?P<ar>[\d.]+) s, commit "
    r"(?P<commit>[\d.]+) s"
)


def train(run: Path, root: Path, heartbeat_ms: int, steps: int, model: list[str], sets: list[str], fault=None):
    overrides = [
        "launch.fault_tolerance=replicas",
        f"launch.ft_heartbeat_timeout_ms={heartbeat_ms}",
        f"train.max_steps={steps}",
        "train.progress=false",
        "metrics.enabled=false",
        "checkpoint.interval=0",
        f'checkpoint.l0_dir="{root / "shm"}"',
        *model,
        *sets,
    ]
    cmd = [sys.executable, "-m", "launch.cli", "train", "--run-dir", str(run)]
    if fault:
        cmd += ["--fault", fault]
    for s in overrides:
        cmd += ["--set", s]
    env = os.environ | {"ECPT_FT_TIMING": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def one_kill(root: Path, heartbeat_ms: int, kill_step: int, when: str, model: list[str], sets: list[str]) -> dict:
    run = root / f"hb{heartbeat_ms}-{len(list(root.glob('hb*')))}"
    result = train(run, root, heartbeat_ms, kill_step + 12, model, sets, f"kill rank 1 {when} step {kill_step}")
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    fired = json.loads(next((run / "faults").glob("fired-*")).read_text())["time"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    alone = [r for r in rows if r["kind"] == "step" and r["time"] > fired and r["world_size"] == 1]
    if len(alone) < 3:
        return {"error": f"only {len(alone)} steps alone after the kill"}
    first = alone[0]
    step = first["step"] - 1
    out = {"pause": first["time"] - fired, "step_alone": statistics.median(r["seconds"] for r in alone[1:6])}
    discard = next((r for r in rows if r["kind"] == "discard" and r["step"] == step and r["replica"] == 0), None)
    timing = next((m for m in TIMING.finditer(result.stdout + result.stderr) if int(m["step"]) == step), None)
    out["reused"] = any(r["kind"] == "reuse" and r["step"] == step and r["replica"] == 0 for r in rows)
    if timing:
        out |= {"quorum": float(timing["quorum"]), "compute": float(timing["fb"]), "samples": int(timing["samples"])}
        out["detect"] = discard["time"] - fired if discard else 0.0
        out["rest"] = out["pause"] - out["detect"] - out["quorum"] - out["compute"]
    return out


def fault_free(root: Path, heartbeat_ms: int, steps: int, model: list[str], sets: list[str]) -> dict:
    run = root / f"ff{heartbeat_ms}-{len(list(root.glob('ff*')))}"
    result = train(run, root, heartbeat_ms, steps, model, sets)
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if r["kind"] == "step"]
    votes = [float(m["vote"]) for m in TIMING.finditer(result.stdout + result.stderr)]
    return {
        "steps": len(step_rows),
        "below_two": sum(r["world_size"] < 2 for r in step_rows),
        "discards": sum(r["kind"] == "discard" for r in rows),
        "median_step": statistics.median(r["seconds"] for r in step_rows),
        "median_vote": statistics.median(votes) if votes else 0.0,
    }


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heartbeat-ms", default="500,300,200", help="comma-separated heartbeat timeouts")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--kill-step", type=int, default=20)
    parser.add_argument("--when", choices=("during", "at"), default="during", help="kill mid-step or between steps")
    parser.add_argument("--small", action="store_true", help="a 2-layer dim-128 model instead of the default")
    parser.add_argument("--fault-free-steps", type=int, default=0, help="also run this many steps without faults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    model = SMALL_MODEL if args.small else DEFAULT_MODEL
    root = Path(tempfile.mkdtemp(prefix="ecpt-ft-timeouts-"))
    print(f"kill rank 1 {args.when} step {args.kill_step}; model {'small' if args.small else 'default'}; {args.set}")
    print(
        "| heartbeat timeout (ms) | kill -> next survivor step (s) | detect | quorum wait | compute (samples) | rest "
        "| survivor's step alone | reused | fault-free: steps below 2 replicas / discards | target <= 1 s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for hb in [int(x) for x in args.heartbeat_ms.split(",")]:
        runs = [one_kill(root, hb, args.kill_step, args.when, model, args.set) for _ in range(args.repeat)]
        good = [r for r in runs if "error" not in r]
        free = fault_free(root, hb, args.fault_free_steps, model, args.set) if args.fault_free_steps else None
        free_cell = (
            "-"
            if free is None
            else free.get("error", "")[-200:]
            or (
                f"{free['below_two']} / {free['discards']} of {free['steps']} (step {free['median_step']:.2f} s, "
                f"reuse vote {1000 * free['median_vote']:.1f} ms)"
            )
        )
        if not good:
            print(f"| {hb} | error: {runs[0]['error'][-300:]} | | | | | | | {free_cell} | MISS |", flush=True)
            continue
        timed = [r for r in good if "quorum" in r]
        pauses = [r["pause"] for r in good]
        verdict = "OK" if max(pauses) <= 1.0 else "MISS"
        compute = ", ".join(f"{r['compute']:.2f} ({r['samples']})" for r in timed)
        print(
            f"| {hb} | {fmt(pauses)} | {fmt([r['detect'] for r in timed])} | {fmt([r['quorum'] for r in timed])} | "
            f"{compute} | {fmt([r['rest'] for r in timed])} "
            f"| {fmt([r['step_alone'] for r in good])} | {', '.join('yes' if r['reused'] else 'no' for r in good)} "
            f"| {free_cell} | {verdict} |",
            flush=True,
        )
        bad = [r["error"][-300:] for r in runs if "error" in r]
        if bad:
            print(f"  ({len(bad)} run(s) failed: {bad[0]})")


if __name__ == "__main__":
    main()
