"""Offline tools (no process group): list, verify, inspect, read one tensor, export to safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpointing.checksums import CRC_BLOCK_BYTES, BlockChecksummer, ChunkCrcs
from checkpointing.errors import CheckpointCorruptError, CheckpointError
from checkpointing.manager import CheckpointInfo
from checkpointing.manifest import ChunkRecord, read_manifest
from checkpointing.reshard import LoadTarget, Scratch, corrupt_blocks, read_range
from checkpointing.tiers import committed_steps
from checkpointing.zarr_store import torch_dtype


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def _object_storage(url: str, endpoint: str = ""):
    """An s3:// level root or one step under it: (storage of the root, the step's location or None)."""
    from checkpointing.objclient import parse_url
    from checkpointing.objstore import ObjectStorage
    from checkpointing.tiers import LevelSpec

    bucket, prefix = parse_url(url)
    head, _, last = prefix.rpartition("/")
    step = last if last.startswith("step-") else None
    root = f"s3://{bucket}/{head if step else prefix}".rstrip("/")
    storage = ObjectStorage(LevelSpec("offline", root, 1, 1, False, endpoint=endpoint), max_concurrency=1)
    return storage, (storage.root / step if step else None)


def list_checkpoints(root: str | Path, endpoint: str = "") -> list[CheckpointInfo]:
    """Committed checkpoints under one level root (a directory or s3://bucket/prefix), oldest first (directories
    or step prefixes without manifest are not listed)."""
    if is_url(root):
        storage, _ = _object_storage(str(root), endpoint)
        steps, read, shown = storage.committed(), storage.read_manifest, storage.display
    else:
        steps, read, shown = committed_steps(Path(root)), read_manifest, str
    out = []
    for step, path in steps:
        try:
            m = read(path)
        except CheckpointCorruptError:
            out.append(CheckpointInfo(step, "?", shown(path), complete=False))
            continue
        out.append(CheckpointInfo(step, m.level, shown(path), m.nbytes, m.complete, m.node_id, m.created_unix))
    return out


def verify_object(url: str, endpoint: str = "") -> list[str]:
    """verify() for one step under an s3:// root (s3://bucket/prefix/step-XXXXXXXX): every object is read and
    checked against the manifest."""
    from checkpointing.reshard import Scratch

    storage, location = _object_storage(url, endpoint)
    if location is None:
        raise CheckpointError(f"{url}: not a step (s3://bucket/prefix/step-XXXXXXXX)")
    try:
        manifest = storage.read_manifest(location)
    except CheckpointCorruptError as e:
        return [str(e)]
    scratch, problems = Scratch(), []
    records = [r for t in manifest.tensors.values() for r in t.chunks.values()] + list(manifest.files.values())
    for record in records:
        data = scratch.view(record.nbytes)
        try:
            storage.read_chunk(location / record.file, record, [data])
        except CheckpointCorruptError as e:
            problems.append(str(e))
            continue
        bad = corrupt_blocks(record, data)
        if bad:
            problems.append(
                f"{storage.url(location)}/{record.file}: {_bad_blocks(record, bad)}, though the whole object's "
                f"crc32c matches"
            )
    return problems


def verify(path: str | Path) -> list[str]:
    """Every problem found in one checkpoint directory (empty list: every listed file has its size, its crc32c and,
    where the manifest lists them, its block crc32cs: partial loads check those)."""
    if is_url(path):
        return verify_object(str(path))
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
            found, size = _checksum_file(file, record.block_bytes or CRC_BLOCK_BYTES)
        except FileNotFoundError:
            problems.append(f"{file}: missing (listed in the manifest)")
            continue
        listed = record.blocks.lower()
        bad = [i for i in range(len(listed) // 8) if found.blocks[8 * i : 8 * i + 8] != listed[8 * i : 8 * i + 8]]
        if size != record.nbytes:
            problems.append(f"{file}: {size} bytes on disk, manifest says {record.nbytes} (truncated)")
        elif found.crc32c != record.crc32c:
            problems.append(
                f"{file}: crc32c {found.crc32c:#010x} does not match the manifest's {record.crc32c:#010x}"
                + (f"; {_bad_blocks(record, bad)}" if bad else "")
            )
        elif bad:
            problems.append(f"{file}: {_bad_blocks(record, bad)}, though the whole file's crc32c matches")
    return problems


def _checksum_file(file: Path, block_bytes: int) -> tuple[ChunkCrcs, int]:
    """The file's checksums (whole and per block) and size, in one pass."""
    acc, size = BlockChecksummer(block_bytes), 0
    with open(file, "rb", buffering=0) as f:
        while piece := f.read(1 << 20):
            acc.update(memoryview(piece))
            size += len(piece)
    return acc.result(), size


def _bad_blocks(record: ChunkRecord, bad: list[int]) -> str:
    return f"crc32c of block{'s' if len(bad) > 1 else ''} {bad[:8]} (of {record.block_bytes} bytes) does not match"


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
    read_range(path, manifest, LoadTarget.of(name, out), Scratch())
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
