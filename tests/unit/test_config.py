import copy
from pathlib import Path

import pytest

from elastic.config import (
    ConfigError,
    apply_overrides,
    bundled_config_names,
    config_from_dict,
    load_config,
    parse_override,
)
from support.configs import write_toml


def test_default_config_loads_and_describes_three_phases():
    cfg = load_config()
    assert [p.name for p in cfg.data.phases] == ["prose", "python", "c"]
    assert cfg.launch.nproc_per_node == 2
    # replay: later phases keep a small weight on earlier domains
    assert cfg.data.phases[2].mixture["prose"] > 0


def test_set_override_parses_toml_values():
    assert parse_override("train.max_steps=5") == (["train", "max_steps"], 5)
    assert parse_override('schedule.kind="wsd"') == (["schedule", "kind"], "wsd")
    assert parse_override("schedule.kind=wsd") == (["schedule", "kind"], "wsd")  # bare strings are accepted
    cfg = load_config(None, ["train.max_steps=7", "schedule.lr_max=0.01"])
    assert cfg.train.max_steps == 7 and cfg.schedule.lr_max == 0.01


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda r: r["train"].update(bogus=1), "train.bogus"),
        (lambda r: r.update(trian={}), "trian"),
        (lambda r: r["train"].update(global_batch="16"), "train.global_batch"),
        (lambda r: r["train"].update(global_batch=1), "train.global_batch"),
        (lambda r: r["model"].update(n_heads=3), "model.n_heads"),
        (lambda r: r["schedule"].update(kind="linear"), "schedule.kind"),
        (lambda r: r["data"]["phases"][0].update(mixture={"klingon": 1.0}), "data.phases[0].mixture"),
        (lambda r: r["data"]["phases"][1].update(tokens=0), "data.phases[1].tokens"),
        (lambda r: r["checkpoint"].update(keep_last=0), "checkpoint.keep_last"),
        (lambda r: r["checkpoint"].update(direct_io="yes"), "checkpoint.direct_io"),
        (lambda r: r["launch"].update(nnodes="3:1"), "launch.nnodes"),
    ],
)
def test_bad_values_name_the_field(tiny_raw, mutate, field):
    raw = copy.deepcopy(tiny_raw)
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert field in str(err.value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("l2_dir", "gs://ckpt/run"),
        ("l2_dir", "file:///mnt/ckpt"),
        ("dir", "s3://bucket/ckpt"),
        ("dir", "gs://bucket/ckpt"),
        ("l0_dir", "s3://bucket/ckpt"),
        ("l0_dir", "file:///dev/shm/ecpt"),
    ],
)
def test_a_url_as_checkpoint_level_is_a_config_error_not_a_local_directory(
    tiny_raw, tmp_path, monkeypatch, field, value
):
    """s3://ckpt/run as L1 or L0, or any other scheme, used to be accepted and silently became a local directory
    named 's3:'; only l2_dir takes s3:// (below)."""
    monkeypatch.chdir(tmp_path)
    raw = copy.deepcopy(tiny_raw)
    raw["checkpoint"].update({field: value, "l2_interval": 5 if field == "l2_dir" else 0})
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert f"checkpoint.{field}" in str(err.value) and value.split("://")[0] + "://" in str(err.value)
    assert not any(tmp_path.iterdir()), "validation must not create anything"


def test_l2_dir_takes_an_s3_url_and_builds_an_object_level_under_it(tiny_raw, tmp_path, monkeypatch):
    from elastic.checkpoints import checkpoint_levels

    monkeypatch.chdir(tmp_path)
    raw = copy.deepcopy(tiny_raw)
    raw["checkpoint"].update(l2_dir="s3://ckpt/team/run", l2_interval=5, s3_endpoint="http://127.0.0.1:9000")
    cfg = config_from_dict(raw)
    l2 = checkpoint_levels(cfg)[-1]
    # the run's name, not a hash of its absolute path: another machine with another run directory finds it
    assert l2.name == "L2" and l2.root == f"s3://ckpt/team/run/{Path(cfg.train.run_dir).name}"
    assert l2.is_object and l2.endpoint == "http://127.0.0.1:9000"
    assert not any(tmp_path.iterdir()), "an object level creates no local directory"


@pytest.mark.parametrize(
    "update,message",
    [
        ({"l2_dir": "s3:///run"}, "names no bucket"),
        ({"l2_dir": "s3://ckpt/run", "s3_endpoint": "127.0.0.1:9000"}, "checkpoint.s3_endpoint"),
    ],
)
def test_a_bad_s3_address_is_a_config_error(tiny_raw, update, message):
    raw = copy.deepcopy(tiny_raw)
    raw["checkpoint"].update(update, l2_interval=5)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_global_batch_must_cover_the_largest_world(tiny_raw):
    raw = copy.deepcopy(tiny_raw)
    raw["launch"].update(nnodes="1:4", nproc_per_node=2)  # up to 8 ranks, global batch 6
    with pytest.raises(ConfigError, match="train.global_batch .*8 ranks"):
        config_from_dict(raw)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_override_into_non_table_is_rejected():
    with pytest.raises(ConfigError, match="not a table"):
        apply_overrides({"train": 3}, ["train.max_steps=1"])


def test_a_resolved_config_json_loads_as_a_config(tmp_path):
    from elastic.config import save_config

    cfg = load_config(None, ["train.max_steps=3"])
    save_config(cfg, tmp_path / "config.json")
    again = load_config(tmp_path / "config.json", ["train.seed=5"])
    assert again.train.max_steps == 3 and again.train.seed == 5
    assert again.data.phases == cfg.data.phases


def test_bundled_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert {"tiny-cpu", "tiny-cpu-zero2", "cpt-mini", "cpt-experiment"} <= set(bundled_config_names())
    default = load_config(None)
    for name in ("tiny-cpu", "tiny-cpu.toml", "configs/tiny-cpu.toml"):
        assert load_config(name) == default, name
    assert load_config("tiny-cpu-zero2").deepspeed.zero_stage == 2


def test_an_existing_file_wins_over_a_bundled_name(tiny_raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_toml(tiny_raw, tmp_path / "tiny-cpu.toml")
    assert load_config("tiny-cpu.toml").data.sources == load_config(tmp_path / "tiny-cpu.toml").data.sources
    assert load_config("tiny-cpu.toml").data.sources != load_config("tiny-cpu").data.sources


def test_an_unknown_config_name_lists_the_bundled_ones():
    with pytest.raises(ConfigError, match="does not exist .* one of: .*tiny-cpu") as err:
        load_config("tiny-gpu")
    assert all(name in str(err.value) for name in bundled_config_names())


def test_l2_run_name_names_the_run_under_l2_dir_the_same_on_every_machine(tiny_raw, tmp_path):
    from elastic.checkpoints import checkpoint_levels

    roots = []
    for run_dir in (tmp_path / "cluster-a" / "job", tmp_path / "cluster-b" / "elsewhere"):
        raw = copy.deepcopy(tiny_raw)
        raw["train"]["run_dir"] = str(run_dir)
        raw["checkpoint"].update(l2_dir="s3://ckpt/team", l2_interval=5, l2_run_name="cpt-llama")
        roots.append(checkpoint_levels(config_from_dict(raw))[-1].root)
    assert roots == ["s3://ckpt/team/cpt-llama"] * 2
    raw = copy.deepcopy(tiny_raw)
    raw["checkpoint"].update(l2_dir=str(tmp_path / "l2"), l2_interval=5, l2_run_name="a/b")
    with pytest.raises(ConfigError, match="checkpoint.l2_run_name"):
        config_from_dict(raw)


@pytest.mark.parametrize("setting, expected", [("auto", None), ("on", True), ("off", False)])
def test_direct_io_reaches_the_disk_levels(tiny_raw, tmp_path, setting, expected):
    from elastic.checkpoints import checkpoint_levels

    raw = copy.deepcopy(tiny_raw)
    raw["checkpoint"].update(interval=5, l0_interval=1, l2_dir=str(tmp_path / "l2"), l2_interval=10, direct_io=setting)
    levels = {lv.name: lv.direct_io for lv in checkpoint_levels(config_from_dict(raw))}
    assert levels == {"L0": None, "L1": expected, "L2": expected}  # L0 is memory: never written with O_DIRECT
