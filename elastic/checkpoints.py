"""The trainer's side of checkpointing: which levels, what state, and how a restart resumes.

State names in the checkpoint (one zarr array each, global and unsharded):
    model/<Hugging Face parameter name>          e.g. model/model.layers.0.mlp.up_proj.weight
    optim/<parameter name>/exp_avg, .../exp_avg_sq
and JSON ``extra``: completed steps, tokens, the data cursor (global sample index), the global batch, the world
size that saved it, the torch RNG state, the resolved config and, for export, the Hugging Face config (the
``model.init`` directory's own config.json when there is one), the init directory (``hf_init``, for its tokenizer
files) and the file keys that differ from the parameter names (``hf_file_names``).

Call order inside a step (the lazy snapshot): ``optimizer.step()`` -> ``after_optimizer_step`` (save returns at
once; the copy overlaps the next forward/backward) -> ... -> ``before_optimizer_step`` (wait until that copy is
done, the first moment the parameters change again).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpointing import CheckpointError, CheckpointManager, LevelSpec
from elastic import memory_levels
from elastic.config import Config
from elastic.model import hf_config
from elastic.process_env import AGENT_PID_ENV, PROCESS_STARTED_ENV, node_id


def run_key(cfg: Config) -> str:
    """A short, stable name for this run, so a restarted worker finds the same L0 directory."""
    return hashlib.sha1(str(Path(cfg.train.run_dir).resolve()).encode()).hexdigest()[:12]


def l2_run_name(cfg: Config) -> str:
    """The run's name under l2_dir: the same on every machine (not derived from an absolute path), so a new node or
    cluster with no local level left finds the run's durable checkpoints."""
    return cfg.checkpoint.l2_run_name or Path(cfg.train.run_dir).resolve().name


def memory_entry(cfg: Config) -> Path:
    """This run identity's L0 entry (all nodes on this machine); see elastic/memory_levels.py for the layout."""
    run_id = memory_levels.run_identity(cfg.train.run_dir)
    return Path(cfg.checkpoint.l0_dir) / memory_levels.entry_name(run_key(cfg), run_id)


def checkpoint_levels(cfg: Config) -> list[LevelSpec]:
    c = cfg.checkpoint
    levels = []
    if c.l0_interval:
        root = memory_entry(cfg) / node_id()
        levels.append(
            LevelSpec(name="L0", root=str(root), interval=c.l0_interval, keep_last=c.l0_keep_last, node_local=True)
        )
    if c.interval:
        root = Path(cfg.train.run_dir) / c.dir if not Path(c.dir).is_absolute() else Path(c.dir)
        if c.l1_node_local:
            root = root / node_id()
        levels.append(
            LevelSpec(
                name="L1",
                root=str(root),
                interval=c.interval,
                keep_last=c.keep_last,
                node_local=c.l1_node_local,
                direct_io=c.direct_io_setting,
            )
        )
    if c.l2_interval:
        is_url = "://" in c.l2_dir  # validated: s3://bucket/prefix (a Path would fold "s3://" into "s3:/")
        name = l2_run_name(cfg)
        levels.append(
            LevelSpec(
                name="L2",
                root=f"{c.l2_dir.rstrip('/')}/{name}" if is_url else str(Path(c.l2_dir) / name),
                interval=c.l2_interval,
                keep_last=c.l2_keep_last,
                node_local=False,
                endpoint=c.s3_endpoint,
                direct_io=c.direct_io_setting,
            )
        )
    return levels


def check_object_levels(cfg: Config) -> None:
    """Start-up, before any worker runs: an s3:// l2_dir must name an existing bucket that the configured
    credentials may list, write and delete in. Raises CheckpointError saying which and what would fix it (every
    CheckpointManager checks again when it starts)."""
    c = cfg.checkpoint
    if not (c.l2_interval and c.l2_dir.startswith("s3://")):
        return
    from checkpointing.objstore import ObjectStorage

    storage = ObjectStorage(LevelSpec("L2", c.l2_dir, c.l2_interval, c.l2_keep_last, False, endpoint=c.s3_endpoint))
    try:
        storage.check()
    finally:
        storage.close()


def claim_memory_level(cfg: Config, launcher: str, log) -> None:
    """On each node's first worker, before any save or restore: record who owns this run's memory on this node,
    say whether memory of an earlier run in this run directory is ignored, and free other runs' stale memory."""
    entry = memory_entry(cfg)
    run_id = entry.name.rpartition("-")[2]
    owner = memory_levels.owner_process(os.environ.get(AGENT_PID_ENV), launcher)
    memory_levels.claim(entry, node_id(), cfg.train.run_dir, run_id, owner)
    earlier = memory_levels.foreign_entries(cfg.checkpoint.l0_dir, run_key(cfg), run_id)
    if earlier:
        log.warning(
            f"ignoring memory checkpoints of an earlier run in {cfg.train.run_dir} (another run identity; "
            f"the run directory was recreated): {[str(e.path) for e in earlier]}; starting without them"
        )
    memory_levels.reap_stale(cfg.checkpoint.l0_dir, cfg.checkpoint.l0_stale_after_s, spare=entry, log=log)


def release_memory_level(cfg: Config, log) -> bool:
    """The run finished or stopped on a signal, and no worker of it runs on this node any more: free this node's
    memory checkpoints if their newest step is durable on a slower level (else keep them and log why)."""
    if not cfg.checkpoint.l0_interval or memory_levels.run_identity(cfg.train.run_dir, create=False) is None:
        return False  # no memory level, or no worker ever started (a deleted run directory is not recreated)
    levels = checkpoint_levels(cfg)
    return memory_levels.release(memory_entry(cfg), node_id(), [lv.root for lv in levels[1:]], log)


@dataclass
class Restored:
    step: int
    level: str
    path: str
    seconds: float
    saved_world_size: int
    steps_lost: int


class TrainerCheckpoints:
    """Binds a Trainer to a CheckpointManager."""

    def __init__(self, trainer, registry=None):
        self.trainer = trainer
        cfg, world, groups = trainer.cfg, trainer.world, trainer.groups
        self.levels = checkpoint_levels(cfg)
        if cfg.checkpoint.l0_interval and world.local_rank == 0:
            claim_memory_level(cfg, world.launcher, trainer.log)
        self.manager = CheckpointManager(
            self.levels,
            rank=world.rank,
            world_size=world.world_size,
            group=groups.ckpt,
            local_rank=groups.node_rank,
            local_world_size=groups.node_size,
            local_group=groups.node,
            node_id=node_id(),
            on_busy=cfg.checkpoint.on_busy,
            registry=registry,
            logger=trainer.log,
            # the same every save: sent to the other ranks once, stored in every manifest's extra
            static_extra={
                "config": cfg.to_dict(),
                "hf_config": hf_config(cfg.model),  # read once: an init dir's config.json is not re-read per save
                "hf_init": cfg.model.init,
                "hf_file_names": getattr(trainer.model, "hf_file_names", {}),
            },
        )
        # Name -> live tensor (DDP replicas) or Shard of this rank's ZeRO partition; built once, updated in place.
        self.tensors = trainer.engine.checkpoint_tensors()
        self.newest_saved: int | None = None  # the newest step handed to the manager

    def _extra(self, completed: int) -> dict:
        t = self.trainer
        return {
            "step": completed,
            "tokens": t.state.tokens,
            "cursor": completed * t.cfg.train.global_batch,
            "global_batch": t.cfg.train.global_batch,
            "world_size": t.world.world_size,
            "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "counters": t.state.counters.to_json(),
        }

    # ---------------------------------------------------------------------------------------------- in the loop

    def before_optimizer_step(self) -> None:
        self.manager.wait_staged()

    def after_optimizer_step(self, completed: int) -> None:
        if self.manager.save(completed, self.tensors, self._extra(completed)) is not None:
            self.newest_saved = completed

    def emergency_save(self, completed: int) -> list[str]:
        """SIGTERM/SIGUSR1 after step ``completed``: make that step durable on the most durable level before
        exiting, staging it first (on the fastest level) when no level was due at it."""
        if self.newest_saved != completed:
            self.manager.save(completed, self.tensors, self._extra(completed), levels=[self.levels[0].name])
            self.newest_saved = completed
        return self.manager.emergency_save()

    def close(self) -> None:
        self.manager.close()

    # ------------------------------------------------------------------------------------------------- resume

    def restore(self) -> Restored | None:
        """Load the newest valid checkpoint into the live tensors (resharded to this world size), or None; then
        prepare the first save's staging on the persist thread while training starts (CheckpointManager.prepare:
        without it the first save faults a new copy of the state in while the loop waits). Collective."""
        restored = self._load_newest()
        self.manager.prepare(self.tensors)
        return restored

    def _load_newest(self) -> Restored | None:
        t = self.trainer
        if not t.cfg.checkpoint.resume or not t.any_rank(self.manager.latest() is not None):
            return None  # a fresh run: no rank sees any committed checkpoint
        res = self.manager.load(self.tensors)
        self.manager.discard_after(res.step)  # later copies some nodes still hold are from the abandoned trajectory
        extra = res.extra
        if extra["global_batch"] != t.cfg.train.global_batch:
            raise CheckpointError(
                f"{res.path} was saved with train.global_batch={extra['global_batch']} but the "
                f"config says {t.cfg.train.global_batch}; the data cursor depends on it: use the "
                f"same train.global_batch to resume"
            )
        step = extra["step"]
        t.engine.after_load(step)  # AdamW step counters; ZeRO: refresh working params from the fp32 masters
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(extra["torch_rng"])), dtype=torch.uint8))
        t.state.step, t.state.tokens = step, extra["tokens"]
        lost = max(t.last_logged_step() - step, 0) if t.is_main else 0
        counters = t.state.counters
        for key, value in extra.get("counters", {}).items():
            setattr(counters, key, value)
        counters.restarts += 1
        counters.membership_changes += int(extra["world_size"] != t.world.world_size)
        counters.steps_lost += lost
        restored = Restored(
            step=step,
            level=res.level,
            path=res.path,
            seconds=res.seconds,
            saved_world_size=extra["world_size"],
            steps_lost=lost,
        )
        t.log.step = step
        t.log.info(
            f"restored step {step} from {res.level} ({res.path}) in {res.seconds:.2f} s; world "
            f"{restored.saved_world_size} -> {t.world.world_size}, cursor {extra['cursor']}"
            + (f"; skipped {res.fallbacks}" if res.fallbacks else "")
        )
        t.jsonl.write(
            "resume",
            step=step,
            level=res.level,
            seconds=round(res.seconds, 3),
            world_size=t.world.world_size,
            saved_world_size=restored.saved_world_size,
            restarts=t.world.restart_count,
            steps_lost=lost,
            fallbacks=res.fallbacks,
            process_started=float(os.environ.get(PROCESS_STARTED_ENV, time.time())),
        )
        return restored
