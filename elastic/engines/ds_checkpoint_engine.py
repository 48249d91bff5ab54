"""DeepSpeed ``CheckpointEngine`` backed by ecpt's checkpoint library, for code that calls
``engine.save_checkpoint`` / ``engine.load_checkpoint`` itself.

Plug in after ``deepspeed.initialize``: ``ds_engine.checkpoint_engine = EcptCheckpointEngine(root, rank, world)``.

What happens to one ``save_checkpoint(save_dir, tag)``:
* ``save(state_dict, path)`` (once per DeepSpeed file: model states on the writer rank, one ZeRO optimizer file per
  rank) only records the state dict: every tensor becomes one array of an ecpt checkpoint (``ds/<file>/t<i>``);
  the rest of the nested structure (ints, strings, param groups, DeepSpeed's small helper objects) becomes a JSON
  skeleton. No pickle is written or read.
* ``commit(info)`` (collective: every rank calls it) hands all tensors to ``CheckpointManager.save`` as one
  checkpoint, waits only until they are staged (copied to host buffers: the training stall), and writes at each
  DeepSpeed path a small JSON stub (skeleton + where the tensors are). DeepSpeed's loader finds files by globbing,
  so the stubs keep its directory layout; writing, checksumming and the manifest commit stay asynchronous.
* ``load(path)`` reads the stub, waits for that checkpoint to be durable if this process saved it, and rebuilds the
  state dict with the tensors read (and checksum-verified) from zarr.

Limits: DeepSpeed's own layout is kept, so its own restriction holds: ``load_checkpoint`` works at the world size
and stage that saved (ZeRO files are per rank). Resharding to another world size or stage is what ecpt's trainer
checkpoints (``elastic/checkpoints.py``) do. Objects in a state dict that are neither tensors, JSON values, enums
nor plain DeepSpeed objects are refused with the key that holds them.
"""

from __future__ import annotations

import enum
import importlib
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from checkpointing import CheckpointError, CheckpointManager, LevelSpec, Shard, list_checkpoints, read_tensor

STUB_FORMAT = "ecpt-deepspeed-stub-1"
_TRUSTED_MODULES = ("deepspeed.",)
"""Objects are rebuilt (class.__new__ + __dict__) only for classes defined in these packages."""


def _file_key(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name)


class _Flattener:
    """Nested state dict <-> (JSON skeleton, tensors by name)."""

    def __init__(self, prefix: str):
        self.prefix, self.tensors = prefix, {}

    def encode(self, value, where: str):
        if isinstance(value, torch.Tensor):
            name = f"{self.prefix}/t{len(self.tensors)}"
            self.tensors[name] = value.detach()
            return {"__tensor__": name}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Size):
            return {"__size__": list(value)}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, enum.Enum):
            return {"__enum__": _class_path(value, where), "value": self.encode(value.value, where)}
        if isinstance(value, dict):
            return {
                "__dict__": [[self.encode(k, where), self.encode(v, f"{where}.{k}")] for k, v in value.items()],
                "ordered": isinstance(value, OrderedDict),
            }
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if isinstance(value, list) else {"__" + type(value).__name__ + "__": items}
        if hasattr(value, "__dict__"):
            return {"__object__": _class_path(value, where), "state": self.encode(vars(value), where)}
        raise CheckpointError(
            f"DeepSpeed state {where} holds a {type(value).__name__}, which ecpt checkpoints "
            f"cannot store without pickle"
        )


def _class_path(value, where: str) -> str:
    cls = type(value)
    if not cls.__module__.startswith(_TRUSTED_MODULES) and not isinstance(value, enum.Enum):
        raise CheckpointError(
            f"DeepSpeed state {where} holds a {cls.__module__}.{cls.__qualname__}; only DeepSpeed's "
            f"own objects are stored (rebuilding arbitrary classes would be pickle by another name)"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _load_class(path: str):
    module, _, qualname = path.partition(":")
    if not module.startswith(_TRUSTED_MODULES + ("torch.", "enum")):
        raise CheckpointError(f"refusing to rebuild {path}: not a DeepSpeed class")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode(node, read):
    if isinstance(node, list):
        return [_decode(v, read) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return read(node["__tensor__"])
    if "__size__" in node:
        return torch.Size(node["__size__"])
    if "__dtype__" in node:
        return getattr(torch, node["__dtype__"])
    if "__enum__" in node:
        return _load_class(node["__enum__"])(_decode(node["value"], read))
    if "__dict__" in node:
        items = [(_decode(k, read), _decode(v, read)) for k, v in node["__dict__"]]
        return OrderedDict(items) if node.get("ordered") else dict(items)
    for kind, ctor in (("__tuple__", tuple), ("__set__", set), ("__frozenset__", frozenset)):
        if kind in node:
            return ctor(_decode(v, read) for v in node[kind])
    if "__object__" in node:
        cls = _load_class(node["__object__"])
        obj = cls.__new__(cls)
        obj.__dict__.update(_decode(node["state"], read))
        return obj
    raise CheckpointError(f"unknown node in a DeepSpeed stub: {sorted(node)}")


def _step_of(tag: str, fallback: int) -> int:
    digits = re.findall(r"\d+", str(tag))
    return int(digits[-1]) if digits else fallback


class EcptCheckpointEngine(CheckpointEngine):
    """DeepSpeed's CheckpointEngine interface over one L1 level of ecpt checkpoints at ``root``."""

    def __init__(self, root: str | Path, rank: int = 0, world_size: int = 1, group=None, keep_last: int = 3):
        super().__init__()
        self.name = "ecpt"
        self.root = Path(root)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.manager = CheckpointManager(
            [LevelSpec(name="L1", root=str(self.root), interval=1, keep_last=keep_last, node_local=False)],
            rank=rank,
            world_size=world_size,
            group=group,
        )
        self._files: dict[str, tuple[object, dict]] = {}
        self._saves = 0
        self._handles: dict[int, object] = {}
        self.last_stall_seconds = 0.0

    # ------------------------------------------------------------------------------------------------ saving

    def create(self, info: CheckpointCommitInfo) -> None:
        self._files = {}

    def makedirs(self, path, exist_ok=False) -> None:
        os.makedirs(path, exist_ok=True)

    def preserves_storage_sharing(self) -> bool:
        """False: DeepSpeed then hands over its live tensors uncloned; commit() stages them before returning."""
        return False

    def save(self, state_dict, path: str) -> None:
        flat = _Flattener(f"ds/{_file_key(path)}")
        skeleton = flat.encode(state_dict, _file_key(path))
        self._files[str(path)] = (skeleton, flat.tensors)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        """Collective. One ecpt checkpoint per tag; returns after staging (the stall), persists in the background."""
        import time

        t0 = time.perf_counter()
        self._saves += 1
        step = _step_of(info.tag, self._saves)
        mine = {name: t for _, tensors in self._files.values() for name, t in tensors.items()}
        described = {name: (tuple(t.shape), t.dtype) for name, t in mine.items()}
        everyone = [described]
        if self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, described, group=self.group)
        tensors = {}
        for owner, names in enumerate(everyone):
            for name, (shape, dtype) in names.items():
                if owner == self.rank:
                    t = mine[name]
                    tensors[name] = Shard(
                        t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1), tuple(shape), (0, t.numel())
                    )
                else:  # another rank's file: this rank holds none of it
                    tensors[name] = Shard(torch.empty(0, dtype=dtype), tuple(shape), (0, 0))
        handle = self.manager.save(step, tensors, {"deepspeed_tag": str(info.tag)})
        self.manager.wait_staged()
        self._handles[step] = handle
        for path, (skeleton, _) in self._files.items():
            stub = {
                "format": STUB_FORMAT,
                "root": str(self.root),
                "step": step,
                "tag": str(info.tag),
                "skeleton": skeleton,
            }
            tmp = Path(f"{path}.tmp")
            tmp.write_text(json.dumps(stub))
            os.replace(tmp, path)
        self._files = {}
        self.last_stall_seconds = time.perf_counter() - t0
        return True

    def wait(self) -> None:
        """Block until every save so far is durable (collective, like CheckpointManager.wait_durable)."""
        self.manager.wait_durable()
        self._handles.clear()

    # ------------------------------------------------------------------------------------------------ loading

    def load(self, path: str, map_location=None):
        try:
            stub = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"{path} is not an ecpt DeepSpeed stub (saved by another checkpoint engine?)"
            ) from exc
        if not isinstance(stub, dict) or stub.get("format") != STUB_FORMAT:
            raise CheckpointError(f"{path} is not an ecpt DeepSpeed stub ({STUB_FORMAT})")
        step = stub["step"]
        handle = self._handles.get(step)
        if handle is not None:
            handle.durable.result()  # saved by this process: its commit may still be persisting
        found = [c for c in list_checkpoints(stub["root"]) if c.step == step]
        if not found:
            raise CheckpointError(f"{path}: checkpoint step {step} under {stub['root']} is not committed")
        ckpt = found[0].path
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        return _decode(stub["skeleton"], lambda name: read_tensor(ckpt, name).to(device))

    def cleanup(self) -> None:
        self.manager.close()
