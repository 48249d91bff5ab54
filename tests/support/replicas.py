"""Helpers for replicas-mode tests: a config, what each replica recorded, and the committed sample shares."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

from support.configs import recovery_config
from support.processes import REPO, ecpt_command
from support.waiting import wait_for


def replicas_config(raw: dict, tmp_path: Path, steps_per_phase: int = 5, **launch) -> Path:
    """``raw`` in replicas mode with two single-worker replicas and short torchft timeouts (``launch`` overrides),
    L0 every step and L1 every 3 steps, sample logs on (``support.configs.recovery_config``)."""
    raw = copy.deepcopy(raw)
    raw["launch"] |= {
        "fault_tolerance": "replicas",
        "replicas": 2,
        "ft_heartbeat_timeout_ms": 500,
        "ft_timeout_s": 3.0,
        "ft_quorum_timeout_s": 30.0,
        **launch,
    }
    return recovery_config(raw, tmp_path, steps_per_phase)


def replica_ends(run: Path) -> dict[int, dict]:
    """Each replica's record at the end of the run (step, state digest, heals, discarded attempts)."""
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (run / "replicas").glob("replica-*.json")}


def committed_shares(run: Path) -> dict[int, list[dict]]:
    """step -> the committed shares every replica logged for it (replicas log only committed steps)."""
    by_step: dict[int, list[dict]] = {}
    for path in (run / "samples").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line) | {"replica": int(path.stem.split("-")[1])}
            by_step.setdefault(row["step"], []).append(row)
    return by_step


def assert_each_sample_once(run: Path, steps: int, global_batch: int) -> None:
    """Every committed step used exactly its global batch of samples, [s*G, (s+1)*G), each once, split by the
    quorum it committed with (one row per member, members agreeing on the quorum size)."""
    by_step = committed_shares(run)
    assert sorted(by_step) == list(range(steps)), f"steps logged: {sorted(by_step)}"
    for step, rows in by_step.items():
        # A step is logged again when the job fell back to an older checkpoint: the newest commit counts. Its size
        # comes from the newest row by time, not from file order (the order `glob` lists the rank files in).
        by_time = sorted(rows, key=lambda r: r["time"])
        latest = by_time[-by_time[-1]["world_size"] :]
        sizes = {r["world_size"] for r in latest}
        ids = sorted(i for r in latest for start, count in r["ranges"] for i in range(start, start + count))
        assert len(sizes) == 1 and ids == list(range(step * global_batch, (step + 1) * global_batch)), (
            f"step {step}: shares {latest}"
        )


def start_lighthouse(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """A standalone `ecpt lighthouse` on 127.0.0.1 (as a cluster runs it), heartbeat timeout 500 ms; (process,
    address) once it listens. The caller stops it."""
    from elastic.world import free_port

    address_file = tmp_path / "lighthouse.json"
    proc = subprocess.Popen(
        ecpt_command(
            ["lighthouse", "--host=127.0.0.1", f"--port={free_port()}", f"--address-file={address_file}"]
            + ["--heartbeat-timeout-ms=500"]
        ),
        cwd=REPO,
        stdout=open(tmp_path / "lighthouse.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(address_file.exists, 60, "the lighthouse to listen", proc=proc)
    return proc, json.loads(address_file.read_text())["address"]
