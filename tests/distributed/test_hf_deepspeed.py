"""An imported Hugging Face model (Qwen2: GQA, q/k/v bias, untied head) under DeepSpeed ZeRO-3 with real gloo ranks:
trained at W=2, checkpointed, resized to W=1 (ZeRO-3 partitions resharded online), resumed on the uninterrupted
run's trajectory. The first step's loss is the imported weights' loss, so the weights were the starting point, and
the resumed segment (which does not read the Hugging Face weights at all) continues from ecpt's checkpoint. DDP at
W=2 with an imported model: tests/integration/test_cli_hf.py."""

import copy
import json
from pathlib import Path

import pytest
import torch

from elastic.bootstrap import join_job
from elastic.config import config_from_dict, config_from_json, save_config
from elastic.data import Corpus
from elastic.hf_model import load_hf_model
from elastic.metrics import read_jsonl
from elastic.trainer import Trainer
from support.hf_models import save_tiny_hf_dir
from support.processes import spawn_ranks

RANK_SCRIPT = Path(__file__).with_name("rank_deepspeed.py")
pytestmark = pytest.mark.slow
RUN_TIMEOUT = 180
MARGIN = 60
GLOBAL_BATCH = 5  # 3 + 2 over two ranks: ZeRO-3 pads the smaller share
SEGMENT = 2


def _config(raw: dict, init: Path, path: Path, run_dir: Path, engine: str, stage: int, max_steps: int) -> Path:
    raw = copy.deepcopy(raw)
    raw["model"] = {"init": f"hf:{init}", "seq_len": 32}
    raw["train"].update(run_dir=str(run_dir), engine=engine, global_batch=GLOBAL_BATCH, max_steps=max_steps)
    raw["deepspeed"] = {"zero_stage": stage}
    raw["checkpoint"] = {"interval": SEGMENT, "keep_last": 2, "l0_interval": 0}
    save_config(config_from_dict(raw), path)
    return path


def _run(cfg: Path, world: int, out: Path) -> dict:
    spawn_ranks(RANK_SCRIPT, world, ["train", str(cfg), str(out)], timeout=RUN_TIMEOUT)
    return json.loads(out.read_text())


def _uninterrupted_losses(config_json: Path) -> list[float]:
    """The reference trajectory: the same config run straight through, in this process at W=1 (plain torch)."""
    cfg = config_from_json(config_json)
    ctx = join_job(cfg)
    trainer = Trainer(cfg, ctx.world, ctx.groups, ctx.device, log=ctx.log)
    trainer.run()
    trainer.close()
    return [r["loss"] for r in read_jsonl(Path(cfg.train.run_dir) / "metrics.jsonl", "step")]


@pytest.mark.timeout(2 * RUN_TIMEOUT + MARGIN)
def test_imported_model_zero3_w2_to_w1_resumes_on_the_trajectory(tiny_raw, tmp_path):
    init = save_tiny_hf_dir("qwen2", tmp_path / "qwen2")
    straight_cfg = _config(tiny_raw, init, tmp_path / "s.json", tmp_path / "s", "ddp", 0, 2 * SEGMENT)
    straight = _uninterrupted_losses(straight_cfg)
    assert len(straight) == 2 * SEGMENT

    cfg = config_from_json(straight_cfg)
    first_batch = torch.from_numpy(Corpus(cfg).batch(0, GLOBAL_BATCH)[0])
    with torch.no_grad():
        imported_loss = float(load_hf_model(cfg.model.init).sequence_losses(first_batch).mean())
    assert straight[0] == pytest.approx(imported_loss, rel=1e-5)  # step 0 trained the imported weights

    run = tmp_path / "zero3"
    seg0 = _run(_config(tiny_raw, init, tmp_path / "z0.json", run, "deepspeed", 3, SEGMENT), 2, tmp_path / "z0.out")
    seg1 = _run(_config(tiny_raw, init, tmp_path / "z1.json", run, "deepspeed", 3, 2 * SEGMENT), 1, tmp_path / "z1.out")
    assert seg0["restored_step"] is None and seg0["first_step"] == 0
    assert (seg1["restored_step"], seg1["saved_world_size"], seg1["first_step"]) == (SEGMENT, 2, SEGMENT)
    assert seg0["losses"] + seg1["losses"] == pytest.approx(straight, rel=1e-4)
