"""The tokenized-corpus cache: a second run re-uses it, a changed tokenizer or source rebuilds it, and a build killed
in the middle of tokenizing leaves nothing that looks complete (the next build cleans up and publishes)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from elastic.config import config_from_dict, save_config
from elastic.corpus_build import build_corpus, corpus_dir
from elastic.data import Corpus
from support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


def test_second_build_reuses_the_cache(tiny_raw, text_corpus, hf_tokenizer_dir, tmp_path):
    cfg = config_from_dict(tiny_raw)
    first_log: list[str] = []
    root = build_corpus(cfg, log=first_log.append)
    assert any(line.startswith("corpus: prose:") for line in first_log)
    stamp = (root / "corpus.json").stat().st_mtime_ns
    second_log: list[str] = []
    assert build_corpus(config_from_dict(tiny_raw), log=second_log.append) == root
    assert second_log == [] and (root / "corpus.json").stat().st_mtime_ns == stamp
    assert not list(root.parent.glob("*.tmp-*"))

    hf = copy.deepcopy(tiny_raw)
    hf["data"]["tokenizer"] = f"hf:{hf_tokenizer_dir}"
    hf["model"]["vocab_size"] = 512
    assert corpus_dir(config_from_dict(hf)) != root  # the key holds the tokenizer's content hash

    moved = tmp_path / "c-copy"
    moved.mkdir()
    for doc in sorted(text_corpus["c"].glob("*.txt")):
        (moved / doc.name).write_bytes(doc.read_bytes())
    changed = copy.deepcopy(tiny_raw)
    changed["data"]["sources"]["c"] = [str(moved / "*.txt")]
    before = corpus_dir(config_from_dict(changed))
    assert before != root  # other paths
    os.utime(moved / "doc0.txt", ns=(1, 1))
    assert corpus_dir(config_from_dict(changed)) != before  # same paths and sizes, another modification time


def test_interrupted_build_leaves_no_complete_cache(tiny_raw, hf_tokenizer_dir, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    raw["data"]["tokenizer"] = f"hf:{hf_tokenizer_dir}"
    raw["data"]["tokenize_workers"] = 1
    raw["model"]["vocab_size"] = 512
    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": " ".join(f"word{i} (x + {i}) * y;" for i in range(200))}) + "\n"
    big.write_text(line * 1500)  # ~3 MB: seconds of tokenizing in one worker
    raw["data"]["sources"]["prose"] = [str(big)]
    cfg = config_from_dict(raw)
    save_config(cfg, tmp_path / "cfg.json")
    out = corpus_dir(cfg)
    partial = out.parent / f"{out.name}.tmp-*" / "prose.train.bin"
    script = "import sys; from elastic.config import config_from_json; from elastic.corpus_build import build_corpus; "
    script += "build_corpus(config_from_json(sys.argv[1]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "cfg.json")],
        cwd=REPO,
        start_new_session=True,  # its tokenizer worker dies with it
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: any(p.stat().st_size > 0 for p in out.parent.glob(str(partial.relative_to(out.parent)))),
            60,
            "the build to write its first tokens",
            proc,
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists(), "a killed build published its corpus"
    assert list(out.parent.glob(f"{out.name}.tmp-*")), "the partial build should be where the next build finds it"

    cfg.data.tokenize_workers = 2  # not part of the key: only how fast the rebuild goes
    log: list[str] = []
    assert build_corpus(cfg, log=log.append) == out  # the same key: rebuilt, leftovers removed
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))
    corpus = Corpus(cfg, root=out)
    meta = json.loads((out / "corpus.json").read_text())["domains"]["prose"]
    assert meta["documents"] == 1500 and len(corpus.train["prose"]) + len(corpus.val["prose"]) > 1500 * 200
    assert np.array_equal(corpus.batch(0, 4)[0], Corpus(cfg).batch(0, 4)[0])
