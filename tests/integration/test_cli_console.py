"""What a user sees on the console of `ecpt train` (real torchrun agent, 2 gloo workers, the real CLI): one line per
committed checkpoint, written through the progress bar rather than into it, and each distinct third-party warning
once per job rather than once per call and rank."""

from __future__ import annotations

import collections
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.configs import write_toml
from support.processes import REPO

pytestmark = pytest.mark.slow
STEPS, L1_INTERVAL = 6, 2
COMMIT_LINE = re.compile(r"checkpoint step (\d+) committed on L1 ")
LOG_LINE_START = re.compile(r"\d\d:\d\d:\d\d \[rank 0 step [-\d]+\] ")


def _train(raw: dict, tmp_path: Path) -> str:
    """Run `ecpt train` on ``raw``; the console output (stdout, then stderr) of a successful run."""
    cfg = write_toml(raw, tmp_path / "cfg.toml")
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.timeout(240)
@pytest.mark.parametrize("l0_interval", [0, 1], ids=["L1-written-directly", "L1-promoted-from-L0"])
def test_one_line_per_committed_checkpoint_through_the_progress_bar(tiny_raw, tmp_path, l0_interval):
    raw = copy.deepcopy(tiny_raw)
    raw["train"].update(max_steps=STEPS, progress=True)
    raw["checkpoint"] = {
        "interval": L1_INTERVAL,
        "keep_last": STEPS,
        "l0_interval": l0_interval,
        "l0_dir": str(tmp_path / "shm"),
    }
    out = _train(raw, tmp_path)
    # The bar draws itself after a carriage return and ends without a newline: a log line written into it shares
    # its segment. Every rank-0 line must start its own segment (those after the bar's first draw are in it).
    segments = re.split(r"[\r\n]", out)
    rank0 = [seg for seg in segments if "[rank 0 step" in seg]
    assert all(LOG_LINE_START.match(seg) for seg in rank0), "\n".join(rank0)
    commits = [seg for seg in segments if COMMIT_LINE.search(seg)]
    steps = [int(COMMIT_LINE.search(seg).group(1)) for seg in commits]
    assert sorted(steps) == list(range(L1_INTERVAL, STEPS + 1, L1_INTERVAL)), "\n".join(commits)
    committed_dirs = sorted(p.name for p in (Path(raw["train"]["run_dir"]) / "checkpoints").glob("step-*"))
    assert committed_dirs == [f"step-{s:08d}" for s in sorted(steps)]
    assert all(seg in rank0 for seg in commits), "\n".join(commits)
    assert "train: 100%" in out  # the bar was on


@pytest.mark.timeout(300)
def test_zero3_shows_each_distinct_future_warning_once(tiny_raw, tmp_path):
    """DeepSpeed's ZeRO-3 calls deprecated torch collectives on every step: torch warned on every call, per rank."""
    raw = copy.deepcopy(tiny_raw)
    raw["train"].update(engine="deepspeed", max_steps=3)
    raw["deepspeed"] = {"zero_stage": 3}
    out = _train(raw, tmp_path)
    texts = collections.Counter(
        line.split("FutureWarning:", 1)[1].strip() for line in out.splitlines() if "FutureWarning:" in line
    )
    assert all(n == 1 for n in texts.values()), texts
