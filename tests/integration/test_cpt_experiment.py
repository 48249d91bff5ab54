"""The miniature CPT experiment (configs/cpt-mini.toml: 2 arms, a tiny model, 4 steps per phase) through the real
``ecpt experiment cpt`` command: table, plots, JSON, skipping finished arms and redoing an unfinished one."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MINI = REPO / "configs" / "cpt-mini.toml"
ARMS = ["cosine", "infinite-replay"]
RUN_TIMEOUT = 240
"""One `ecpt experiment cpt` run on the miniature config (a few seconds when the machine is quiet)."""
TWO_RUNS = pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
"""The tests after the first may run the module's shared first run and then their own: both budgets, plus margin."""


def ecpt_cpt(out: Path, corpus: dict[str, Path], *extra: str) -> subprocess.CompletedProcess:
    """``python -m launch.cli experiment cpt`` on the miniature config and the session's small text corpus."""
    sources = [f'--set=data.sources.{d}=["{p}/*.txt"]' for d, p in corpus.items()]
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "experiment",
        "cpt",
        "--config",
        str(MINI),
        "--out",
        str(out),
        f'--set=data.cache_dir="{out.parent / "cache"}"',
        *sources,
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails unless the file starts with the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def first_run(text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpt") / "out"
    proc = ecpt_cpt(out, text_corpus, "--parallel", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
@TWO_RUNS
def test_writes_table_plot_and_json(first_run):
    out, proc = first_run
    for arm in ARMS:
        assert f"[cpt] start {arm}" in proc.stdout and f"[cpt] done {arm}" in proc.stdout
        assert (out / "arms" / arm / "result.json").is_file()
    md = (out / "results.md").read_text()
    assert "| arm | schedule | replay | final prose | final python | final c | avg final |" in md
    assert "| cosine | cosine, warmup 1 | 0% |" in md and "| infinite-replay | infinite, warmup 1 | 10% |" in md
    assert "## Stability gap after every shift" in md
    assert "| cosine | cosine, warmup 1 | 0% |" in proc.stdout  # the table is printed, not only written

    width, height = png_size(out / "curves.png")
    assert width > 500 and height > 500

    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"command", "config", "domains", "phase_names", "phase_domains", "phase_ends", "arms"}
    assert res["phase_ends"] == [4, 8, 12] and res["phase_domains"] == ["prose", "python", "c"]
    assert list(res["arms"]) == ARMS
    for arm in ARMS:
        a = res["arms"][arm]
        assert set(a) >= {"arm", "wall_seconds", "metrics", "curves"}
        assert set(a["metrics"]) == {
            "phase_end_losses",
            "final_losses",
            "average_final_loss",
            "forgetting",
            "stability_gaps",
        }
        curves = a["curves"]
        assert curves["eval_steps"] == [0, 2, 4, 6, 8, 10, 12]  # step 0, every 2 steps, and every phase end
        assert curves["steps"] == list(range(1, 13)) and len(curves["lr"]) == 12
        assert [(g["shift"], g["domain"]) for g in a["metrics"]["stability_gaps"]] == [
            (1, "prose"),
            (2, "prose"),
            (2, "python"),
        ]
        assert a["metrics"]["final_losses"] == {d: v[-1] for d, v in curves["losses"].items()}
    # Re-warming: the cosine arm's LR jumps back up at each phase start, the infinite one never rises again.
    cos_lr, inf_lr = res["arms"]["cosine"]["curves"]["lr"], res["arms"]["infinite-replay"]["curves"]["lr"]
    assert cos_lr[5] == cos_lr[9] == pytest.approx(3e-3) and cos_lr[3] < 1e-3 and cos_lr[7] < 1e-3
    assert all(b <= a for a, b in zip(inf_lr[1:], inf_lr[2:]))
    assert res["arms"]["infinite-replay"]["arm"]["replay"] == 0.1


@pytest.mark.slow
@TWO_RUNS
def test_rerun_skips_finished_arms_and_recomputes_the_table(first_run, text_corpus):
    out, _ = first_run
    before = {arm: (out / "arms" / arm / "result.json").read_bytes() for arm in ARMS}
    (out / "results.md").unlink()
    proc = ecpt_cpt(out, text_corpus)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for arm in ARMS:
        assert f"[cpt] skip {arm}: finished earlier" in proc.stdout
        assert f"[cpt] start {arm}" not in proc.stdout
        assert (out / "arms" / arm / "result.json").read_bytes() == before[arm]
    assert "| cosine | cosine, warmup 1 | 0% |" in (out / "results.md").read_text()


@pytest.mark.slow
@TWO_RUNS
def test_unfinished_arm_resumes_from_its_checkpoint_and_reproduces(first_run, text_corpus):
    out, _ = first_run
    arm = out / "arms" / "cosine"
    result = arm / "result.json"
    finished = json.loads(result.read_text())
    # As if the run had been killed after step 8's checkpoint: no result, no step-12 checkpoint, the log stays.
    result.unlink()
    shutil.rmtree(arm / "checkpoints" / "step-00000012")
    proc = ecpt_cpt(out, text_corpus)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[cpt] start cosine" in proc.stdout and "[cpt] skip infinite-replay" in proc.stdout
    rows = [json.loads(line) for line in (arm / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "resume"] == [8]  # only steps 9-12 were trained again
    redone = json.loads(result.read_text())
    assert redone["curves"] == finished["curves"]  # deterministic: the resumed trajectory is bit-identical


@pytest.mark.slow
@TWO_RUNS
def test_changed_config_is_refused_instead_of_mixed(first_run, text_corpus):
    out, _ = first_run
    proc = ecpt_cpt(out, text_corpus, "--set", "train.seed=1")
    assert proc.returncode == 2
    assert "was produced by a different config" in proc.stderr and "use another --out" in proc.stderr


def test_unknown_arm_names_the_valid_ones(tmp_path, text_corpus):
    proc = ecpt_cpt(tmp_path / "out", text_corpus, "--arms", "cosine,nope")
    assert proc.returncode == 2
    assert "--arms names unknown arm(s) ['nope']" in proc.stderr and "'infinite-replay'" in proc.stderr
    assert not (tmp_path / "out" / "arms").exists()
