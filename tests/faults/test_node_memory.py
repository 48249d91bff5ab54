"""Node memory belongs to the user: the real `ecpt train` against a private L0 root in /dev/shm.

A recreated run directory starts over; a finished or stopped run frees its memory checkpoints; a crashed run
keeps them, restores from them when restarted, and loses them to the next unrelated run once its agent is gone,
while a live run's memory is never touched (rules in elastic/memory_levels.py).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from elastic import memory_levels
from elastic.metrics import read_jsonl
from support.configs import write_toml
from support.processes import REPO, ecpt_command as _ecpt, start_ecpt_train
from support.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def l0_root():
    """A private L0 root in node memory, removed afterwards (a failed test may leave memory behind)."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    root = Path("/dev/shm") / f"ecpt-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _config(raw: dict, path: Path, l0_root: Path, steps_per_phase: int = 1, **checkpoint) -> Path:
    raw = copy.deepcopy(raw)
    for phase in raw["data"]["phases"]:
        phase["tokens"] = steps_per_phase * raw["train"]["global_batch"] * raw["model"]["seq_len"]
    raw["checkpoint"] = {"interval": 0, "l0_interval": 1, "l0_dir": str(l0_root), **checkpoint}
    raw["launch"]["monitor_interval"] = 0.2
    return write_toml(raw, path)


def _train(config: Path, run: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _ecpt(["train", "--config", str(config), "--run-dir", str(run), *extra]),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _entry(l0_root: Path, run: Path) -> Path:
    """The run's memory entry, named by its identity."""
    run_id = (run / memory_levels.RUN_ID_FILE).read_text().strip()
    (entry,) = l0_root.glob(f"*-{run_id}")
    return entry


def _alive(pid: int) -> bool:
    return memory_levels.process_start_ticks(pid) is not None


def _crash_mid_run(config: Path, run: Path, l0_root: Path) -> int:
    """Start a long run, and once a step is committed in memory SIGKILL its agent's session (agent, fork server;
    the workers die with their parent) and the launcher: a node crash, nothing gets to clean up. Returns the last
    step the run logged."""
    proc = start_ecpt_train(config, "--run-dir", str(run))
    try:
        wait_for(
            lambda: (
                (run / "metrics.jsonl").exists()
                and len(read_jsonl(run / "metrics.jsonl", "step")) >= 2
                and list(l0_root.glob("*/*/step-*/manifest.json"))
            ),
            120,
            "two steps and a memory checkpoint",
            proc,
        )
        workers = [json.loads((run / "ranks" / f"rank-{r}.json").read_text())["pid"] for r in (0, 1)]
        environ = Path(f"/proc/{workers[0]}/environ").read_text().split("\0")
        agent = int(next(kv for kv in environ if kv.startswith("ECPT_AGENT_PID=")).split("=", 1)[1])
        os.killpg(agent, signal.SIGKILL)  # the agent leads its own session (launch.local.run_agent)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    wait_for(lambda: not any(_alive(p) for p in [agent, *workers]), 30, "the agent and workers to die")
    return read_jsonl(run / "metrics.jsonl", "step")[-1]["step"]


@pytest.mark.timeout(420)
def test_deleting_the_run_directory_starts_the_run_over(tiny_raw, tmp_path, l0_root):
    config = _config(tiny_raw, tmp_path / "l0-only.toml", l0_root)  # L0 only: a finished run keeps its memory
    run = tmp_path / "run"
    first = _train(config, run)
    assert "newest step 3 is only in memory (no slower level is configured)" in first.stderr
    old_entry = _entry(l0_root, run)
    assert list(old_entry.glob("*/step-00000003/manifest.json"))
    shutil.rmtree(run)
    second = _train(config, run)
    assert not read_jsonl(run / "metrics.jsonl", "resume")
    assert read_jsonl(run / "metrics.jsonl", "step")[0]["step"] == 1
    assert second.stderr.count("ignoring memory checkpoints of an earlier run") == 1
    assert not old_entry.exists()  # its agent has ended: the new run reaped it
    assert [p.name for p in l0_root.iterdir()] == [_entry(l0_root, run).name]


@pytest.mark.timeout(420)
def test_finished_and_stopped_runs_leave_nothing_in_memory(tiny_raw, tmp_path, l0_root):
    config = _config(tiny_raw, tmp_path / "l0-l1.toml", l0_root, interval=3)  # the last step (3) reaches L1
    finished = _train(config, tmp_path / "finished")
    assert "freed memory checkpoints" in finished.stderr
    assert not any(l0_root.iterdir())
    config = _config(tiny_raw, tmp_path / "long.toml", l0_root, steps_per_phase=100, interval=50)
    stopped = tmp_path / "stopped"
    result = subprocess.run(
        _ecpt(["train", "--config", str(config), "--run-dir", str(stopped), "--fault", "sigterm all at step 2"]),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode != 0  # preempted: the job did not finish
    stop = read_jsonl(stopped / "metrics.jsonl", "stop")[-1]["step"]
    assert list((stopped / "checkpoints").glob(f"step-{stop:08d}"))  # the emergency save made it durable
    assert not any(l0_root.iterdir()), result.stderr[-4000:]


@pytest.mark.timeout(420)
def test_a_crashed_run_restarts_from_its_memory(tiny_raw, tmp_path, l0_root):
    config = _config(tiny_raw, tmp_path / "long.toml", l0_root, steps_per_phase=100)
    run = tmp_path / "run"
    last = _crash_mid_run(config, run, l0_root)
    entry = _entry(l0_root, run)
    assert list(entry.glob("*/step-*/manifest.json"))  # a crash frees nothing
    _train(config, run, "--set", f"train.max_steps={last + 2}")
    (resume,) = read_jsonl(run / "metrics.jsonl", "resume")
    assert resume["level"] == "L0" and 1 <= resume["step"] <= last
    assert read_jsonl(run / "metrics.jsonl", "step")[-1]["step"] == last + 2


@pytest.mark.timeout(420)
def test_an_unrelated_run_reaps_dead_memory_and_spares_live_memory(tiny_raw, tmp_path, l0_root):
    crashed = tmp_path / "crashed"
    _crash_mid_run(_config(tiny_raw, tmp_path / "long.toml", l0_root, steps_per_phase=100), crashed, l0_root)
    dead_entry = _entry(l0_root, crashed)
    live_entry = l0_root / memory_levels.entry_name("0" * 12, "1" * 12)
    memory_levels.claim(live_entry, "n0", tmp_path / "live", "1" * 12, os.getpid())  # this test is alive
    (live_entry / "n0" / "step-00000001").mkdir(parents=True)
    other = _train(_config(tiny_raw, tmp_path / "short.toml", l0_root, interval=3), tmp_path / "other")
    assert f"stale memory checkpoints {dead_entry}" in other.stderr
    assert sorted(p.name for p in l0_root.iterdir()) == [live_entry.name]  # the other run freed its own, too
    assert (live_entry / "n0" / "step-00000001").is_dir()
