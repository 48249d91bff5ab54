"""Hugging Face models as ecpt training models: the transformers class itself, loaded from memory-mapped safetensors.

The training model is a subclass of the transformers class (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM``, ``GPTNeoXForCausalLM``) that adds ecpt's loss contract and nothing else: ``forward(tokens,
targets)`` returns the mean next-token cross-entropy of each sequence [B] (inside forward, so DDP and DeepSpeed see
the whole graph) and ``sequence_losses(batch)`` takes inputs and shifted targets in one array. Parameter names are
therefore the Hugging Face names, exactly as for ecpt's own ``LlamaLM``: checkpoints, ZeRO partitions, resharding
and export need no mapping. Why the class and not a re-implementation: docs/architecture.md, "Hugging Face models".

Loading never holds two full copies of the weights: the model is built with uninitialised storage (transformers'
``no_init_weights`` skips the random init), then each tensor is copied (and converted to fp32) straight out of the
memory-mapped safetensors file into its parameter, and the file's pages of that tensor are released from this
process (``madvise(MADV_DONTNEED)``) before the next one: without that, every touched page of the map stays
resident and the peak is two copies (measured: 2.13 x the weights; see benchmarks/hf_import.py). The format is
read by ``mapped_tensors`` below (an 8-byte header length, a JSON header of dtype/shape/offsets, raw little-endian
data): no pickle, nothing executed. Nothing from the model directory is executed
(``trust_remote_code`` is never passed; ``hf_checkpoint.inspect_directory`` refused custom code already).
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from elastic.hf_checkpoint import HFDirectory, init_directory, inspect_directory
from elastic.model import per_sequence_losses


class EcptLossMixin:
    """ecpt's loss contract on top of a transformers causal LM (see the module docstring)."""

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().forward(input_ids=tokens, use_cache=False).logits
        return logits if targets is None else per_sequence_losses(logits, targets)

    def sequence_losses(self, batch: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean loss of ``batch`` [B, seq_len + 1] (inputs and shifted targets in one array) -> [B]."""
        return self(batch[:, :-1], batch[:, 1:])


@functools.cache
def training_class(architecture: str) -> type[nn.Module]:
    """``Ecpt<architecture>``: the transformers class with ecpt's loss contract."""
    import transformers

    base = getattr(transformers, architecture)
    return type(f"Ecpt{architecture}", (EcptLossMixin, base), {})


def hf_config_object(hf: HFDirectory):
    """The transformers config of ``hf`` (its model_type's config class; never code from the directory)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**hf.config)
    config._attn_implementation = "sdpa"  # fixed, so every rank and every run uses the same kernels
    return config


def load_hf_model(init: str, read_weights: bool = True) -> nn.Module:
    """The training model of ``model.init`` with the directory's weights, in fp32 (master weights; DeepSpeed bf16
    casts its working copy itself). ``read_weights=False`` when a checkpoint restore will overwrite every parameter:
    the file's keys and shapes are still checked (from its header, no data read) but the parameters stay
    uninitialised, so a restarted worker does not read the whole model from disk only to overwrite it."""
    from transformers.initialization import no_init_weights

    hf = inspect_directory(init_directory(init))
    with no_init_weights():
        model = training_class(hf.architecture)(hf_config_object(hf))
    model.tie_weights()  # under no_init_weights the constructor leaves tied embeddings untied
    model = model.to(torch.float32)
    copy_weights(model, hf, read_data=read_weights)
    model.train()
    return model


def copy_weights(model: nn.Module, hf: HFDirectory, read_data: bool = True) -> None:
    """Copy every parameter and persistent buffer from the memory-mapped safetensors file(s) of ``hf``, one tensor
    at a time, and fail naming the tensors that are missing or unexpected (a tied head may be absent).

    File keys are renamed as transformers' own loading renames them (legacy names such as GPT-NeoX's
    ``embed_out`` for ``lm_head``); ``model.hf_file_names`` keeps {parameter name: file key} where they differ, so
    an export writes the file keys the input had."""
    rename = _file_key_renamer(model)
    targets = dict(model.named_parameters(remove_duplicate=False)) | {
        name: b for name, b in model.named_buffers() if name.rpartition(".")[2] not in _non_persistent(model, name)
    }
    seen, unexpected, file_names = set(), [], {}
    for path in hf.weight_files:
        for key, tensor in mapped_tensors(path):
            name = rename(key)
            if name not in targets:
                unexpected.append(key)
                continue
            if tuple(tensor.shape) != tuple(targets[name].shape):
                raise ValueError(
                    f"{path}: {key} has shape {tuple(tensor.shape)}, config.json implies {tuple(targets[name].shape)}"
                )
            if read_data:  # a view of the map reads nothing until copied
                with torch.no_grad():
                    targets[name].copy_(tensor)
            del tensor  # the map's pages of this tensor are released when the generator resumes
            seen.add(name)
            if key != name:
                file_names[name] = key
    missing = sorted(set(targets) - seen - _tied_names(model))
    if missing or unexpected:
        raise ValueError(f"{hf.path}: weights do not match config.json: missing {missing}, unexpected {unexpected}")
    model.hf_file_names = file_names


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def mapped_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of a safetensors file, each a zero-copy view of a private memory map; the view must be dropped
    before the next item, whose request releases the previous tensor's pages from this process."""
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view for torch, never written
    try:
        header_len = int.from_bytes(mm[:8], "little")
        if not 0 < header_len <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len})")
        try:
            header = json.loads(mm[8 : 8 + header_len])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: safetensors header is not JSON: {exc}") from exc
        data = 8 + header_len
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            count = math.prod(shape)
            if dtype is None or end - begin != count * dtype.itemsize or not data <= data + end <= size:
                raise ValueError(f"{path}: tensor {key} has a bad header entry {info}")
            if count == 0:
                yield key, torch.empty(shape, dtype=dtype)
                continue
            view = torch.frombuffer(mm, dtype=dtype, count=count, offset=data + begin).view(shape)
            yield key, view
            del view
            first = (data + begin) // page * page
            mm.madvise(mmap.MADV_DONTNEED, first, data + end - first)
    finally:
        mm.close()


def _file_key_renamer(model: nn.Module):
    """key in the file -> parameter name, by the renamings transformers registers for the base class (looked up on
    a meta-device instance of it, which allocates nothing)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    base_class = type(model).__mro__[2]  # Ecpt<arch> -> EcptLossMixin -> <arch>
    with torch.device("meta"):
        base = base_class(model.config)
    transforms = get_model_conversion_mapping(base)
    if not all(isinstance(t, WeightRenaming) for t in transforms):
        raise ValueError(f"{base_class.__name__}: transformers converts (not only renames) its weights; not supported")
    meta_state = base.state_dict()
    return lambda key: rename_source_key(key, transforms, [], base.base_model_prefix, meta_state)[0]


def _non_persistent(model: nn.Module, buffer_name: str) -> set[str]:
    module = model.get_submodule(buffer_name.rpartition(".")[0]) if "." in buffer_name else model
    return set(module._non_persistent_buffers_set)


def _tied_names(model: nn.Module) -> set[str]:
    """Names under which a parameter is registered a second time (named_parameters lists a shared one once)."""
    first = {id(p): n for n, p in model.named_parameters()}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}
