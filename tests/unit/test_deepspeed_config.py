"""The [deepspeed] section: validation, contradictions with a user DeepSpeed JSON, and the generated DeepSpeed config
for even and uneven global-batch splits."""

import copy
import json

import pytest

from elastic.config import ConfigError, config_from_dict
from elastic.engines.deepspeed_engine import deepspeed_config, micro_steps


def _cfg(raw: dict, tmp_path, user: dict | None = None, **ds):
    raw = copy.deepcopy(raw)
    raw["train"]["engine"] = "deepspeed"
    raw["deepspeed"] = dict(ds)
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        raw["deepspeed"]["config_json"] = str(path)
    return config_from_dict(raw)


def test_engine_and_stage_are_validated(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    raw["train"]["engine"] = "horovod"
    with pytest.raises(ConfigError, match=r"train\.engine must be one of \('ddp', 'deepspeed'\)"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="deepspeed.zero_stage must be 0, 1, 2 or 3, got 4"):
        _cfg(tiny_raw, tmp_path, zero_stage=4)
    with pytest.raises(ConfigError, match="deepspeed.bf16 needs deepspeed.zero_stage >= 1"):
        _cfg(tiny_raw, tmp_path, zero_stage=0, bf16=True)


@pytest.mark.parametrize(
    "user,fields",
    [
        ({"train_batch_size": 64}, ("train_batch_size", "train.global_batch")),
        ({"train_micro_batch_size_per_gpu": 4}, ("train_micro_batch_size_per_gpu", "train.micro_batch")),
        ({"gradient_accumulation_steps": 2}, ("gradient_accumulation_steps", "train.micro_batch")),
        ({"gradient_clipping": 0.5}, ("gradient_clipping", "optim.grad_clip")),
        (
            {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}},
            ("optimizer.params.betas", "optim.beta1, optim.beta2"),
        ),
        ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}, ("optimizer.params.eps", "optim.eps")),
        (
            {"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.0}}},
            ("optimizer.params.weight_decay", "optim.weight_decay"),
        ),
        ({"optimizer": {"type": "AdamW"}}, ("optimizer section", "optim.beta1")),
        ({"scheduler": {"type": "WarmupLR"}}, ("scheduler section", "[schedule]")),
        ({"zero_optimization": {"stage": 3}}, ("zero_optimization.stage", "deepspeed.zero_stage")),
        ({"bf16": {"enabled": True}}, ("bf16.enabled", "deepspeed.bf16")),
        ({"fp16": {"enabled": True}}, ("fp16", "deepspeed.bf16")),
    ],
)
def test_contradictions_with_the_user_json_name_both_fields(tiny_raw, tmp_path, user, fields):
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_raw, tmp_path, user, zero_stage=2)
    for field in fields:
        assert field in str(err.value)
    assert "deepspeed.config_json" in str(err.value)


def test_agreeing_user_json_is_merged_into_the_generated_config(tiny_raw, tmp_path):
    user = {
        "train_batch_size": 6,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
    }
    cfg = _cfg(tiny_raw, tmp_path, user, zero_stage=3)
    ds = deepspeed_config(cfg, world_size=2, parameters=10_000)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # the user's key
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1 << 20  # generated, capped for a tiny model
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["gradient_clipping"] == 1.0


def test_missing_user_json_is_a_clear_error(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    raw["deepspeed"] = {"config_json": str(tmp_path / "nope.json")}
    with pytest.raises(ConfigError, match="deepspeed.config_json: .*nope.json does not exist"):
        config_from_dict(raw)


@pytest.mark.parametrize(
    "global_batch,world,gas",
    [
        (6, 2, 2),  # 3 + 3, micro 2 -> micro-batches 2 + 1: 6 is not 2 ranks x 2 x an integer -> nominal triple
        (8, 2, 2),  # 4 + 4 -> 2 micro-batches of 2: DeepSpeed's triple is exact
        (7, 3, 2),  # 3 + 2 + 2 -> 2, 1, 1 micro-batches: every rank runs 2 backwards (padding), nominal triple
    ],
)
def test_generated_batch_fields_follow_the_global_batch_split(tiny_raw, tmp_path, global_batch, world, gas):
    raw = copy.deepcopy(tiny_raw)
    raw["train"]["global_batch"] = global_batch
    cfg = _cfg(raw, tmp_path, zero_stage=2)
    ds = deepspeed_config(cfg, world)
    assert micro_steps(cfg, world) == gas == ds["gradient_accumulation_steps"]
    if global_batch % (world * gas) == 0:
        assert ds["train_batch_size"] == global_batch
        assert ds["train_micro_batch_size_per_gpu"] * gas * world == global_batch
    else:
        assert "train_batch_size" not in ds  # DeepSpeed derives its nominal product; ecpt's loss scaling is exact
        assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch
