"""DeepSpeed's own save_checkpoint/load_checkpoint through EcptCheckpointEngine, with real gloo ranks: every fp32
master and AdamW moment comes back exactly, training repeats the same loss, and DeepSpeed's files are small JSON
stubs (the tensors live in the zarr checkpoint)."""

import copy
import json
from pathlib import Path

import pytest

from checkpointing import list_checkpoints
from elastic.config import config_from_dict, save_config
from support.processes import spawn_ranks

RANK_SCRIPT = Path(__file__).with_name("rank_deepspeed.py")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [2, 3])
def test_save_and_load_checkpoint_round_trip(tiny_raw, tmp_path, stage):
    raw = copy.deepcopy(tiny_raw)
    raw["train"].update(engine="deepspeed", global_batch=7)
    raw["deepspeed"] = {"zero_stage": stage}
    cfg = tmp_path / "cfg.json"
    save_config(config_from_dict(raw), cfg)
    out = tmp_path / "out.json"
    spawn_ranks(RANK_SCRIPT, 2, ["dsckpt", str(cfg), str(out)], timeout=180)
    r = json.loads(out.read_text())
    assert r["moved"] > 0  # the two extra steps changed the state ...
    assert r["mismatched"] == 0  # ... and load_checkpoint brought every master and moment back bit for bit
    assert r["loss_after_load"] == r["losses"][2]  # step 2 again, from the restored state
    assert any("optim_states" in f for f in r["files"])
    assert r["largest_file_bytes"] < 64 << 10  # stubs: skeletons only, the tensors are in zarr
    assert [c.step for c in list_checkpoints(tmp_path / "ecpt")] == [2]  # committed ecpt checkpoint, tag step 2
