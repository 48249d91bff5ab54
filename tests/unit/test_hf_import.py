"""Starting from a Hugging Face checkpoint: each supported family loads into ecpt's training model with the same loss
as transformers' own model, sharded checkpoints load, and every unusable directory is refused at config validation
with the field, the reason and the fix."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from elastic.config import ConfigError, ModelConfig
from elastic.hf_model import load_hf_model
from support.hf_models import FAMILIES, VOCAB, save_tiny_model

transformers = pytest.importorskip("transformers")


def transformers_losses(directory, batch: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token loss of transformers' own from_pretrained model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(len(batch), -1).mean(1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_on_a_fixed_batch_equals_transformers(tmp_path, family):
    directory = save_tiny_model(family, tmp_path / family)
    batch = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    model = load_hf_model(f"hf:{directory}")
    model.eval()
    with torch.no_grad():
        ours = model.sequence_losses(batch)
    theirs = transformers_losses(directory, batch)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    tied = json.loads((directory / "config.json").read_text()).get("tie_word_embeddings", False)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    single = save_tiny_model("llama", tmp_path / "single")
    sharded = save_tiny_model("llama", tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    a = dict(load_hf_model(f"hf:{single}").named_parameters())
    b = dict(load_hf_model(f"hf:{sharded}").named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_init_takes_the_architecture_from_config_json(tmp_path):
    directory = save_tiny_model("llama", tmp_path / "m")
    cfg = ModelConfig(init=f"hf:{directory}", dim=999, seq_len=64)
    cfg.validate()
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (32, 2, 4, 2, 64, VOCAB)
    assert cfg.seq_len == 64 and cfg.tie_embeddings is False


def _refused(init: str) -> str:
    with pytest.raises(ConfigError) as err:
        ModelConfig(init=init).validate()
    return str(err.value)


def test_hub_id_is_refused_with_how_to_download():
    message = _refused("hf:meta-llama/Llama-3.2-1B")
    assert "model.init" in message and "hub id" in message and "download" in message


def test_missing_directory_is_refused(tmp_path):
    message = _refused(f"hf:{tmp_path / 'nowhere'}")
    assert "model.init" in message and "is not a directory" in message and "download" in message


def test_value_without_the_hf_prefix_is_refused(tmp_path):
    assert 'must be "hf:/path/to/dir"' in _refused(str(tmp_path))


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    directory = save_tiny_model("llama", tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    message = _refused(f"hf:{directory}")
    assert "FalconForCausalLM" in message and "LlamaForCausalLM" in message and "GPTNeoXForCausalLM" in message


def test_custom_code_is_refused(tmp_path):
    directory = save_tiny_model("llama", tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "modeling_evil.py").write_text("raise SystemExit('this must never run')\n")
    message = _refused(f"hf:{directory}")
    assert "auto_map" in message and "trust_remote_code" in message


def test_pickled_weights_only_are_refused_with_how_to_convert(tmp_path):
    directory = save_tiny_model("llama", tmp_path / "m")
    weights = load_hf_model(f"hf:{directory}").state_dict()
    (directory / "model.safetensors").unlink()
    torch.save(weights, directory / "pytorch_model.bin")
    message = _refused(f"hf:{directory}")
    assert "pytorch_model.bin" in message and "pickle" in message and "save_pretrained" in message


def test_seq_len_beyond_the_models_positions_is_refused(tmp_path):
    directory = save_tiny_model("gpt_neox", tmp_path / "m")  # max_position_embeddings 128
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        ModelConfig(init=f"hf:{directory}", seq_len=256).validate()


def test_bf16_checkpoint_loads_as_exact_fp32_masters(tmp_path):
    directory = save_tiny_model("qwen2", tmp_path / "fp32")
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    model = load_hf_model(f"hf:{tmp_path / 'bf16'}")
    theirs = dict(bf16.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, theirs[name].float()), name


def test_a_tensor_missing_from_the_file_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = save_tiny_model("llama", tmp_path / "m")
    weights = load_file(directory / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf_model(f"hf:{directory}")


def test_init_from_flag_becomes_an_absolute_model_init(tmp_path, monkeypatch):
    from launch.cli import build_parser
    from launch.args import train_overrides
    from elastic.config import apply_overrides

    directory = save_tiny_model("gpt_neox", tmp_path / "pythia")
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "--init-from", "pythia"])
    raw = apply_overrides({}, train_overrides(args))
    assert raw["model"]["init"] == f"hf:{directory.resolve()}"
    cfg = ModelConfig(**raw["model"])
    cfg.validate()
    assert cfg.vocab_size == VOCAB and cfg.tie_embeddings is False
