"""The tokenizer that turns documents into token ids: the byte-level one (vocabulary 256) or a Hugging Face fast
tokenizer (``tokenizer.json``, as written by ``save_pretrained``) through the ``tokenizers`` library.

``data.tokenizer`` names it: "bytes", "hf:DIR", or "auto" (the model directory of ``model.init`` when one is
given, else bytes). Nothing is downloaded: a directory that does not exist is an error that says to download first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastic.errors import ConfigError

BYTES = "bytes"
AUTO = "auto"
HF_PREFIX = "hf:"
BYTE_SEPARATOR = b"\n\n"
"""Byte-level documents are joined by a blank line (the byte vocabulary has no end-of-document token)."""


def resolve_spec(tokenizer: str, model_init: str | None) -> str:
    """'auto' -> the model directory's tokenizer when ``model.init`` is an 'hf:DIR', else 'bytes'."""
    if tokenizer != AUTO:
        return tokenizer
    if model_init and model_init.startswith(HF_PREFIX):
        return model_init
    return BYTES


def tokenizer_dir(spec: str, where: str = "data.tokenizer") -> Path:
    """The local directory an 'hf:DIR' spec names, checked to hold a fast tokenizer (tokenizer.json)."""
    raw = spec.removeprefix(HF_PREFIX)
    path = Path(raw).expanduser()
    if not path.exists():
        hub_like = not raw.startswith(("/", ".", "~")) and raw.count("/") == 1
        hint = (
            f"{raw!r} is not a local directory and looks like a Hugging Face Hub id; ecpt never downloads: download it first "
            f'(e.g. `hf download {raw} --local-dir DIR`) and set {where} = "hf:DIR"'
            if hub_like
            else f"the directory {path} does not exist; give the directory save_pretrained wrote"
        )
        raise ConfigError(f"{where} = {spec!r}: {hint}")
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(
            f"{where} = {spec!r}: {path} has no tokenizer.json; ecpt reads fast tokenizers only: load the tokenizer "
            f"with transformers (AutoTokenizer.from_pretrained(..., use_fast=True)) and save_pretrained it there, "
            f"or set data.tokenizer to a directory that has one (or to 'bytes')"
        )
    return path


def _eos_token(path: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
    return None


def token_dtype(id_bound: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids in [0, id_bound): uint8, uint16 or uint32."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if id_bound <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ConfigError(f"a vocabulary of {id_bound} ids does not fit uint32")


@dataclass(frozen=True)
class TokenizerInfo:
    """What the corpus builder and the validation need to know about a tokenizer, without holding it."""

    spec: str
    """'bytes' or 'hf:DIR'."""
    id_bound: int
    """One more than the largest token id it can emit; model.vocab_size must be at least this."""
    eos_id: int | None
    """Token appended after every document (None for bytes, which join documents with a blank line)."""
    content_hash: str
    """sha256 of tokenizer.json and the EOS token: the corpus cache key, so a changed tokenizer rebuilds."""

    @property
    def dtype(self) -> np.dtype:
        """Cache dtype: uint8 for bytes, else uint16 when the vocabulary fits, else uint32."""
        if self.spec == BYTES:
            return np.dtype(np.uint8)
        return np.dtype(np.uint16 if self.id_bound <= 1 << 16 else np.uint32)


def load_hf_tokenizer(path: Path):
    """The ``tokenizers.Tokenizer`` of a save_pretrained directory (no special tokens are added when encoding)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ConfigError("data.tokenizer = 'hf:...' needs the tokenizers library: pip install 'ecpt[hf]'") from exc
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def tokenizer_info(spec: str, where: str = "data.tokenizer") -> TokenizerInfo:
    if spec == BYTES:
        return TokenizerInfo(spec=BYTES, id_bound=256, eos_id=None, content_hash="bytes")
    if not spec.startswith(HF_PREFIX):
        raise ConfigError(f"{where} must be 'auto', 'bytes' or 'hf:DIR' (a save_pretrained directory), got {spec!r}")
    path = tokenizer_dir(spec, where)
    tok = load_hf_tokenizer(path)
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = _eos_token(path)
    if eos is None or eos not in vocab:
        raise ConfigError(
            f"{where} = {spec!r}: the tokenizer defines no end-of-document token (eos_token in "
            f"{path / 'tokenizer_config.json'}{'' if eos is None else f' is {eos!r}, not in the vocabulary'}); "
            f"documents are joined with it: set tokenizer.eos_token and save_pretrained again"
        )
    digest = hashlib.sha256((path / "tokenizer.json").read_bytes())
    digest.update(eos.encode())
    return TokenizerInfo(
        spec=spec, id_bound=max(vocab.values()) + 1, eos_id=vocab[eos], content_hash=digest.hexdigest()
    )
