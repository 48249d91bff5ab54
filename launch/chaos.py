"""``ecpt chaos``: train under a fault plan (given, or random from a seed) and report what happened.

For every fault that fired: when it fired, how long until a restarted worker process was running (detection and
restart), how long until the first training step completed after it (recovery), from which checkpoint level and
step training resumed, and how many steps had to be computed again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from elastic.config import load_config
from elastic.data import phase_plan
from elastic.fault_plan import fired_faults, random_plan
from elastic.metrics import read_jsonl
from launch.args import add_config_args
from launch.train_commands import train_on_this_machine, with_faults


def fault_report(run_dir: Path) -> list[dict]:
    """Pair each fired fault with the first resume after it and the first step completed after that resume."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    resumes = [r for r in rows if r["kind"] == "resume"]
    steps = [r for r in rows if r["kind"] == "step"]
    report = []
    for fault in fired_faults(run_dir):
        after = [r for r in resumes if r.get("process_started", r["time"]) >= fault["time"]]
        entry = {"fault": fault["fault"], "fired_at_step": fault["step"], "resumed": bool(after)}
        if after:
            resume = after[0]
            first = next((s for s in steps if s["time"] > resume["time"]), None)
            entry |= {
                "restart_seconds": round(resume.get("process_started", resume["time"]) - fault["time"], 2),
                "recovery_seconds": round(first["time"] - fault["time"], 2) if first else None,
                "resumed_from": f"{resume['level']} step {resume['step']}",
                "steps_lost": resume["steps_lost"],
                "world_size": f"{resume['saved_world_size']} -> {resume['world_size']}",
            }
        report.append(entry)
    return report


def replicas_fault_report(run_dir: Path) -> list[dict]:
    """replicas mode: nothing restarts; per fault, the survivors' next completed step, whether they reused their
    part of the step in flight, and the heals after it."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    report = []
    for fault in fired_faults(run_dir):
        later = [r for r in rows if r["time"] >= fault["time"]]
        # rows count completed steps: the step the fault interrupted (index fault["step"]) is logged as step + 1
        first = next((r for r in later if r["kind"] == "step" and r["step"] > fault["step"]), None)
        heal = next((r for r in later if r["kind"] == "heal"), None)
        fallback = next((r for r in later if r["kind"] == "fallback"), None)
        report.append(
            {
                "fault": fault["fault"],
                "fired_at_step": fault["step"],
                "survivors_next_step_seconds": round(first["time"] - fault["time"], 2) if first else None,
                "discarded_attempts": sum(1 for r in later if r["kind"] == "discard" and r["step"] == fault["step"]),
                "reused": ", ".join(
                    f"replica {r['replica']} kept {r['reused_samples']} + computed {r['orphaned_samples']}"
                    for r in later
                    if r["kind"] == "reuse" and r["step"] == fault["step"]
                )
                or "-",
                "healed": (
                    f"replica {heal['replica']} from replica {heal['source_replica']} at step {heal['step']} "
                    f"in {heal['seconds']} s"
                    if heal
                    else "-"
                ),
                "fallback": f"{fallback['level']} step {fallback['step']}" if fallback else "-",
            }
        )
    return report


def format_replicas_report(report: list[dict]) -> str:
    lines = [
        "| fault | survivors' next step (s) | discarded attempts | reused (samples) | healed | fell back to |",
        "|---|---|---|---|---|---|",
    ]
    for e in report:
        lines.append(
            f"| {e['fault']} | {e['survivors_next_step_seconds']} | {e['discarded_attempts']} | {e['reused']} | "
            f"{e['healed']} | {e['fallback']} |"
        )
    return "\n".join(lines)


def format_report(report: list[dict]) -> str:
    header = "| fault | restart (s) | recovery (s) | resumed from | steps lost | world |"
    lines = [header, "|---|---|---|---|---|---|"]
    for e in report:
        if not e["resumed"]:
            lines.append(f"| {e['fault']} | - | - | (no restart recorded) | - | - |")
            continue
        lines.append(
            f"| {e['fault']} | {e['restart_seconds']} | {e['recovery_seconds']} | {e['resumed_from']} | "
            f"{e['steps_lost']} | {e['world_size']} |"
        )
    return "\n".join(lines)


def cmd_chaos(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    plan = list(args.plan)
    if args.random:
        total = cfg.train.max_steps or phase_plan(cfg).total_steps
        ranks = cfg.launch.replica_groups if cfg.launch.fault_tolerance == "replicas" else cfg.launch.nproc_per_node
        plan += random_plan(args.seed, total, args.random, ranks)
    if not plan:
        raise SystemExit("ecpt chaos: give --plan SENTENCE (repeatable) or --random N")
    overrides = list(args.overrides)
    if any(p.startswith("stall") for p in plan) and not cfg.train.hang_timeout:
        overrides.append("train.hang_timeout=10")  # a stall is only a fault worth testing with a watchdog on
    if not (cfg.checkpoint.l0_interval or cfg.checkpoint.interval):
        overrides.append("checkpoint.l0_interval=1")
    if args.run_dir:
        overrides.append(f'train.run_dir="{args.run_dir}"')
    print("fault plan:\n  " + "\n  ".join(plan), flush=True)
    train_cfg = with_faults(load_config(args.config, overrides), plan)
    code = train_on_this_machine(train_cfg)
    run_dir = Path(train_cfg.train.run_dir)
    if train_cfg.launch.fault_tolerance == "replicas":
        print(format_replicas_report(replicas_fault_report(run_dir)), flush=True)
    else:
        print(format_report(fault_report(run_dir)), flush=True)
    return code


def add_chaos_parser(sub) -> None:
    p = sub.add_parser("chaos", help="train under a fault plan and report detection, recovery and steps lost")
    add_config_args(p)
    p.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="SENTENCE",
        help="a fault, e.g. 'kill rank 1 at step 30' (repeatable)",
    )
    p.add_argument("--random", type=int, default=0, metavar="N", help="add N random worker kills/stalls")
    p.add_argument("--seed", type=int, default=0, help="seed of --random")
    p.add_argument("--run-dir", default=None)
    p.set_defaults(func=cmd_chaos)
