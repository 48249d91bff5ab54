"""Evidence for training Hugging Face models as the transformers class itself rather than as ecpt's own modules.

On the one family both can express (Llama, GQA, untied head), with the same weights: (1) logits of ecpt's
``LlamaLM`` loaded from the Hugging Face state dict vs transformers' own model; (2) CPU forward+backward time per
step of ``LlamaLM`` vs the transformers class with ecpt's loss contract, same batch, alternated, median of N.
ZeRO-3 partitioning and resharding are covered by tests (tests/distributed/test_hf_deepspeed.py): both models
have the same parameter names, so the checkpoint path is the same code.

    .venv/bin/python -m benchmarks.hf_model_choice [--dim 256 --layers 4 --seq 128 --batch 8 --repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from elastic.config import ModelConfig
    from elastic.hf_model import load_hf_model
    from elastic.model import LlamaLM

    ffn = 64 * -(-(8 * args.dim // 3) // 64)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=args.dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=ffn,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp)
        theirs = load_hf_model(f"hf:{Path(tmp)}")
    ours = LlamaLM(
        ModelConfig(
            dim=args.dim,
            n_layers=args.layers,
            n_heads=args.heads,
            n_kv_heads=args.kv_heads,
            ffn_dim=ffn,
            vocab_size=args.vocab,
            seq_len=args.seq,
            tie_embeddings=False,
        )
    )
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(batch[:, :-1]) - theirs(batch[:, :-1])).abs().max().item()
        loss_diff = (ours.sequence_losses(batch) - theirs.sequence_losses(batch)).abs().max().item()
    print(f"logits max |ecpt LlamaLM - transformers| = {diff:.2e}; per-sequence loss max diff {loss_diff:.2e}")

    def step(model) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model.sequence_losses(batch).sum().backward()
        return time.perf_counter() - start

    for model in (ours, theirs):
        step(model)  # warm-up
    times = {"ecpt LlamaLM": [], "transformers LlamaForCausalLM": []}
    for _ in range(args.repeats):
        times["ecpt LlamaLM"].append(step(ours))
        times["transformers LlamaForCausalLM"].append(step(theirs))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<32} fwd+bwd median {v * 1000:7.1f} ms over {args.repeats} (min {min(times[k]) * 1000:.1f})")
    ratio = med["transformers LlamaForCausalLM"] / med["ecpt LlamaLM"]
    print(
        f"transformers / ecpt step time ratio {ratio:.2f} (dim {args.dim}, {args.layers} layers, seq {args.seq}, "
        f"batch {args.batch}, {args.threads} thread(s))"
    )


if __name__ == "__main__":
    main()
