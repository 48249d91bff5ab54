"""Import -> train -> export -> import: a Hugging Face model trained by ecpt's real Trainer (one process, W=1) and
exported with `ecpt ckpt export` loads in transformers with the same class, config and tokenizer, gives ecpt's
logits, and imports back into ecpt bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from elastic.bootstrap import join_job
from elastic.config import config_from_dict
from elastic.hf_model import load_hf_model
from elastic.trainer import Trainer
from launch.cli import main as ecpt
from support.hf_models import VOCAB, save_tiny_hf_dir

transformers = pytest.importorskip("transformers")
STEPS = 3


def _train(raw: dict, init_dir, run_dir) -> Trainer:
    raw = copy.deepcopy(raw)
    raw["model"] = {"init": f"hf:{init_dir}", "seq_len": 32}
    raw["train"].update(run_dir=str(run_dir), max_steps=STEPS)
    raw["checkpoint"] = {"interval": STEPS, "l0_interval": 0}
    cfg = config_from_dict(raw)
    ctx = join_job(cfg)
    trainer = Trainer(cfg, ctx.world, ctx.groups, ctx.device, log=ctx.log)
    trainer.run()
    trainer.close()
    return trainer


def _file_keys(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_trained_model_exports_to_transformers_and_back(tiny_raw, tmp_path, family):
    init = save_tiny_hf_dir(family, tmp_path / "init")
    before = {n: p.detach().clone() for n, p in load_hf_model(f"hf:{init}").named_parameters()}
    trainer = _train(tiny_raw, init, tmp_path / "run")
    model = trainer.model.eval()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), "training changed nothing"

    out = tmp_path / "export"
    assert ecpt(["ckpt", "export", str(tmp_path / "run" / "checkpoints"), "--to", str(out)]) == 0
    assert _file_keys(out) == _file_keys(init)  # the input's own keys (GPT-NeoX: embed_out, not lm_head)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    source_config = json.loads((init / "config.json").read_text())
    assert type(theirs).__name__ == source_config["architectures"][0]
    exported_config = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in exported_config.items() if k != "dtype"} == {
        k: v for k, v in source_config.items() if k != "dtype"
    }
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(init).get_vocab()

    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens).logits, model(tokens), rtol=0, atol=1e-5)

    again = dict(load_hf_model(f"hf:{out}").named_parameters())
    trained = dict(model.named_parameters())
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[n], trained[n]) for n in trained), "import -> train -> export -> import drifted"


def test_bf16_export(tiny_raw, tmp_path):
    init = save_tiny_hf_dir("llama-tied", tmp_path / "init")
    trainer = _train(tiny_raw, init, tmp_path / "run")
    out = tmp_path / "bf16"
    assert ecpt(["ckpt", "export", str(tmp_path / "run" / "checkpoints"), "--to", str(out), "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert theirs.dtype == torch.bfloat16 and theirs.lm_head.weight is theirs.model.embed_tokens.weight
    ours = dict(trainer.model.named_parameters())
    for name, p in theirs.named_parameters():
        assert torch.equal(p, ours[name].to(torch.bfloat16)), name


def test_export_without_its_init_directory_names_the_fix(tiny_raw, tmp_path, capsys):
    init = save_tiny_hf_dir("llama", tmp_path / "init")
    _train(tiny_raw, init, tmp_path / "run")
    for f in init.iterdir():
        f.unlink()
    init.rmdir()
    assert ecpt(["ckpt", "export", str(tmp_path / "run" / "checkpoints"), "--to", str(tmp_path / "x")]) == 2
    assert "--tokenizer-from" in capsys.readouterr().err
