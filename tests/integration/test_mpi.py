"""Workers under mpiexec (the mpich wheel's): ranks from MPI, MASTER_ADDR/PORT broadcast over MPI, and training
identical to the torchrun launch of the same config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch.mpi import find_mpiexec
from support.configs import write_toml
from support.processes import REPO, communicate_all

pytest.importorskip("mpi4py", reason="the MPI launch needs mpi4py: pip install 'ecpt[mpi]'")

RANK_PROBE = textwrap.dedent("""
    import json, os
    import torch, torch.distributed as dist
    from elastic.world import detect_world, init_distributed, shutdown_distributed
    world = detect_world()
    init_distributed(world, timeout_s=60)
    t = torch.tensor([world.rank + 1.0])
    dist.all_reduce(t)
    # One file per rank: mpiexec merges both ranks' stdout and may interleave their lines.
    row = {"rank": world.rank, "world": world.world_size, "local_rank": world.local_rank,
           "launcher": world.launcher, "master": [os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]],
           "sum": t.item(), "torchrun_env": "RANK" in os.environ}
    with open(os.path.join(os.environ["PROBE_OUT"], f"rank-{world.rank}.json"), "w") as f:
        json.dump(row, f)
    shutdown_distributed()
""")


def clean_env() -> dict[str, str]:
    """No launcher variables from the outside: whatever the workers know must come from mpiexec."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "PMI_RANK")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_mpiexec_ranks_build_a_gloo_world_without_torchrun(tmp_path):
    mpiexec = find_mpiexec()
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "-c", RANK_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env() | {"PROBE_OUT": str(tmp_path)},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.glob("rank-*.json")) == ["rank-0.json", "rank-1.json"], proc.stderr
    rows = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in rows] == [0, 1] and [r["local_rank"] for r in rows] == [0, 1]
    assert all(r["world"] == 2 and r["launcher"] == "mpich" and not r["torchrun_env"] for r in rows)
    assert rows[0]["master"] == rows[1]["master"] and rows[0]["master"][0] == "127.0.0.1", rows
    assert all(r["sum"] == 3.0 for r in rows), "the gloo all-reduce spans both MPI ranks"


def step_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "step"]


@pytest.mark.slow
def test_mpi_training_is_identical_to_torchrun(tiny_raw, tmp_path):
    config = write_toml(tiny_raw, tmp_path / "tiny.toml")
    common = ["--config", str(config), "--set", "train.max_steps=5"]
    runs = {
        "mpi": [
            sys.executable,
            "-m",
            "launch.cli",
            "launch",
            "mpi",
            "-n",
            "2",
            "--run-dir",
            str(tmp_path / "mpi"),
            *common,
        ],
        "torchrun": [
            sys.executable,
            "-m",
            "launch.cli",
            "train",
            "--nproc-per-node",
            "2",
            "--run-dir",
            str(tmp_path / "torchrun"),
            *common,
        ],
    }
    # Both at once: each worker uses one thread, so they share the cores without changing any result.
    procs = {
        name: subprocess.Popen(
            cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, cmd in runs.items()
    }
    done = communicate_all(list(procs.values()), 240, "the mpi and torchrun runs")
    outputs = {name: out for name, (_, out, _) in zip(procs, done)}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} run failed:\n{outputs[name][-4000:]}"
    assert "mpich mpiexec: 2 ranks" in outputs["mpi"]
    mpi, torchrun = step_rows(tmp_path / "mpi"), step_rows(tmp_path / "torchrun")
    assert [r["step"] for r in mpi] == [1, 2, 3, 4, 5]
    assert [r["world_size"] for r in mpi] == [2] * 5
    assert [r["loss"] for r in mpi] == [r["loss"] for r in torchrun], "same config, same losses, bit for bit"
    assert [r["lr"] for r in mpi] == [r["lr"] for r in torchrun]
    ranks = [json.loads((tmp_path / "mpi" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
