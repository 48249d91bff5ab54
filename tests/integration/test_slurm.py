"""`ecpt launch slurm --submit` on a real (private, single-node) Slurm cluster: the job trains, USR1 makes every
worker checkpoint and stop at a step boundary, the script requeues the job and the rerun resumes from that step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.configs import write_toml
from support.processes import REPO
from support.packages import INSTALL_BUDGET
from support.slurm import CLIENT_TIMEOUT, CLUSTER_START_BUDGET, CLUSTER_STOP_BUDGET, SLURM_POLL
from support.waiting import wait_for

MAX_STEPS = 300
SIGNAL_AFTER_STEP = 30
SIGUSR1 = 10
MARGIN = 60
CLUSTER = INSTALL_BUDGET + CLUSTER_START_BUDGET + CLUSTER_STOP_BUDGET
"""The session's cluster: installed and started within the first test that needs it, stopped after the last."""


RANK_PROBE = """
import json, os
import torch, torch.distributed as dist
from elastic.world import detect_world, init_distributed, shutdown_distributed
world = detect_world()
init_distributed(world, timeout_s=60)
t = torch.tensor([world.rank + 1.0])
dist.all_reduce(t)
print(json.dumps({"rank": world.rank, "world": world.world_size, "local_rank": world.local_rank,
                  "local_world": world.local_world_size, "launcher": world.launcher,
                  "master": [os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]], "sum": t.item()}), flush=True)
shutdown_distributed()
"""


@pytest.mark.timeout(CLUSTER + 120 + MARGIN)
def test_srun_started_workers_find_their_rank_and_rendezvous(slurm_cluster):
    """Workers started by srun itself (no torchrun): ranks from SLURM_*, rendezvous from the job's first node."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = slurm_cluster.run(
        "srun", "-n", "2", "--job-name=rank-probe", sys.executable, "-c", RANK_PROBE, env=env, timeout=120
    )
    rows = sorted(
        (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")), key=lambda r: r["rank"]
    )
    assert [(r["rank"], r["local_rank"]) for r in rows] == [(0, 0), (1, 1)], proc.stdout + proc.stderr
    assert all(r["world"] == 2 and r["local_world"] == 2 and r["launcher"] == "slurm" for r in rows)
    assert rows[0]["master"] == rows[1]["master"] and rows[0]["master"][0] == slurm_cluster.host
    assert all(r["sum"] == 3.0 for r in rows), "the gloo all-reduce spans both srun tasks"


def jsonl(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in jsonl(run_dir) if r["kind"] == "step"), default=0)


def newest_committed_step(root: Path) -> int:
    """A checkpoint exists once its manifest is committed (docs/architecture.md: commit protocol)."""
    steps = [int(d.name.split("-")[1]) for d in root.glob("step-*") if (d / "manifest.json").is_file()]
    return max(steps, default=0)


@pytest.fixture
def slurm_config(tiny_raw, tmp_path) -> Path:
    """Hundreds of short steps (enough to be interrupted) and a checkpoint every 10 steps, skipped rather than
    waited for while the previous one persists, so checkpoint writes on a busy machine do not slow the steps."""
    for phase in tiny_raw["data"]["phases"]:
        phase["tokens"] *= 100
    tiny_raw["checkpoint"] = {"interval": 10, "keep_last": 2, "on_busy": "skip", "l0_interval": 0}
    return write_toml(tiny_raw, tmp_path / "tiny.toml")


@pytest.mark.slow
# sbatch, the five waits below, and six Slurm client calls (job state, scancel) outside them
@pytest.mark.timeout(CLUSTER + 120 + (120 + 60 + 60 + 90 + 180) + 6 * CLIENT_TIMEOUT + MARGIN)
def test_submitted_job_trains_checkpoints_on_usr1_requeues_and_resumes(slurm_cluster, slurm_config, tmp_path):
    cluster = slurm_cluster
    run_dir = tmp_path / "run"
    started = time.monotonic()
    submit = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "launch",
            "slurm",
            "--config",
            str(slurm_config),
            "--run-dir",
            str(run_dir),
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
            "--time",
            "10",
            "--job-name",
            "ecpt-slurm-test",
            "--set",
            f"train.max_steps={MAX_STEPS}",
            "--submit",
        ],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted batch job (\d+)", submit.stdout).group(1)
    out_file = run_dir / f"slurm-{job_id}.out"
    assert (run_dir / "config.json").is_file() and (run_dir / "ecpt-slurm-test.sbatch").is_file()

    def output() -> str:
        return out_file.read_text() if out_file.exists() else ""

    def job():
        return cluster.job(job_id)

    # 1. It trains under Slurm; then the time-limit warning arrives (sent now instead of minutes before --time).
    wait_for(
        lambda: last_step(run_dir) >= SIGNAL_AFTER_STEP,
        120,
        f"step {SIGNAL_AFTER_STEP} in metrics.jsonl (job state {job().get('JobState')}):\n{output()}",
        interval=SLURM_POLL,
    )
    assert job()["JobState"] == "RUNNING"
    signalled_at = time.monotonic()
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    # 2. Every worker stops at one step boundary after an emergency checkpoint, and the job requeues itself.
    stop = wait_for(
        lambda: next((r for r in jsonl(run_dir) if r["kind"] == "stop"), None),
        60,
        f"a stop record in metrics.jsonl:\n{output()}",
        interval=SLURM_POLL,
    )
    stopped_at = stop["step"]
    assert SIGNAL_AFTER_STEP <= stopped_at < MAX_STEPS, "stopped by the signal, before the end of training"
    wait_for(
        lambda: "agents exited with code" in output(), 60, f"the first run to end:\n{output()}", interval=SLURM_POLL
    )
    saved = newest_committed_step(run_dir / "checkpoints")
    assert saved == stopped_at, (saved, stopped_at)  # the emergency save wrote the step it stopped at
    wait_for(
        lambda: "SLURM_RESTART_COUNT=1" in output(),
        90,
        f"the requeued job to start again (job {job()}):\n{output()}",
        interval=SLURM_POLL,
    )
    requeued_after = time.monotonic() - signalled_at
    first_run = output().split("SLURM_RESTART_COUNT=1")[0]
    assert "USR1 received" in first_run and "requeueing job" in first_run and "emergency checkpoint" in first_run
    stops = re.findall(r"\[rank (\d+) step (\d+)\] stopped by signal (\d+)", first_run)
    assert sorted(stops) == [("0", str(stopped_at), str(SIGUSR1)), ("1", str(stopped_at), str(SIGUSR1))], stops
    assert "agents exited with code 0" in first_run, "the agents ignore USR1; their workers exit cleanly"

    # 3. The rerun resumes from the checkpoint saved at the stop and finishes.
    wait_for(
        lambda: job()["JobState"] == "COMPLETED",
        180,
        f"the rerun to complete (job {job()}):\n{output()}",
        interval=SLURM_POLL,
    )
    final = job()
    assert final["Restarts"] == "1" and final["ExitCode"] == "0:0", final
    records = jsonl(run_dir)
    resume = [r for r in records if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == saved, (resume, saved)
    after = [r["step"] for r in records[records.index(resume[0]) :] if r["kind"] == "step"]
    assert after == list(range(saved + 1, MAX_STEPS + 1)), "continues at the step after the checkpoint"
    print(
        f"slurm: stopped at step {stopped_at}, checkpoint {saved}, rerun started {requeued_after:.1f} s after "
        f"USR1, whole test {time.monotonic() - started:.1f} s"
    )


@pytest.mark.slow
@pytest.mark.timeout(CLUSTER + 120 + 240 + 2 * CLIENT_TIMEOUT + MARGIN)
def test_replicas_mode_job_survives_a_killed_replica_and_heals_it(slurm_cluster, tiny_raw, tmp_path):
    """`ecpt launch slurm --submit` in replicas mode on the one-node cluster: the batch shell starts the quorum
    coordinator, srun starts the node's two replica groups (`launch.replicas_node`, node rank from SLURM_NODEID);
    replica 1 is killed mid-step, replica 0 goes on alone, replica 1's agent restarts it and it heals from replica 0;
    the job completes with both replicas identical and every sample used once."""
    from support.replicas import assert_each_sample_once, replica_ends, replicas_config

    steps = 3 * 20
    config = replicas_config(tiny_raw, tmp_path, steps_per_phase=20)
    run_dir = tmp_path / "run"
    submit = subprocess.run(
        [sys.executable, "-m", "launch.cli", "launch", "slurm", "--config", str(config), "--run-dir", str(run_dir)]
        + ["--nodes", "1", "--gpus-per-node", "0", "--time", "10", "--job-name", "ecpt-slurm-replicas", "--submit"]
        + ["--set", 'faults.plan=["kill rank 1 during step 5"]'],
        cwd=REPO,
        env={**slurm_cluster.env, "ECPT_ADVERTISE_HOST": "127.0.0.1"},  # replicas meet on the loopback here
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted batch job (\d+)", submit.stdout).group(1)
    out_file = run_dir / f"slurm-{job_id}.out"

    def output() -> str:
        return out_file.read_text() if out_file.exists() else ""

    wait_for(
        lambda: slurm_cluster.job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
        240,
        f"the replicas-mode job to end:\n{output()}",
        interval=SLURM_POLL,
    )
    final = slurm_cluster.job(job_id)
    text = output()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", (final, text[-4000:])
    assert "replica groups 0..1 of one worker on node rank 0" in text, text[-4000:]
    assert "step 5 discarded" in text and "healed from live peer replica 0" in text, text[-4000:]
    ends = replica_ends(run_dir)
    assert ends[0]["step"] == ends[1]["step"] == steps and ends[0]["digest"] == ends[1]["digest"], ends
    assert_each_sample_once(run_dir, steps, 6)
