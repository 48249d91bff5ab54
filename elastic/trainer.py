"""The training loop: global-batch invariant, sample-exact cursor, phases, evaluation, metrics, checkpoints.

One optimizer step:
    for each micro-batch of this rank's share:      loss = sum(per-sequence losses) / global_batch; backward
    gradients are SUM-reduced across ranks          -> the mean gradient over the global batch, for any world size
    clip, set lr(step), wait for the previous checkpoint's snapshot, optimizer.step(), then save(step) lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from checkpointing import CheckpointError, list_checkpoints
from elastic.batch import rank_batch
from elastic.checkpoints import TrainerCheckpoints, checkpoint_levels
from elastic.config import Config
from elastic.data import Corpus
from elastic.engines import build_engine
from elastic.fault_plan import parse_plan
from elastic.faults import FaultInjector
from elastic.metrics import JsonlLog, WorkerMetrics, read_jsonl
from elastic.model import build_model, count_parameters
from elastic.schedule import lr_at
from elastic.process_env import node_id
from elastic.watchdog import Watchdog
from elastic.world import ProcessGroups, RankLogger, WorldInfo


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and other vectors are not decayed)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.schedule.lr_max, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, foreach=False
    )


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    seconds: float
    phase: int
    stop: bool = False
    """Some rank received SIGTERM/SIGUSR1: every rank leaves the loop after this step."""


@dataclass
class RunCounters:
    """Run-level counters carried in every checkpoint, so they continue across restarts and resizes."""

    restarts: int = 0
    """Resumes from a checkpoint (worker or node failure, preemption, membership change)."""
    membership_changes: int = 0
    """Resumes at a different world size than the checkpoint was saved at."""
    steps_lost: int = 0
    """Steps computed but not checkpointed before a failure, so computed again."""
    productive_seconds: float = 0.0
    """Wall time of the steps that the current trajectory kept."""
    started_unix: float = field(default_factory=time.time)
    """When this run first started (the first launch, not this process)."""

    def goodput(self) -> float:
        return self.productive_seconds / max(time.time() - self.started_unix, 1e-9)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainState:
    """Counters that a checkpoint carries besides tensors."""

    step: int = 0
    """Next optimizer step to run (= completed steps)."""
    tokens: int = 0
    """Global tokens consumed so far."""
    counters: RunCounters = field(default_factory=RunCounters)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        world: WorldInfo,
        groups: ProcessGroups,
        device: torch.device,
        metrics: WorkerMetrics | None = None,
        log: RankLogger | None = None,
    ):
        self.cfg, self.world, self.groups, self.device = cfg, world, groups, device
        self.log = log or RankLogger(logging.getLogger("ecpt"), world.rank)
        self.metrics = metrics
        self.run_dir = Path(cfg.train.run_dir)
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.is_main = world.rank == 0
        # replicas mode: every replica is rank 0 of its own job; it is named by its fixed replica index, and the
        # quorum's rank 0 of each step is the one that writes the run's logs and checkpoints (elastic/ft/)
        self.replica_mode = cfg.launch.fault_tolerance == "replicas"
        if self.replica_mode:
            from elastic.ft.peers import replica_index

            self.identity = replica_index()
            self.log.rank = self.identity
            self.is_main = self.identity == 0  # until the first quorum names its rank 0
        else:
            self.identity = world.rank
        self.corpus = Corpus(cfg, log=self.log.info)
        if self.is_main:
            for line in self.corpus.describe():
                self.log.info(line)
        self.plan = self.corpus.plan
        self.total_steps = min(self.plan.total_steps, cfg.train.max_steps or self.plan.total_steps)
        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank, whatever the world size
        # model.init: the Hugging Face weights are the step-0 state; a run that resumes from its own checkpoint
        # skips reading them (restore() overwrites every parameter or raises).
        resuming = bool(cfg.model.init) and self._will_resume()
        self.model = build_model(cfg.model, resuming=resuming).to(device)
        if resuming and self.is_main:
            self.log.info(f"{cfg.model.init}: weights not read, the run resumes from its own checkpoint")
        self.optimizer = build_optimizer(self.model, cfg)
        self.engine = build_engine(cfg, world, self.model, self.optimizer, device)
        self.state = TrainState()
        if metrics:
            metrics.track_run(self.state.counters)
        self.jsonl = JsonlLog(self.run_dir / "metrics.jsonl" if self.is_main or self.replica_mode else None)
        if self.replica_mode:
            from elastic.ft.logs import LeaderJsonl

            self.jsonl = LeaderJsonl(self.jsonl, lambda: self.is_main)
        self.samples_log = (
            open(self.run_dir / "samples" / f"rank-{self.identity}.jsonl", "a", buffering=1)
            if cfg.train.log_samples
            else None
        )
        self.stop_signal: int | None = None
        self.checkpoints = None
        if checkpoint_levels(cfg):
            self.checkpoints = TrainerCheckpoints(self, registry=metrics.registry if metrics else None)
        levels = [(Path(lv.root), lv.interval) for lv in checkpoint_levels(cfg)]
        self.faults = (
            FaultInjector(
                parse_plan(cfg.faults.plan),
                self.run_dir,
                self.identity,
                world.local_rank,
                node_id(),
                levels,
                self.log,
                freeze_stalls=self.replica_mode,
            )
            if cfg.faults.plan
            else None
        )
        self.watchdog = Watchdog(cfg.train.hang_timeout, self.log)
        self.replicas = None
        if self.replica_mode:
            from elastic.ft.replica import ReplicaStepper

            if self.faults:
                self.faults.hold_if_replacement()  # before the replica heartbeats to the coordinator

            self.replicas = ReplicaStepper(self, registry=metrics.registry if metrics else None)
        self.stop_after_eval: Callable[[int, dict[str, float]], bool] | None = None
        """Called after every evaluation with (completed steps, losses per domain); True ends the run at that step
        as if it were the last (the caller makes it durable). The losses are the same on every rank (all-reduced),
        so a pure function of them stops every rank at the same step."""

    def _will_resume(self) -> bool:
        """Whether ``TrainerCheckpoints.restore`` will load a checkpoint: the same condition it applies (resume on,
        some rank sees a committed checkpoint on one of the levels), decided before the model exists."""
        levels = checkpoint_levels(self.cfg)
        if not (levels and self.cfg.checkpoint.resume):
            return False
        return self.any_rank(any(list_checkpoints(level.root) for level in levels))

    # ----------------------------------------------------------------------------------------------------------
    # One optimizer step.

    def data_split(self) -> tuple[int, int]:
        """(this rank's position, how many share the step's global batch): the quorum's in replicas mode."""
        if self.replicas:
            return self.replicas.rank, self.replicas.size
        return self.world.rank, self.world.world_size

    def _forward_backward(self, step: int) -> float:
        """Run this rank's micro-batches of ``step``; returns this rank's summed per-sequence loss."""
        g = self.cfg.train.global_batch
        share = rank_batch(step, g, self.cfg.train.micro_batch, self.world.rank, self.world.world_size)
        return self.forward_backward_share(step, share)

    def forward_backward_share(self, step: int, share) -> float:
        """Run the micro-batches of ``share`` (a RankBatch of ``step``); the summed per-sequence loss."""
        g = self.cfg.train.global_batch
        if self.samples_log and not self.replicas:
            self.samples_log.write(
                json.dumps(
                    {
                        "step": step,
                        "start": share.start,
                        "count": share.count,
                        "world_size": self.world.world_size,
                        "time": time.time(),
                    }
                )
                + "\n"
            )
        batches = (
            torch.from_numpy(self.corpus.batch(first, size)[0]).to(self.device) for first, size in share.micro_batches
        )
        return self.engine.forward_backward(batches, len(share.micro_batches), g)

    def log_committed_share(self, step: int, ranges, size: int, quorum_id: int) -> None:
        """replicas mode: the samples a committed step's gradient holds from this replica, as (first, count)
        pieces (a retry that reused a discarded attempt's part holds several; discarded attempts trained nothing)."""
        if self.samples_log:
            row = {"step": step, "ranges": [list(r) for r in ranges], "count": sum(c for _, c in ranges)}
            row |= {"world_size": size, "quorum_id": quorum_id, "time": time.time()}
            self.samples_log.write(json.dumps(row) + "\n")

    def _reduce_loss_and_stop(self, local_sum: float) -> tuple[float, bool]:
        """Global-batch mean loss, and whether any rank was asked to stop, in one all-reduce.

        Ranks must leave the loop at the same step: a rank that stopped alone would leave the others blocked in
        the next step's all-reduce. Uses the training (default) group, never the checkpoint group, which the
        checkpoint thread uses concurrently.
        """
        stop = 1.0 if self.stop_signal is not None else 0.0
        if self.world.world_size == 1:
            return local_sum / self.cfg.train.global_batch, bool(stop)
        t = torch.tensor([local_sum, stop], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0]) / self.cfg.train.global_batch, bool(t[1] > 0)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if self.world.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def last_logged_step(self) -> int:
        """The last step this run's metrics log recorded (rank 0), to count steps lost to a restart."""
        path = self.run_dir / "metrics.jsonl"
        rows = read_jsonl(path, "step") if path.exists() else []
        return rows[-1]["step"] if rows else 0

    def lr_for(self, step: int) -> float:
        return lr_at(step, self.cfg.schedule, self.plan.starts, self.plan.total_steps)

    def train_step(self, step: int) -> StepResult | None:
        if self.replicas:  # None: the attempt was discarded; state.step tells which step runs next
            return self.replicas.train_step(step)
        start = time.perf_counter()
        self.engine.zero_grad()
        local_loss = self._forward_backward(step)
        if self.faults:
            self.faults.mid_step(step)
        lr = self.lr_for(step)
        # clip, set lr, wait for the previous checkpoint's snapshot (before params change), update
        self.engine.step(lr, self.checkpoints.before_optimizer_step if self.checkpoints else lambda: None)
        loss, stop = self._reduce_loss_and_stop(local_loss)
        self.state.step = step + 1
        self.state.tokens += self.cfg.train.global_batch * self.cfg.model.seq_len
        if self.checkpoints:
            self.checkpoints.after_optimizer_step(step + 1)
        return StepResult(
            step=step, loss=loss, lr=lr, seconds=time.perf_counter() - start, phase=self.plan.phase_of(step), stop=stop
        )

    # ----------------------------------------------------------------------------------------------------------
    # Evaluation.

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss per domain on fixed windows, split across ranks and summed, so it is world-size free."""
        self.model.eval()
        count = self.cfg.train.eval_batches * self.cfg.train.micro_batch
        share = rank_batch(0, count, self.cfg.train.micro_batch, self.world.rank, self.world.world_size)
        sums = []
        for domain in self.corpus.domains:
            windows = self.corpus.validation_windows(domain, count)
            total = 0.0
            for first, size in share.micro_batches:
                batch = torch.from_numpy(windows[first : first + size]).to(self.device)
                total += float(self.model.sequence_losses(batch).sum())
            sums.append(total)
        t = torch.tensor(sums, dtype=torch.float64, device=self.device)
        if self.world.world_size > 1:
            dist.all_reduce(t)
        self.model.train()
        return {d: float(v) / count for d, v in zip(self.corpus.domains, t.tolist())}

    def _should_eval(self, completed: int) -> bool:
        interval = self.cfg.train.eval_interval
        phase_end = completed in self.plan.starts[1:] or completed == self.total_steps
        return phase_end or (interval > 0 and completed % interval == 0)

    # ----------------------------------------------------------------------------------------------------------
    # The loop.

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1 (preemption, torchrun shutdown) stop the loop at the next step boundary."""

        def handler(signum, _frame):
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _progress(self):
        if not (self.is_main and self.cfg.train.progress):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.state.step,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
            desc="train",
        )

    @staticmethod
    def _logs_through(bar):
        """While the bar is open, console log lines go through ``tqdm.write``: it clears the bar, prints the line
        and redraws the bar below it, instead of the line landing in the middle of the bar's text."""
        if bar is None:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm(tqdm_class=type(bar))

    def _log_step(self, r: StepResult) -> None:
        tokens_step = self.cfg.train.global_batch * self.cfg.model.seq_len
        rank, size = self.data_split()
        if self.metrics:
            local_tokens = rank_batch(r.step, self.cfg.train.global_batch, 1, rank, size).count * self.cfg.model.seq_len
            self.metrics.on_step(r.step + 1, r.loss, r.lr, local_tokens, tokens_step, r.seconds, r.phase, size)
        if (r.step + 1) % self.cfg.train.log_interval == 0 or r.step + 1 == self.total_steps:
            self.jsonl.write(
                "step",
                step=r.step + 1,
                phase=r.phase,
                phase_name=self.plan.names[r.phase],
                loss=r.loss,
                lr=r.lr,
                seconds=round(r.seconds, 4),
                tokens=self.state.tokens,
                tokens_per_second=round(tokens_step / r.seconds, 1),
                world_size=size,
                cursor=self.state.step * self.cfg.train.global_batch,
            )

    def _log_eval(self, completed: int, losses: dict[str, float]) -> None:
        phase = self.plan.phase_of(completed - 1)
        phase_end = completed == self.plan.end_of(phase) or completed == self.total_steps
        if self.metrics:
            self.metrics.on_eval(losses)
        self.jsonl.write(
            "eval", step=completed, phase=phase, phase_name=self.plan.names[phase], phase_end=phase_end, losses=losses
        )
        if self.is_main and phase_end:
            text = "  ".join(f"{d} {v:.4f}" for d, v in losses.items())
            self.log.info(f"end of phase {phase} ({self.plan.names[phase]}): validation loss per domain: {text}")

    def resume(self, process_started: float) -> None:
        """Restore the newest valid checkpoint, if checkpointing is on and one exists; record the recovery."""
        if self.checkpoints is None or self.replicas:
            return  # replicas mode: the first quorum decides between a live peer and the disk (elastic/ft/)
        restored = self.checkpoints.restore()
        if restored is not None and self.metrics:
            self.metrics.on_recovered(time.perf_counter() - process_started, restored.steps_lost)

    def run(self) -> TrainState:
        self.log.step = self.state.step
        if self.is_main:
            self.log.info(
                f"model {count_parameters(self.model) / 1e6:.2f} M parameters, world size "
                f"{self.world.world_size}, {self.total_steps} steps in {len(self.plan.starts)} phases "
                f"{list(self.plan.names)}, global batch {self.cfg.train.global_batch} x "
                f"{self.cfg.model.seq_len} tokens"
            )
            self.jsonl.write(
                "start",
                step=self.state.step,
                world_size=self.world.world_size,
                restarts=self.world.restart_count,
                parameters=count_parameters(self.model),
            )
        bar = self._progress()
        try:
            with self._logs_through(bar):
                self._train_steps(bar)
        finally:
            self.watchdog.stop()
            if bar:
                bar.close()
        return self.state

    def _train_steps(self, bar) -> None:
        """The steps from the current one to the end (or a stop signal), then the final checkpoint flush."""
        self.watchdog.start()
        while self.state.step < self.total_steps:
            step = self.state.step
            self.log.step = step
            if self.faults:
                self.faults.at_step(step)
            r = self.train_step(step)
            if r is None:
                if self.replicas.finished_elsewhere:
                    break  # a stale replica whose peers already finished the run: nothing to train or save
                continue  # replicas mode: discarded attempt or heal; the loop resumes at state.step
            step = r.step
            self.state.counters.productive_seconds += r.seconds
            self.watchdog.progress()
            if not math.isfinite(r.loss):
                raise FloatingPointError(f"loss became {r.loss} at step {step}; lower schedule.lr_max")
            self._log_step(r)
            if bar:
                bar.set_postfix_str(
                    f"phase {self.plan.names[r.phase]} loss {r.loss:.3f} lr {r.lr:.2e} "
                    f"tok/s {self.cfg.train.global_batch * self.cfg.model.seq_len / r.seconds:,.0f}",
                    refresh=False,
                )
                bar.update(1)
            if r.stop:
                self._stop_for_signal()
                break
            if self._should_eval(step + 1):
                losses = self.evaluate()
                stop_here = self.stop_after_eval is not None and self.stop_after_eval(step + 1, losses)
                if stop_here:
                    self.total_steps = step + 1  # logged as the end of the run
                self._log_eval(step + 1, losses)
                self.watchdog.progress()
                if stop_here:
                    break
        if self.faults:
            self.faults.finish()
        # The watchdog guards step progress; the final flush may legitimately take longer than a step.
        self.watchdog.stop()
        self.flush_checkpoints()

    def flush_checkpoints(self) -> None:
        """Wait until every save is durable. A failed save (disk full, I/O error) is reported, not raised:
        training already continued past it on the older checkpoints, which a failure never touches, and an
        exception here would only make the agent restart and recompute. The launcher turns the recorded error
        into a non-zero exit once the job has ended."""
        if not self.checkpoints:
            return
        try:
            self.checkpoints.manager.wait_durable()
        except CheckpointError as exc:
            self.log.error(f"checkpoint saves failed; older checkpoints are intact: {exc}")
            self.jsonl.write("checkpoint_error", step=self.state.step, error=str(exc))

    def _stop_for_signal(self) -> None:
        """Every rank agreed to stop after this step: make this step durable, then leave the loop."""
        self.stop_signal = self.stop_signal or signal.SIGTERM  # a peer's signal counts as ours
        if self.checkpoints and (self.is_main or not self.replicas):  # replicas mode: the quorum leader only
            levels = self.checkpoints.emergency_save(self.state.step)
            self.log.info(
                f"stop requested: emergency checkpoint of step {self.state.step} "
                + (f"written to {levels}" if levels else "was already durable")
            )
        self.jsonl.write("stop", step=self.state.step, signal=int(self.stop_signal))

    def close(self) -> None:
        if self.replicas:
            self.replicas.close()
        if self.checkpoints:
            self.checkpoints.close()
        self.jsonl.close()
        if self.samples_log:
            self.samples_log.close()
