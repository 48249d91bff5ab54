"""`ecpt train` end to end: real torchrun agent, 2 gloo workers, the real CLI."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from elastic.metrics import read_jsonl
from support.configs import write_toml
from support.processes import REPO, ecpt_command, ecpt_train, pid_alive, start_ecpt_train
from support.trajectory import step_rows
from support.waiting import wait_for

pytestmark = pytest.mark.slow


def test_train_runs_all_phases_on_two_workers(tiny_raw, tmp_path):
    cfg = write_toml(tiny_raw, tmp_path / "tiny.toml")
    run = tmp_path / "run"
    result = ecpt_train(cfg, run)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = read_jsonl(run / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert {r["world_size"] for r in steps} == {2}
    assert steps[-1]["cursor"] == 12 * 6
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    phase_ends = [r for r in read_jsonl(run / "metrics.jsonl", "eval") if r["phase_end"]]
    assert [r["step"] for r in phase_ends] == [4, 8, 12]
    assert set(phase_ends[-1]["losses"]) == {"prose", "python", "c"}
    assert result.stderr.count("validation loss per domain") == 3
    targets = sorted((run / "prometheus").glob("rank-*.json"))
    assert [t.name for t in targets] == ["rank-0.json", "rank-1.json"]


def test_workers_do_not_rerun_the_agent_module(tiny_raw, tmp_path):
    """multiprocessing re-ran the agent's main module in every forked worker, where the fork server had already
    imported it: runpy warned "'launch.agent' found in sys.modules ..." once per worker on every run."""
    cfg = write_toml(tiny_raw, tmp_path / "tiny.toml")
    result = subprocess.run(
        ecpt_command(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--set", "train.max_steps=1"]),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RuntimeWarning" not in result.stderr, result.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl", "step")] == [1]


def test_bad_config_fails_before_any_process_starts(tiny_raw, tmp_path):
    cfg = write_toml(tiny_raw, tmp_path / "tiny.toml")
    run = tmp_path / "run"
    result = ecpt_train(cfg, run, "--set", "train.micro_batch=0", timeout=60)
    assert result.returncode == 2
    assert "train.micro_batch must be >= 1" in result.stderr
    assert not (run / "ranks").exists()


def _start_long_run(tiny_raw, tmp_path) -> tuple[subprocess.Popen, Path, list[int]]:
    raw = copy.deepcopy(tiny_raw)
    for phase in raw["data"]["phases"]:
        phase["tokens"] *= 500  # long enough that the test, not the schedule, ends it
    cfg = write_toml(raw, tmp_path / "long.toml")
    run = tmp_path / "run"
    proc = start_ecpt_train(cfg, "--run-dir", str(run))
    wait_for(lambda: step_rows(run), 120, "the first training step", proc)
    pids = [json.loads((run / "ranks" / f"rank-{r}.json").read_text())["pid"] for r in (0, 1)]
    assert all(pid_alive(p) for p in pids)
    return proc, run, pids


def test_ctrl_c_stops_every_worker(tiny_raw, tmp_path):
    proc, run, pids = _start_long_run(tiny_raw, tmp_path)
    agent, server = _agent_and_fork_server(pids[0])
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground process group on Ctrl-C
    proc.wait(timeout=60)
    wait_for(
        lambda: not any(pid_alive(p) for p in [agent, server, *pids]), 30, "agent, fork server and workers to exit"
    )


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _agent_and_fork_server(worker: int) -> tuple[int, int]:
    """A worker's parent is launch.agent's fork server, whose parent is the agent (named in ECPT_AGENT_PID)."""
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{worker}/environ").read_text().split("\0") if "=" in kv)
    agent, server = int(env["ECPT_AGENT_PID"]), _parent(worker)
    assert _parent(server) == agent and agent != server
    return agent, server


def test_killing_the_agent_leaves_no_orphans(tiny_raw, tmp_path):
    proc, run, pids = _start_long_run(tiny_raw, tmp_path)
    agent, server = _agent_and_fork_server(pids[0])
    assert _parent(agent) == proc.pid
    os.kill(agent, signal.SIGKILL)
    wait_for(
        lambda: not any(pid_alive(p) for p in [server, *pids]), 30, "fork server and workers to die with the agent"
    )
    proc.wait(timeout=30)


def test_killing_the_launcher_stops_agent_and_workers(tiny_raw, tmp_path):
    proc, run, pids = _start_long_run(tiny_raw, tmp_path)
    agent, server = _agent_and_fork_server(pids[0])
    os.kill(proc.pid, signal.SIGKILL)  # only the launcher: the agent runs in its own session
    proc.wait(timeout=10)
    wait_for(
        lambda: not any(pid_alive(p) for p in [agent, server, *pids]),
        60,
        "agent, fork server and workers to stop with the launcher",
    )
