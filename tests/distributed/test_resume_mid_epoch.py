"""Resume in the middle of a data epoch through the real trainer: a small domain runs out of windows (a new epoch
starts) inside the resumed half, and the resized run (W=2 -> 3) continues the uninterrupted trajectory."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from elastic.config import config_from_dict, save_config
from elastic.data import Corpus
from support.processes import spawn_ranks

RANK_SCRIPT = Path(__file__).with_name("rank_train.py")
RUN_TIMEOUT = 180
WINDOWS = 20
"""Windows of the small domain: phase 0 alone draws 24 samples from it, so its second epoch starts at global
sample 20, in step 3: the first step of the resumed half (phase 2 starts a third epoch)."""


def _config(raw: dict, tmp_path: Path, name: str, run_dir: Path, **train) -> Path:
    raw = copy.deepcopy(raw)
    raw["train"].update(run_dir=str(run_dir), **train)
    raw["launch"]["nproc_per_node"] = 3
    raw["checkpoint"] = {"interval": 3, "keep_last": 2, "l0_interval": 0}
    path = tmp_path / f"{name}.json"
    save_config(config_from_dict(raw), path)
    return path


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT + 60)
def test_resize_resume_mid_epoch_continues_the_trajectory(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    window = raw["model"]["seq_len"] + 1
    np.save(tmp_path / "small.npy", (np.arange(int(WINDOWS * window / 0.8) + 1) % 251).astype(np.uint16))
    raw["data"]["sources"]["c"] = [str(tmp_path / "small.npy")]
    raw["data"]["phases"][0]["mixture"] = {"c": 1.0}  # 4 steps x 6 samples = 24 > 20 windows
    corpus = Corpus(config_from_dict(raw))  # the resumed half (from step 3) holds the start of c's second epoch
    g = raw["train"]["global_batch"]
    starts = [i for i in range(3 * g, 4 * g) if corpus.sampler.locate(0, i).epoch == 1]
    assert starts and corpus.sampler.locate(0, starts[0]).position == 0
    runs = {}
    for name, world, steps in (("straight", 2, 0), ("first", 2, 3), ("second", 3, 0)):
        run_dir = tmp_path / ("straight" if name == "straight" else "split")
        config = _config(raw, tmp_path, name, run_dir, max_steps=steps)
        spawn_ranks(RANK_SCRIPT, world, ["train", str(config), str(tmp_path / f"{name}.json")], timeout=RUN_TIMEOUT)
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(runs["straight"]["losses"]) == 12 and runs["second"]["first_step"] == 3
    resumed = runs["first"]["losses"] + runs["second"]["losses"]
    assert resumed == pytest.approx(runs["straight"]["losses"], rel=1e-4)  # only the reduction order differs
