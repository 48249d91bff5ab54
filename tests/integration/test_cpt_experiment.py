"""The miniature CPT experiment (configs/cpt-mini.toml: a base pre-trained on prose until its loss flattens, then 2
arms, a tiny model, 4 steps per arm phase) through the real ``ecpt experiment cpt`` command: the base built once,
published whole and reused, ``--base`` instead of it, arms that start exactly from it, table, plots, JSON, skipping
finished arms and redoing an unfinished one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
MINI = REPO / "configs" / "cpt-mini.toml"
ARMS = ["cosine", "infinite-replay"]
RUN_TIMEOUT = 240
"""One `ecpt experiment cpt` run on the miniature config (a few seconds when the machine is quiet)."""
TWO_RUNS = pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
"""The tests after the first may run the module's shared first run and then their own: both budgets, plus margin."""


def cpt_command(out: Path, corpus: dict[str, Path], *extra: str, cache: Path | None = None) -> list[str]:
    """``python -m launch.cli experiment cpt`` on the miniature config and the session's small text corpus."""
    sources = [f'--set=data.sources.{d}=["{p}/*.txt"]' for d, p in corpus.items()]
    return [
        sys.executable,
        "-m",
        "launch.cli",
        "experiment",
        "cpt",
        "--config",
        str(MINI),
        "--out",
        str(out),
        f'--set=data.cache_dir="{cache or out.parent / "cache"}"',
        *sources,
        *extra,
    ]


def ecpt_cpt(out: Path, corpus: dict[str, Path], *extra: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cpt_command(out, corpus, *extra, cache=cache),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails unless the file starts with the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def published_bases(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("cpt-base-*") if p.is_dir() and not p.name.endswith(".build"))


def assert_starts_from(result: dict, base_losses: dict[str, float]) -> None:
    """The arm's step-0 evaluation (before any update) is the base's own last evaluation: the same fixed validation
    windows through the same weights, the base in ecpt's model and the arm in transformers' LlamaForCausalLM. A
    randomly initialised byte model scores about ln 256 = 5.5 here, far from the trained base."""
    curves = result["curves"]
    assert curves["eval_steps"][0] == 0
    for domain, loss in base_losses.items():
        assert curves["losses"][domain][0] == pytest.approx(loss, rel=1e-5, abs=1e-6), domain


@pytest.fixture(scope="module")
def first_run(text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpt") / "out"
    proc = ecpt_cpt(out, text_corpus, "--parallel", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
@TWO_RUNS
def test_base_is_pre_trained_once_published_whole_and_the_arms_start_from_it(first_run):
    out, proc = first_run
    cache = out.parent / "cache"
    assert proc.stdout.count("[cpt] base: pre-training on prose") == 1
    [base] = published_bases(cache)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("cpt-base-")) == [
        base.name,
        f"{base.name}.lock",
    ]  # no build directory, no temporary directory left behind
    assert {"config.json", "model.safetensors", "base.json"} <= {p.name for p in base.iterdir()}
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 256
    info = json.loads((base / "base.json").read_text())
    # The rule (patience 2, min_improvement 8%, evaluated every 4 steps) stopped it, or the 24-step cap did; either
    # way the stop step agrees with the rule applied to the recorded prose curve.
    prose = info["curves"]["losses"]["prose"]
    assert info["curves"]["eval_steps"] == list(range(4, info["steps"] + 1, 4))
    from launch.cpt.base_spec import flattened

    if info["stopped"] == "flattened":
        assert info["steps"] < info["cap"] == 24
        assert flattened(prose, 2, 0.08) and not flattened(prose[:-1], 2, 0.08)
    else:
        assert info["steps"] == info["cap"] == 24 and not any(flattened(prose[:n], 2, 0.08) for n in range(7))
    assert prose[-1] < prose[0] - 0.1  # it learned prose
    res = json.loads((out / "results.json").read_text())
    assert res["base"]["init"] == f"hf:{base.resolve()}" and res["base"]["steps"] == info["steps"]
    for arm in ARMS:
        result = json.loads((out / "arms" / arm / "result.json").read_text())
        assert result["base"] == {"init": f"hf:{base.resolve()}", "steps": info["steps"]}
        assert_starts_from(result, info["final_losses"])
    # Forgetting of the base's domain is measured from the base (arm step 0).
    forgetting = res["arms"]["cosine"]["metrics"]["forgetting"][0]
    assert forgetting["domain"] == "prose" and forgetting["loss_at_phase_end"] == info["final_losses"]["prose"]


@pytest.mark.slow
@TWO_RUNS
def test_writes_table_plot_and_json(first_run):
    out, proc = first_run
    for arm in ARMS:
        assert f"[cpt] start {arm}" in proc.stdout and f"[cpt] done {arm}" in proc.stdout
        assert (out / "arms" / arm / "result.json").is_file()
    md = (out / "results.md").read_text()
    assert "| arm | schedule | replay | final prose | final python | final c | avg final |" in md
    assert "| cosine | cosine, warmup 1 | 0% |" in md and "| infinite-replay | infinite, warmup 0 | 10% |" in md
    assert "## Stability gap after every shift" in md
    assert "| cosine | cosine, warmup 1 | 0% |" in proc.stdout  # the table is printed, not only written

    width, height = png_size(out / "curves.png")
    assert width > 500 and height > 500

    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"command", "config", "domains", "phase_names", "phase_domains", "phase_ends", "arms"}
    assert res["phase_ends"] == [0, 4, 8] and res["phase_domains"] == ["prose", "python", "c"]
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
        assert curves["eval_steps"] == [0, 2, 4, 6, 8]  # step 0 (the base), every 2 steps, and every phase end
        assert curves["steps"] == list(range(1, 9)) and len(curves["lr"]) == 8
        assert [(g["shift"], g["domain"]) for g in a["metrics"]["stability_gaps"]] == [
            (1, "prose"),
            (2, "prose"),
            (2, "python"),
        ]
        assert a["metrics"]["final_losses"] == {d: v[-1] for d, v in curves["losses"].items()}
    # Re-warming: the cosine arm's LR jumps back up to lr_max at each phase start; the infinite one continues the
    # base at lr_const and never rises.
    cos_lr, inf_lr = res["arms"]["cosine"]["curves"]["lr"], res["arms"]["infinite-replay"]["curves"]["lr"]
    assert cos_lr[1] == cos_lr[5] == pytest.approx(3e-3) and cos_lr[3] < 1e-3 and cos_lr[7] < 1e-3
    assert inf_lr[0] == pytest.approx(1.65e-3) and all(b <= a for a, b in zip(inf_lr, inf_lr[1:]))
    assert res["arms"]["infinite-replay"]["arm"]["replay"] == 0.1


@pytest.mark.slow
@TWO_RUNS
def test_rerun_skips_finished_arms_and_recomputes_the_table(first_run, text_corpus):
    out, _ = first_run
    before = {arm: (out / "arms" / arm / "result.json").read_bytes() for arm in ARMS}
    (out / "results.md").unlink()
    [base] = published_bases(out.parent / "cache")
    base_info = (base / "base.json").read_bytes()
    proc = ecpt_cpt(out, text_corpus)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[cpt] base: reusing {base}" in proc.stdout and "[cpt] base: pre-training" not in proc.stdout
    assert (base / "base.json").read_bytes() == base_info
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
    # As if the run had been killed after step 4's checkpoint: no result, no step-8 checkpoint, the log stays.
    result.unlink()
    shutil.rmtree(arm / "checkpoints" / "step-00000008")
    proc = ecpt_cpt(out, text_corpus)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[cpt] start cosine" in proc.stdout and "[cpt] skip infinite-replay" in proc.stdout
    rows = [json.loads(line) for line in (arm / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "resume"] == [4]  # only steps 5-8 were trained again
    redone = json.loads(result.read_text())
    assert redone["curves"] == finished["curves"]  # deterministic: the resumed trajectory is bit-identical


@pytest.mark.slow
@TWO_RUNS
def test_changed_config_is_refused_instead_of_mixed(first_run, text_corpus):
    out, _ = first_run
    proc = ecpt_cpt(out, text_corpus, "--set", "train.eval_interval=4")  # an arm setting: the base stays valid
    assert proc.returncode == 2
    assert "was produced by a different config" in proc.stderr and "use another --out" in proc.stderr


def test_unknown_arm_names_the_valid_ones(tmp_path, text_corpus):
    proc = ecpt_cpt(tmp_path / "out", text_corpus, "--arms", "cosine,nope")
    assert proc.returncode == 2
    assert "--arms names unknown arm(s) ['nope']" in proc.stderr and "'infinite-replay'" in proc.stderr
    assert not (tmp_path / "out" / "arms").exists()


@pytest.mark.slow
@TWO_RUNS
def test_given_base_is_used_instead_of_pre_training(first_run, text_corpus, tmp_path):
    out, _ = first_run
    [built] = published_bases(out.parent / "cache")
    given = tmp_path / "given-model"  # a copy elsewhere: the arms must load this directory, not the cache
    shutil.copytree(built, given)
    info = json.loads((given / "base.json").read_text())
    cache = tmp_path / "cache"  # an empty cache: a base pre-trained by mistake would appear here
    proc = ecpt_cpt(
        tmp_path / "out",
        text_corpus,
        "--arms",
        "cosine",
        f"--base=hf:{given}",
        '--set=data.tokenizer="bytes"',
        cache=cache,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[cpt] base: given by --base, {given}" in proc.stdout and "[cpt] base: pre-training" not in proc.stdout
    assert published_bases(cache) == [] and not list(cache.glob("cpt-base-*"))
    result = json.loads((tmp_path / "out" / "arms" / "cosine" / "result.json").read_text())
    assert result["base"] == {"init": f"hf:{given}", "steps": None}
    assert_starts_from(result, info["final_losses"])


def test_missing_base_directory_names_the_flag(tmp_path, text_corpus):
    proc = ecpt_cpt(tmp_path / "out", text_corpus, f"--base=hf:{tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    assert "--base:" in proc.stderr and "is not a directory" in proc.stderr


@pytest.mark.slow
@TWO_RUNS
def test_killed_base_build_is_not_published_and_resumes(tmp_path, text_corpus):
    """A base build killed after its first checkpoint leaves nothing that looks like a base; the rerun resumes the
    build from that checkpoint and publishes it."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    # min_improvement 0: the rule stops only on no improvement at all, so the build runs on to its 24-step cap and
    # is still training when the kill comes (its checkpoints are every 4 steps).
    slow = ["--arms", "cosine", "--set", "experiment.base.min_improvement=0"]
    cmd = cpt_command(out, text_corpus, *slow, cache=cache)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_for(
            lambda: list(cache.glob("cpt-base-*.build/checkpoints/step-00000004/manifest.json")),
            RUN_TIMEOUT,
            "the base build's first checkpoint",
            proc=proc,
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert published_bases(cache) == []  # only the build directory (and the lock): nothing that looks complete
    assert not (out / "arms" / "cosine" / "result.json").exists()

    again = ecpt_cpt(out, text_corpus, *slow, cache=cache)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    [base] = published_bases(cache)
    rows = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in rows if r["kind"] == "resume"]
    assert len(resumed) == 1 and resumed[0] >= 4  # continued from the killed build's checkpoint, not from scratch
    info = json.loads((base / "base.json").read_text())
    assert_starts_from(json.loads((out / "arms" / "cosine" / "result.json").read_text()), info["final_losses"])
