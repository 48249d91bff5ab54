"""`ecpt train --init-from DIR` end to end (real torchrun agent, 2 gloo workers) on JSONL data tokenized by the
model directory's own tokenizer (data.tokenizer = "auto"), and `ecpt ckpt export` back to a directory transformers
loads."""

from __future__ import annotations

import copy
import glob
import json
from pathlib import Path

import pytest
import torch

from elastic.metrics import read_jsonl
from support.configs import write_toml
from support.hf_models import save_tiny_hf_dir
from support.processes import TRAIN_TIMEOUT, check_ok, ecpt_train, run_ecpt

pytestmark = pytest.mark.slow


@pytest.mark.timeout(2 * TRAIN_TIMEOUT)
def test_train_from_a_hugging_face_dir_and_export_it(tiny_raw, tmp_path):
    transformers = pytest.importorskip("transformers")
    init = save_tiny_hf_dir("llama", tmp_path / "llama")
    raw = copy.deepcopy(tiny_raw)
    raw["model"] = {"seq_len": 32}  # sizes come from the init directory's config.json
    for domain, sources in raw["data"]["sources"].items():  # the same text, as JSONL: one paragraph per line
        paragraphs = [p for path in sorted(glob.glob(sources[0])) for p in Path(path).read_text().split("\n\n")]
        jsonl = tmp_path / f"{domain}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs if p.strip()))
        raw["data"]["sources"][domain] = [str(jsonl)]
    raw["checkpoint"] = {"interval": 4, "l0_interval": 0}
    cfg = write_toml(raw, tmp_path / "hf.toml")
    run = tmp_path / "run"
    check_ok(ecpt_train(cfg, run, "--init-from", str(init)))

    steps = read_jsonl(run / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == list(range(1, 13)) and {r["world_size"] for r in steps} == {2}
    losses = [r["loss"] for r in steps]  # BPE tokens of a 300-id vocabulary: slower to learn than bytes
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    resolved = json.loads((run / "config.json").read_text())["model"]
    assert resolved["init"] == f"hf:{init.resolve()}" and resolved["vocab_size"] == 300
    corpus = json.loads(next((tmp_path / "cache").glob("corpus-*/corpus.json")).read_text())
    assert corpus["tokenizer"] == f"hf:{init.resolve()}"  # "auto" resolved to the model directory
    assert corpus["domains"]["prose"]["dtype"] == "uint16" and corpus["eos_id"] is not None

    out = tmp_path / "export"
    check_ok(run_ecpt(["ckpt", "export", str(run / "checkpoints"), "--to", str(out)]))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<eos>"
