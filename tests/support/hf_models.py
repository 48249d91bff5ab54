"""Tiny random Hugging Face models, one per supported family, written with transformers' own save_pretrained (no
downloads), plus a small BPE tokenizer trained with `tokenizers` on a few strings, saved next to the weights."""

from __future__ import annotations

from pathlib import Path

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
VOCAB = 300
"""Larger than 256, so byte-level tokens fit and an embedding row beyond the bytes exists."""

FAMILIES = {
    # GQA (2 kv heads for 4 query heads), untied head
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # tied embeddings
    "llama-tied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    # Mistral: Llama layout with GQA (its sliding window is off at these lengths)
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # q/k/v projections with bias
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # parallel attention + MLP, partial rotary (a quarter of each head), LayerNorm with bias
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(use_parallel_residual=True, rotary_pct=0.25, tie_word_embeddings=False),
    ),
}
TOKENIZER_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "int main(void) { return 0; }",
    "Continual pre-training continues a model that was already pre-trained.",
]


def save_tiny_model(family: str, out: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A randomly initialised ``family`` model saved as safetensors in ``out`` (sharded if ``max_shard_size``)."""
    import torch
    import transformers

    config_class, overrides = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, max_position_embeddings=128, **TINY, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def save_tiny_tokenizer(out: Path) -> Path:
    """A byte-level BPE with VOCAB tokens trained on TOKENIZER_TEXT, saved as a fast tokenizer in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(out)
    return out


def save_tiny_hf_dir(family: str, out: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Model and tokenizer in one directory, as a user brings them."""
    save_tiny_model(family, out, seed, max_shard_size)
    return save_tiny_tokenizer(out)
