"""Import of a Hugging Face checkpoint: ecpt's loader (elastic/hf_model.py) vs transformers' from_pretrained.

Writes one random Llama checkpoint with save_pretrained (fp32 safetensors, ~0.86 GB by default) into a temporary
directory, then loads it into fp32 once with each loader, each in its own fresh process, alternating, and reports
wall time of the load (the model classes imported beforehand in both) and peak resident memory above the process' baseline after imports (ru_maxrss minus VmRSS before the load;
file pages of a memory map that the process touched count as resident). Target: ecpt holds at most one copy of the
weights (peak above baseline <= 1.25 x the checkpoint's bytes) and is no slower than from_pretrained (ratio <= 1.1).
Timings on this shared 2-core machine are noisy: compare the two within one run.

    .venv/bin/python -m benchmarks.hf_import [--hidden 1024 --layers 12 --vocab 32000 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _vm_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(loader: str, directory: str) -> None:
    """One load in this process, then one in-place write of every parameter (from_pretrained may hand out tensors
    backed by the file's memory map, whose pages are read only when first used: "ready" counts that too); prints
    {"seconds", "ready", "peak_mb", "parameters"} as JSON."""
    import torch
    import transformers

    from elastic.hf_model import load_hf_model

    torch.set_num_threads(1)
    # transformers imports a model's module on first use (seconds on a loaded machine); both loaders need the same
    # modules, so import them before the clock starts: what is timed is the load itself.
    _ = transformers.LlamaForCausalLM, transformers.AutoConfig, transformers.AutoModelForCausalLM
    baseline = _vm_rss_kb()
    start = time.perf_counter()
    if loader == "ecpt":
        model = load_hf_model(f"hf:{directory}")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    seconds = time.perf_counter() - start
    with torch.no_grad():  # what the first optimizer step does to every parameter: write it
        for p in model.parameters():
            p.mul_(1.0)
    ready = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    parameters = sum(p.numel() for p in model.parameters())
    print(
        json.dumps({"seconds": seconds, "ready": ready, "peak_mb": (peak - baseline) / 1024, "parameters": parameters})
    )


def write_checkpoint(directory: Path, hidden: int, layers: int, vocab: int) -> int:
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        intermediate_size=64 * -(-(8 * hidden // 3) // 64),
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    with no_init_weights():
        model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=generator)
    model.save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def run_child(loader: str, directory: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.hf_import", "--child", loader, str(directory)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="ecpt-hf-import-") as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        nbytes = write_checkpoint(directory, args.hidden, args.layers, args.vocab)
        print(f"checkpoint: {nbytes / 1e9:.2f} GB fp32 safetensors written in {time.perf_counter() - start:.1f} s")
        results: dict[str, list[dict]] = {"ecpt": [], "from_pretrained": []}
        for _ in range(args.repeats):
            for loader in results:
                results[loader].append(run_child(loader, directory))
    weights_mb = nbytes / 2**20
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "ready", "peak_mb")} for k, v in results.items()
    }
    for loader, m in med.items():
        print(
            f"{loader:<16} import {m['seconds']:6.2f} s, ready (every parameter written once) {m['ready']:6.2f} s   "
            f"peak RSS above baseline {m['peak_mb']:7.0f} MB "
            f"({m['peak_mb'] / weights_mb:.2f} x the weights)   median of {args.repeats}"
        )
    print(f"ecpt / from_pretrained: import time {med['ecpt']['seconds'] / med['from_pretrained']['seconds']:.2f}")
    time_ratio = med["ecpt"]["ready"] / med["from_pretrained"]["ready"]
    rss_ratio = med["ecpt"]["peak_mb"] / med["from_pretrained"]["peak_mb"]
    copies = med["ecpt"]["peak_mb"] / weights_mb
    print(f"ecpt / from_pretrained: time to ready {time_ratio:.2f}{'  MISS (> 1.1)' if time_ratio > 1.1 else ''}")
    print(f"ecpt / from_pretrained: peak RSS {rss_ratio:.2f}")
    print(f"ecpt peak RSS / weights: {copies:.2f}{'  MISS (> 1.25: more than one copy)' if copies > 1.25 else ''}")


if __name__ == "__main__":
    main()
