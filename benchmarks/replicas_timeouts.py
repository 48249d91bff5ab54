"""Replicas mode: the survivors' pause after a kill -9 for several torchft heartbeat timeouts, same run.

For each timeout: `ecpt train` in replicas mode (2 replicas, a small model so a step is short and the pause is
mostly failure detection) with "kill rank 1 at step K"; the pause is the time from the kill (the fault's record)
to the first step the survivor completes alone, and the pause beyond a step subtracts the survivor's median step
time alone. The targets (issue 15): pause <= 1 s.

    python benchmarks/replicas_timeouts.py --heartbeat-ms 1000,500,250 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_MODEL = ["model.dim=128", "model.n_layers=2", "model.n_heads=4", "checkpoint.interval=0"]


def one_run(root: Path, heartbeat_ms: int, kill_step: int) -> dict:
    run = root / f"hb{heartbeat_ms}-{len(list(root.glob('hb*')))}"
    sets = [
        "launch.fault_tolerance=replicas",
        f"launch.ft_heartbeat_timeout_ms={heartbeat_ms}",
        f"train.max_steps={kill_step + 15}",
        "train.progress=false",
        "metrics.enabled=false",
        f'checkpoint.l0_dir="{root / "shm"}"',
        *SMALL_MODEL,
    ]
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "train",
        "--run-dir",
        str(run),
        "--fault",
        f"kill rank 1 at step {kill_step}",
    ]
    for s in sets:
        cmd += ["--set", s]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    fired = json.loads(next((run / "faults").glob("fired-*")).read_text())["time"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    alone = [r for r in rows if r["kind"] == "step" and r["time"] > fired and r["world_size"] == 1]
    if len(alone) < 3:
        return {"error": f"only {len(alone)} steps alone after the kill"}
    step_alone = statistics.median(r["seconds"] for r in alone[1:6])
    pause = alone[0]["time"] - fired
    return {"pause_seconds": round(pause, 3), "pause_beyond_step_seconds": round(pause - step_alone, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heartbeat-ms", default="1000,500,250", help="comma-separated heartbeat timeouts")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--kill-step", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ecpt-ft-timeouts-"))
    print("| heartbeat timeout (ms) | kill -> next survivor step (s) | pause beyond a step (s) | target <= 1 s |")
    print("|---|---|---|---|")
    for hb in [int(x) for x in args.heartbeat_ms.split(",")]:
        runs = [one_run(root, hb, args.kill_step) for _ in range(args.repeat)]
        good = [r for r in runs if "error" not in r]
        if not good:
            print(f"| {hb} | error: {runs[0]['error'][-300:]} | | MISS |")
            continue
        pauses = [r["pause_seconds"] for r in good]
        beyond = [r["pause_beyond_step_seconds"] for r in good]
        verdict = "OK" if max(pauses) <= 1.0 else "MISS"
        print(f"| {hb} | {', '.join(map(str, pauses))} | {', '.join(map(str, beyond))} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
