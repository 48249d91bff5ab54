"""ecpt checkpointing: lazy, asynchronous, multi-level checkpoints in zarr v3, loadable into any layout.

Usable from any PyTorch training loop:

    mgr = CheckpointManager([LevelSpec("L1", "ckpt", interval=10, keep_last=3, node_local=True)])
    mgr.save(step, {"model/w": w, "optim/w/exp_avg": m}, {"lr": 1e-3})   # returns at once
    mgr.wait_staged()                                                     # right before optimizer.step()
    ...
    res = mgr.load({"model/w": w, "optim/w/exp_avg": m})                  # fills in place
"""

from checkpointing.errors import CheckpointCorruptError, CheckpointError
from checkpointing.manager import CheckpointManager
from checkpointing.results import CheckpointInfo, LoadResult, SaveHandle
from checkpointing.manifest import MANIFEST_NAME, Manifest
from checkpointing.offline import export_safetensors, inspect, list_checkpoints, read_tensor, verify
from checkpointing.staging import Shard
from checkpointing.tiers import LevelSpec, committed_steps, newest_committed, step_dir_name
from checkpointing.zarr_store import chunk_files

__all__ = [
    "CheckpointManager",
    "LevelSpec",
    "Shard",
    "SaveHandle",
    "LoadResult",
    "CheckpointInfo",
    "Manifest",
    "CheckpointError",
    "CheckpointCorruptError",
    "list_checkpoints",
    "verify",
    "inspect",
    "read_tensor",
    "export_safetensors",
    # on-disk layout, for tools that look at checkpoint directories without loading them
    "MANIFEST_NAME",
    "step_dir_name",
    "committed_steps",
    "newest_committed",
    "chunk_files",
]
