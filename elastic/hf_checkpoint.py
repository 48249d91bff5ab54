"""What a Hugging Face model directory holds, checked without torch or transformers (the launcher validates configs
before any worker starts, and ``ecpt --help`` must stay fast).

A directory is accepted when it is what ``save_pretrained`` writes: ``config.json`` naming one supported
architecture and no custom code (``auto_map``), plus ``model.safetensors`` or sharded safetensors with
``model.safetensors.index.json``. Pickled weights (``pytorch_model.bin``) are refused: unpickling runs code from the
file (``weights_only=True`` narrows that but still parses pickle), and a pickle cannot be memory-mapped, so loading
it would hold a second full copy of the weights in host memory. The error says how to convert them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from elastic.errors import ConfigError

HF_PREFIX = "hf:"
"""How a config names a Hugging Face directory: ``model.init = "hf:/path/to/dir"``."""
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPTNeoXForCausalLM")
"""transformers classes ecpt trains directly (see docs/architecture.md, "Hugging Face models", for why the class
itself and not a re-implementation)."""
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
"""Files of an init directory that an export copies next to the weights, so AutoTokenizer (and generate) load it."""


@dataclass(frozen=True)
class HFDirectory:
    path: Path
    config: dict
    """config.json as written by save_pretrained."""
    weight_files: tuple[Path, ...]
    """The safetensors file(s), in index order for a sharded checkpoint."""

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]

    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]


def init_directory(init: str, field: str = "model.init") -> Path:
    """The directory an ``hf:`` value names; anything else is a ConfigError naming ``field``."""
    if not init.startswith(HF_PREFIX):
        raise ConfigError(f'{field} = {init!r} must be "hf:/path/to/dir" (a directory written by save_pretrained)')
    return Path(init[len(HF_PREFIX) :]).expanduser()


def inspect_directory(path: Path, field: str = "model.init") -> HFDirectory:
    """Check a save_pretrained directory and return what it holds, or raise ConfigError saying what would fix it."""
    if not path.is_dir():
        looks_like_hub_id = not path.is_absolute() and len(path.parts) == 2 and not str(path).startswith(".")
        hint = (
            f"; {str(path)!r} looks like a Hugging Face hub id: ecpt never downloads (no network at training time), "
            f'so download it first, e.g. `hf download {path} --local-dir DIR`, and set {field} = "hf:DIR"'
            if looks_like_hub_id
            else "; download or save the model there first (save_pretrained or `hf download ID --local-dir DIR`)"
        )
        raise ConfigError(f"{field}: {path} is not a directory{hint}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{field}: {path} has no config.json; point it at a directory written by save_pretrained")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{field}: {config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{field}: {config_path} must hold a JSON object")
    if "auto_map" in config:
        raise ConfigError(
            f"{field}: {config_path} names custom code (auto_map {config['auto_map']}); ecpt never runs code from a "
            f"model directory (no trust_remote_code). Use a model whose architecture is in transformers: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{field}: {config_path} has architectures {architectures}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return HFDirectory(path=path, config=config, weight_files=_weight_files(path, field))


def _weight_files(path: Path, field: str) -> tuple[Path, ...]:
    if (path / SINGLE_FILE).is_file():
        return (path / SINGLE_FILE,)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{field}: {index} is not a safetensors index (no weight_map): {exc}") from exc
        files = tuple(path / name for name in dict.fromkeys(weight_map.values()))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{field}: {index} lists shard(s) that are missing: {missing}")
        return files
    pickled = [name for name in PICKLED_FILES if (path / name).is_file()] + sorted(
        p.name for p in path.glob("pytorch_model-*.bin")
    )
    if pickled:
        raise ConfigError(
            f"{field}: {path} holds only pickled weights ({', '.join(pickled)}). ecpt reads safetensors only: "
            f"unpickling can execute code from the file, and a pickle cannot be memory-mapped (a second full copy of "
            f'the weights in memory). If you trust the file, convert it once: python -c "from transformers import '
            f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" and set "
            f'{field} = "hf:{path}-safetensors"'
        )
    raise ConfigError(f"{field}: {path} has no {SINGLE_FILE} and no {INDEX_FILE}; save the model with save_pretrained")


def _first(config: dict, *keys: str, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def architecture_fields(config: dict) -> dict:
    """ModelConfig fields (dim, layers, heads, vocabulary, ...) as config.json states them, for logs, the corpus'
    vocabulary check and the resolved config; the model itself is built from config.json."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    heads = config["num_attention_heads"]
    return {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": _first(config, "num_key_value_heads", default=heads),
        "ffn_dim": config["intermediate_size"],
        "vocab_size": config["vocab_size"],
        "rope_theta": float(_first(config, "rope_theta", "rotary_emb_base", default=rope.get("rope_theta", 10000.0))),
        "norm_eps": float(_first(config, "rms_norm_eps", "layer_norm_eps", default=1e-5)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),  # the default of all four classes
    }
