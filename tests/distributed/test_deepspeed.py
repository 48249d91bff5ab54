"""DeepSpeed ZeRO 0-3 with real gloo ranks: the global-batch gradient invariant, and checkpoints that resume across
stages and world sizes (and to and from plain DDP) on the same loss trajectory, at the right step, LR and cursor.

Every multi-stage chain below runs segments of 2 steps; each segment resumes from the previous segment's checkpoint
in the same run directory, in a different layout, and must continue the uninterrupted DDP run's losses. The
uninterrupted run uses the same samples and global batch, so only float reduction order differs (rel 1e-4).
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from elastic.config import config_from_dict, save_config
from support.configs import tiny_config_dict
from support.processes import spawn_ranks

RANK_SCRIPT = Path(__file__).with_name("rank_deepspeed.py")
pytestmark = pytest.mark.slow
RUN_TIMEOUT = 180
"""Seconds one run of the rank script may take. A test's pytest timeout is the sum of its runs (the module's
straight run included: the first test to need it pays for it) plus MARGIN, so these deadlines fire first."""
MARGIN = 60
GLOBAL_BATCH = 7  # splits unevenly: 4 + 3 over 2 ranks, 3 + 2 + 2 over 3 (ZeRO-2/3 pad the smaller shares)
SEGMENT = 2


def _config(raw: dict, path: Path, run_dir: Path, engine: str, stage: int, **train) -> Path:
    raw = copy.deepcopy(raw)
    raw["train"].update(run_dir=str(run_dir), engine=engine, global_batch=GLOBAL_BATCH, **train)
    raw["launch"]["nproc_per_node"] = 3
    raw["deepspeed"] = {"zero_stage": stage}
    raw["checkpoint"] = {
        "interval": SEGMENT,
        "keep_last": 2,
        "l0_interval": SEGMENT,
        "l0_dir": str(path.parent / "shm"),
    }
    save_config(config_from_dict(raw), path)
    return path


@pytest.fixture(scope="module")
def raw(text_corpus, tmp_path_factory) -> dict:
    return tiny_config_dict(text_corpus, tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def straight(raw, tmp_path_factory) -> list[float]:
    """Losses of an uninterrupted 8-step DDP run at W=2: the trajectory every resumed layout must follow."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = _config(raw, tmp / "cfg.json", tmp / "run", "ddp", 0, max_steps=4 * SEGMENT)
    spawn_ranks(RANK_SCRIPT, 2, ["train", str(cfg), str(tmp / "out.json")], timeout=RUN_TIMEOUT)
    losses = json.loads((tmp / "out.json").read_text())["losses"]
    assert len(losses) == 4 * SEGMENT
    return losses


def _chain(raw: dict, tmp_path: Path, layouts: list[tuple[str, int, int]], straight: list[float]) -> list[dict]:
    """Run one segment per (engine, zero stage, world size), all in one run directory, and check each resume."""
    run, losses, outs = tmp_path / "run", [], []
    for i, (engine, stage, world) in enumerate(layouts):
        cfg = _config(raw, tmp_path / f"seg{i}.json", run, engine, stage, max_steps=(i + 1) * SEGMENT)
        out = tmp_path / f"seg{i}.out.json"
        spawn_ranks(RANK_SCRIPT, world, ["train", str(cfg), str(out)], timeout=RUN_TIMEOUT)
        seg = json.loads(out.read_text())
        where = f"segment {i} ({engine} stage {stage} at W={world})"
        assert seg["first_step"] == i * SEGMENT, where  # not "resumed as if from scratch" (DeepSpeed 6691)
        assert seg["restored_step"] == (i * SEGMENT if i else None), where
        if i:
            assert seg["saved_world_size"] == layouts[i - 1][2], where
        assert seg["tokens"] == (i + 1) * SEGMENT * GLOBAL_BATCH * raw["model"]["seq_len"], where
        assert len(seg["losses"]) == SEGMENT, where
        losses += seg["losses"]
        outs.append(seg)
    # same samples (cursor), same LR per step, same state: the uninterrupted trajectory
    assert losses == pytest.approx(straight[: len(losses)], rel=1e-4)
    return outs


@pytest.mark.timeout((1 + 4) * RUN_TIMEOUT + MARGIN)
def test_zero3_w2_to_zero1_w1_to_zero0_w2_to_zero1_w2(raw, straight, tmp_path):
    outs = _chain(
        raw, tmp_path, [("deepspeed", 3, 2), ("deepspeed", 1, 1), ("deepspeed", 0, 2), ("deepspeed", 1, 2)], straight
    )
    print(
        f"DeepSpeed ZeRO-3 start at W=2 (Trainer construction incl. deepspeed.initialize): "
        f"{outs[0]['startup_seconds']:.2f} s"
    )


@pytest.mark.timeout((1 + 2) * RUN_TIMEOUT + MARGIN)
def test_zero2_w3_to_zero3_w2(raw, straight, tmp_path):
    _chain(raw, tmp_path, [("deepspeed", 2, 3), ("deepspeed", 3, 2)], straight)


@pytest.mark.timeout((1 + 3) * RUN_TIMEOUT + MARGIN)
def test_ddp_to_zero2_and_back(raw, straight, tmp_path):
    _chain(raw, tmp_path, [("ddp", 0, 2), ("deepspeed", 2, 2), ("ddp", 0, 2)], straight)


@pytest.mark.timeout((1 + 3) * RUN_TIMEOUT + MARGIN)
def test_zero1_w2_to_zero3_w1_to_ddp_w2(raw, straight, tmp_path):
    """ZeRO-1's flat partitions saved at W=2 load into ZeRO-3's per-parameter pieces at W=1, and those into DDP."""
    _chain(raw, tmp_path, [("deepspeed", 1, 2), ("deepspeed", 3, 1), ("ddp", 0, 2)], straight)


def _grads(cfg: Path, world: int, out: Path, step: int) -> dict:
    spawn_ranks(RANK_SCRIPT, world, ["grads", str(cfg), str(out), str(step)], timeout=RUN_TIMEOUT)
    with np.load(out, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.timeout(5 * RUN_TIMEOUT + MARGIN)  # the reference and four layouts
def test_reduced_gradient_equals_single_process_full_batch(raw, tmp_path):
    """Each layout's reduced gradient (gathered for the test with safe_get_full_grad) equals the single-process
    gradient of the whole global batch: DeepSpeed's rank averaging is undone, uneven shares stay exact."""
    step = 5  # phase 1, a blend of two domains
    reference = _grads(_config(raw, tmp_path / "ref.json", tmp_path / "r", "ddp", 0), 1, tmp_path / "ref.npz", step)
    for stage, world in ((0, 3), (1, 2), (2, 3), (3, 3)):
        cfg = _config(raw, tmp_path / f"z{stage}.json", tmp_path / f"r{stage}", "deepspeed", stage)
        got = _grads(cfg, world, tmp_path / f"z{stage}.npz", step)
        assert float(got["__loss__"]) == pytest.approx(float(reference["__loss__"]), abs=1e-6)
        for name, ref in reference.items():
            np.testing.assert_allclose(got[name], ref, rtol=0, atol=1e-6, err_msg=f"{name}, stage {stage}, W={world}")
