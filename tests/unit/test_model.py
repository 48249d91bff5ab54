import torch

from elastic.config import ModelConfig
from elastic.model import LlamaLM, count_parameters, hf_config


def test_shapes_and_hf_parameter_names():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=16)
    model = LlamaLM(cfg)
    tokens = torch.randint(0, 256, (3, 17))
    assert model(tokens[:, :-1]).shape == (3, 16, 256)
    assert model.sequence_losses(tokens).shape == (3,)
    names = set(model.state_dict())
    for expected in (
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert expected in names
    assert model.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads x 16
    assert hf_config(cfg)["num_key_value_heads"] == 2


def test_tied_embeddings_share_storage_and_default_size_is_in_range():
    model = LlamaLM(ModelConfig(dim=320, n_layers=4, n_heads=5))  # the tiny-cpu default
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 5e6 < count_parameters(model) < 20e6


def test_causal_attention_ignores_future_tokens():
    torch.manual_seed(0)
    model = LlamaLM(ModelConfig(dim=32, n_layers=1, n_heads=2, seq_len=8))
    x = torch.randint(0, 256, (1, 8))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 256
    assert torch.allclose(model(x)[0, :-1], model(y)[0, :-1])
