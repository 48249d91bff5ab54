"""A small BPE tokenizer trained with `tokenizers` on the builtin corpus and saved with transformers'
``PreTrainedTokenizerFast.save_pretrained`` (no downloads): what a user's Hugging Face model directory holds."""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def save_bpe_tokenizer(out: Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE of ``vocab_size`` ids on a slice of the builtin corpus and save_pretrained it to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from elastic.data_sources import builtin_documents

    texts = [
        doc.text.decode("utf-8", errors="replace")
        for name in ("prose", "python", "c")
        for doc in builtin_documents(name)[:40]
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(out))
    return out
