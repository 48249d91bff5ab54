"""A checkpoint's model weights export to Hugging Face-style safetensors that load back into the same model."""

import json

import torch
from safetensors.torch import load_file

from checkpointing import CheckpointManager, LevelSpec, export_safetensors
from elastic.config import ModelConfig
from elastic.model import LlamaLM, hf_config


def test_exported_weights_reproduce_the_model(tmp_path):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, seq_len=16)
    torch.manual_seed(0)
    model = LlamaLM(cfg)
    mgr = CheckpointManager([LevelSpec("L1", str(tmp_path / "ckpt"), interval=1, keep_last=1, node_local=False)])
    tensors = {f"model/{n}": p.data for n, p in model.named_parameters()}
    mgr.save(7, tensors, {"hf_config": hf_config(cfg)})
    mgr.wait_durable()
    mgr.close()
    out = export_safetensors(mgr.latest().path, tmp_path / "hf")
    weights = load_file(str(out))
    assert "model.layers.1.self_attn.o_proj.weight" in weights and "lm_head.weight" not in weights  # tied
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True

    fresh = LlamaLM(cfg)
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # the tied head shares embed_tokens
    tokens = torch.randint(0, 256, (2, 16))
    assert torch.equal(fresh(tokens), model(tokens))
