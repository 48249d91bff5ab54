"""Checkpoint/resume through the trainer with real gloo ranks: bit-exact at the same world size, resharded at others."""

import copy
import json
from pathlib import Path

import pytest

from elastic.config import config_from_dict, save_config
from support.configs import tiny_config_dict
from support.processes import spawn_ranks

RANK_SCRIPT = Path(__file__).with_name("rank_train.py")
pytestmark = pytest.mark.slow
RUN_TIMEOUT = 180
"""Seconds one run of the rank script may take; a test's pytest timeout is its runs' sum plus MARGIN."""
MARGIN = 60


def _config(raw: dict, tmp_path: Path, name: str, run_dir: Path, **train) -> Path:
    raw = copy.deepcopy(raw)
    raw["train"].update(run_dir=str(run_dir), **train)
    raw["launch"]["nproc_per_node"] = 3
    raw["checkpoint"] = {"interval": 3, "keep_last": 2, "l0_interval": 1, "l0_dir": str(tmp_path / "shm")}
    path = tmp_path / f"{name}.json"
    save_config(config_from_dict(raw), path)
    return path


def _train(config_json: Path, world_size: int, out: Path) -> dict:
    spawn_ranks(RANK_SCRIPT, world_size, ["train", str(config_json), str(out)], timeout=RUN_TIMEOUT)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def straight(text_corpus, tmp_path_factory) -> dict:
    """The uninterrupted 12-step run at W=2 every split run must reproduce, run once for the module: its losses
    and parameters depend only on the config's seeds and the corpus, not on where it runs."""
    tmp = tmp_path_factory.mktemp("straight")
    result = _train(_config(tiny_config_dict(text_corpus, tmp), tmp, "a", tmp / "straight"), 2, tmp / "straight.json")
    assert len(result["losses"]) == 12
    return result


@pytest.mark.timeout(3 * RUN_TIMEOUT + MARGIN)  # the straight run (if this test comes first), then the two halves
def test_stop_and_resume_is_bit_exact_at_the_same_world_size(tiny_raw, tmp_path, straight):
    split_run = tmp_path / "split"
    first = _train(_config(tiny_raw, tmp_path, "b1", split_run, max_steps=6), 2, tmp_path / "b1.json")
    second = _train(_config(tiny_raw, tmp_path, "b2", split_run), 2, tmp_path / "b2.json")
    assert second["first_step"] == 6
    assert first["losses"] + second["losses"] == straight["losses"]
    assert second["digest"] == straight["digest"]


@pytest.mark.timeout(3 * RUN_TIMEOUT + MARGIN)
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_at_another_world_size_continues_the_same_trajectory(tiny_raw, tmp_path, straight, new_world):
    run = tmp_path / "resized"
    first = _train(_config(tiny_raw, tmp_path, "b1", run, max_steps=6), 2, tmp_path / "b1.json")
    second = _train(_config(tiny_raw, tmp_path, "b2", run), new_world, tmp_path / "b2.json")
    assert second["first_step"] == 6
    resumed = first["losses"] + second["losses"]
    # same samples, same global batch: only the float reduction order differs
    assert resumed == pytest.approx(straight["losses"], rel=1e-4)
