"""Corpus tokenization throughput: ecpt's build (JSONL read, worker processes, cache write) against the same
tokenizer's ``encode_batch_fast`` in one process, measured in the same run.

    python benchmarks/tokenize_corpus.py [--mb 20] [--tokenizer DIR] [--workers 1 2]

Without --tokenizer it trains the tests' 512-id BPE (tests/support/hf_tokenizer.py). Prints tokens/s per worker
count and the ratio to the single-process reference, by wall clock and per CPU-second (this process and its
reaped worker processes), which a busy machine disturbs less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from elastic.config import config_from_dict  # noqa: E402
from elastic.corpus_build import CHUNK_BYTES, build_corpus, load_meta  # noqa: E402
from elastic.data_sources import builtin_documents  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the build's tokenizer workers once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_jsonl(path: Path, megabytes: float) -> list[str]:
    docs = [d.text.decode("utf-8", errors="replace") for d in builtin_documents("prose")]
    texts, size = [], 0
    while size < megabytes * 1e6:
        for doc in docs:
            texts.append(doc)
            size += len(doc)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def reference(tokenizer: Path, texts: list[str]) -> tuple[int, float]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    start, tokens, batch, size = time.monotonic(), 0, [], 0
    for text in texts + [None]:  # batches of about CHUNK_BYTES, as the build sends its workers
        if text is not None:
            batch.append(text)
            size += len(text)
        if batch and (text is None or size >= CHUNK_BYTES):
            tokens += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(batch, add_special_tokens=False))
            batch, size = [], 0
    return tokens, time.monotonic() - start


def build(tmp: Path, tokenizer: Path, data: Path, workers: int) -> tuple[int, float]:
    raw = {
        "model": {"vocab_size": 1 << 16, "seq_len": 128},
        "data": {
            "sources": {"web": [str(data)]},
            "tokenizer": f"hf:{tokenizer}",
            "tokenize_workers": workers,
            "cache_dir": str(tmp / f"cache-{workers}"),
            "phases": [{"name": "web", "tokens": 1000, "mixture": {"web": 1.0}}],
        },
        "launch": {"nproc_per_node": 1},
    }
    cfg = config_from_dict(raw)
    start = time.monotonic()
    root = build_corpus(cfg, log=lambda msg: None)
    seconds = time.monotonic() - start
    meta = load_meta(root)["domains"]["web"]
    return meta["train_tokens"] + meta["val_tokens"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="JSONL text size in MB (builtin prose, repeated)")
    parser.add_argument("--tokenizer", type=Path, help="a save_pretrained directory (default: train a 512-id BPE)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = args.tokenizer
        if tokenizer is None:
            from support.hf_tokenizer import save_bpe_tokenizer

            tokenizer = save_bpe_tokenizer(tmp / "bpe")
        texts = write_jsonl(tmp / "web.jsonl", args.mb)
        cpu = cpu_seconds()
        ref_tokens, ref_seconds = reference(tokenizer, texts)
        ref_cpu = cpu_seconds() - cpu
        ref_rate = ref_tokens / ref_seconds
        print(f"{args.mb:.0f} MB of JSONL, {len(texts):,} documents, {os.cpu_count()} cores")
        print(
            f"reference encode_batch_fast, 1 process: {ref_tokens:,} tokens in {ref_seconds:.2f} s, {ref_rate:,.0f}/s, "
            f"{ref_tokens / ref_cpu:,.0f} per CPU-second"
        )
        for workers in args.workers:
            cpu = cpu_seconds()
            tokens, seconds = build(tmp, tokenizer, tmp / "web.jsonl", workers)
            per_cpu = tokens / (cpu_seconds() - cpu)
            assert tokens == ref_tokens, f"the build wrote {tokens} tokens, the reference {ref_tokens}"
            rate = tokens / seconds
            print(
                f"ecpt build, {workers} workers: {seconds:.2f} s, {rate:,.0f} tokens/s ({rate / ref_rate:.2f}x "
                f"reference), {per_cpu:,.0f} per CPU-second ({per_cpu * ref_cpu / ref_tokens:.2f}x reference)"
            )


if __name__ == "__main__":
    main()
