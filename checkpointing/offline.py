"""Offline tools (no process group): list, verify, inspect, read one tensor, export to safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpointing.errors import CheckpointCorruptError, CheckpointError
from checkpointing.manager import CheckpointInfo
from checkpointing.manifest import read_manifest
from checkpointing.reshard import Scratch, Target, read_range
from checkpointing.tiers import committed_steps
from checkpointing.zarr_store import read_into, torch_dtype


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Committed checkpoints under one level root, oldest first (directories without manifest are not listed)."""
    out = []
    for step, path in committed_steps(Path(root)):
        try:
            m = read_manifest(path)
        except CheckpointCorruptError:
            out.append(CheckpointInfo(step, "?", str(path), complete=False))
            continue
        out.append(CheckpointInfo(step, m.level, str(path), m.nbytes, m.complete, m.node_id, m.created_unix))
    return out


def verify(path: str | Path) -> list[str]:
    """Every problem found in one checkpoint directory (empty list: every listed file has its size and crc32c)."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointCorruptError as e:
        return [str(e)]
    problems = []
    records = [r for t in manifest.tensors.values() for r in t.chunks.values()] + list(manifest.files.values())
    for record in records:
        file = path / record.file
        try:
            crc, size = read_into(file, [])
        except FileNotFoundError:
            problems.append(f"{file}: missing (listed in the manifest)")
            continue
        if size != record.nbytes:
            problems.append(f"{file}: {size} bytes on disk, manifest says {record.nbytes} (truncated)")
        elif crc != record.crc32c:
            problems.append(f"{file}: crc32c {crc:#010x} does not match the manifest's {record.crc32c:#010x}")
    return problems


def inspect(path: str | Path) -> dict:
    """A JSON-friendly summary: step, level, node, world size, extra keys, and per tensor shape/dtype/coverage."""
    manifest = read_manifest(Path(path))
    return {
        "path": str(path),
        "step": manifest.step,
        "level": manifest.level,
        "node_id": manifest.node_id,
        "node_local": manifest.node_local,
        "world_size": manifest.world_size,
        "complete": manifest.complete,
        "nbytes": manifest.nbytes,
        "created_unix": manifest.created_unix,
        "extra_keys": sorted(manifest.extra),
        "tensors": {
            name: {
                "shape": t.shape,
                "dtype": t.dtype,
                "layout": t.layout,
                "nbytes": t.nbytes,
                "chunks": f"{len(t.chunks)}/{t.n_chunks}",
            }
            for name, t in manifest.tensors.items()
        },
    }


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One whole tensor, verified chunk by chunk (CheckpointCorruptError names a missing or corrupt chunk)."""
    path = Path(path)
    manifest = read_manifest(path)
    entry = manifest.tensors.get(name)
    if entry is None:
        raise CheckpointError(f"{path}: no tensor {name!r}; it has {sorted(manifest.tensors)[:10]}...")
    out = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
    read_range(path, manifest, Target.of(name, out), Scratch())
    return out


def export_safetensors(
    path: str | Path,
    out_dir: str | Path,
    prefix: str = "model/",
    dtype: torch.dtype | None = None,
    rename: dict[str, str] | None = None,
) -> Path:
    """Write `model.safetensors` with the tensors named `<prefix><key>` (keys stripped of the prefix, e.g. Hugging
    Face names like model.layers.0.self_attn.q_proj.weight) and `config.json` from extra["hf_config"] if saved.
    ``dtype`` (e.g. torch.bfloat16) converts every tensor and is recorded as the config's dtype; None keeps the
    stored dtype. ``rename`` maps a stripped key to the key to write (e.g. a model's legacy file names). Tensors are
    read and converted one at a time."""
    from safetensors.torch import save_file

    path, out_dir = Path(path), Path(out_dir)
    manifest = read_manifest(path)
    names = [n for n in manifest.tensors if n.startswith(prefix)]
    if not names:
        raise CheckpointError(f"{path}: no tensor name starts with {prefix!r}; pass the prefix the trainer used")
    tensors = {}
    for n in names:
        tensor = read_tensor(path, n)
        key = n[len(prefix) :]
        tensors[(rename or {}).get(key, key)] = (tensor if dtype is None else tensor.to(dtype)).contiguous()
        del tensor
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.safetensors"
    save_file(tensors, str(out), metadata={"format": "pt", "ecpt_step": str(manifest.step)})
    if "hf_config" in manifest.extra:
        config = dict(manifest.extra["hf_config"])
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            config["dtype"] = name  # the key transformers >= 5 writes
            if "torch_dtype" in config:  # the key older writers used; keep both in agreement
                config["torch_dtype"] = name
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out
