"""One replica of a replicas-mode job: the torchft Manager, and one optimizer step under a per-step quorum.

The protocol (quorum -> split -> SUM all-reduce -> commit vote -> leader-only checkpoint) is described in
``elastic/ft/__init__.py``; this file carries it out. The trainer calls ``ReplicaStepper.train_step`` in place of
its own step when ``launch.fault_tolerance = "replicas"``.

Joining. A replica starts at step 0 and asks for a quorum without reading anything from disk:
* a live peer is ahead (the quorum's newest step > 0): torchft heals this replica from it before the step;
* nobody in the quorum has progress (every member at step 0): the whole job (re)started. The members agree on
  that with a one-element all-reduce, those that just started restore their newest checkpoint (L0/L1, as the
  restart mode does), and the attempt is skipped; the next quorum then heals every member that restored an older
  step from the one that restored the newest. A fresh run restores nothing and trains from step 0.

Checkpoints. Every replica has its own CheckpointManager over a world of one (its own L0 directory, named after
the replica) and only the rank-0 replica of the quorum that committed a step saves it. All committed replicas
hold the same full state, so that one save is a complete checkpoint, the writers of any step are one process
(they agree on membership trivially) and no checkpoint collective spans replicas whose membership can change.
A new leader after a failure continues with the next due step; a save the old leader did not finish never
commits and never touches an older checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from elastic.batch import rank_batch, rank_ranges
from elastic.ft.metrics import ReplicaMetrics
from elastic.ft.overlap import OverlappedReduce
from elastic.ft.partial import EarlyOrphans, PartialStep, QuorumRecorder, Retry, ReuseSteps
from elastic.ft.peers import ProgressMark, advertised_process_group, lighthouse_address, replica_index
from elastic.ft.state import HealRecord, apply_healing_state, healing_state
from elastic.ft.transport import SafeHTTPTransport
from elastic.process_env import SHARED_MACHINE_ENV, advertise_host

HEARTBEAT_INTERVAL = timedelta(milliseconds=100)
START_POLL_SECONDS = 0.1
"""While a fresh run waits for its replicas to start: pause between quorums (each forms at once)."""


class StaleReplicaError(RuntimeError):
    """This replica's state is behind the run and no live peer can heal it."""


class ReplicaStepper(ReuseSteps):
    def __init__(self, trainer, registry=None):
        from torchft.manager import Manager

        self.t = trainer
        launch = trainer.cfg.launch
        self.index = replica_index()
        self.log = trainer.log
        # torchft logs every quorum and commit at INFO; ours are the lines a person follows
        for name in ("torchft", "torchft_quorums", "torchft_commits"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # warned at every reconfiguration on CPU, where there is no NCCL flight recorder to reset
        logging.getLogger("torchft.manager").addFilter(lambda r: "flight recorder" not in r.getMessage())
        timeout = timedelta(seconds=launch.ft_timeout_s)
        # the replica group's own store (a group of one worker: torchrun's store is not shared with workers); the
        # cross-replica process group meets on the quorum leader's, so peers on other nodes reach it at `host`
        host = advertise_host()
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        self.tensors = trainer.checkpoints.tensors if trainer.checkpoints else trainer.engine.checkpoint_tensors()
        self.params = [p for p in trainer.model.parameters()]
        bucket_bytes = int(launch.ft_bucket_mb * 2**20)
        self.overlap = OverlappedReduce(self.params, self._start_all_reduce, bucket_bytes) if bucket_bytes else None
        self.metrics = ReplicaMetrics(registry, self.index)
        self.heal: HealRecord | None = None
        self.heals: list[HealRecord] = []
        self.discarded = 0
        self.joined = False
        self.start_deadline = time.monotonic() + launch.ft_start_timeout_s
        self.quorum_started = 0.0
        self.manager = Manager(
            pg=advertised_process_group(timeout, host),
            load_state_dict=self._load_peer_state,
            state_dict=lambda: healing_state(self.t, self.tensors, self.index),
            min_replica_size=launch.min_replicas,
            use_async_quorum=False,  # the split needs the quorum before the forward pass; heals eagerly
            timeout=timeout,
            quorum_timeout=timedelta(seconds=launch.ft_quorum_timeout_s),
            connect_timeout=timedelta(seconds=launch.ft_connect_timeout_s),
            rank=0,
            world_size=1,
            store_addr=host,
            store_port=self.store.port,
            hostname=host,
            lighthouse_addr=lighthouse_address(trainer.cfg),
            replica_id=f"replica-{self.index:04d}",  # the quorum orders replicas by id: fixed-width sorts by index
            heartbeat_interval=HEARTBEAT_INTERVAL,
            checkpoint_transport=SafeHTTPTransport(host, timeout=timeout, num_chunks=0),
            init_sync=False,  # every replica initialises identically from train.seed
        )
        # the quorum's members by replica id (QuorumResult.replica_ids), which the Manager does not keep: wrap the
        # client it asks for every quorum (a private attribute of the pinned torchft; there is no hook)
        self.quorums = QuorumRecorder(self.manager._client)
        self.manager._client = self.quorums
        self.members: tuple[str, ...] = ()
        self.own_id = ""
        self.just_discarded = False
        self.heal_lock = threading.Lock()  # a heal waits for orphans computed while the quorum forms
        self.partial = PartialStep() if launch.ft_reuse_partial_step else None
        self.rank, self.size, self.quorum_id = 0, 1, -1
        self.quorum_changed = False
        self.progress = ProgressMark(Path(trainer.run_dir) / "replicas" / "progress.json")
        self.finished_elsewhere = False
        sharing = int(os.environ.get(SHARED_MACHINE_ENV) or 0)
        if sharing:
            # replicas on one machine: its cores divided among them, once (each one-worker replica would otherwise
            # take all cores: 2 replicas on 2 cores ran 3-9 s steps instead of ~1 s here). Not resized when the
            # quorum shrinks: a survivor switched to 2 threads mid-run measured 6 s steps, unexplained.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // sharing))

    # ------------------------------------------------------------------------------------------------ healing

    def _load_peer_state(self, state: dict) -> None:
        """torchft's callback on the healing replica, before the step it joins (synchronous quorum)."""
        with self.heal_lock:
            self.heal = apply_healing_state(self.t, self.tensors, state, self.quorum_started)
            if self.partial:
                self.partial.drop()  # kept gradients were computed on the state just replaced
        self.heals.append(self.heal)

    # ------------------------------------------------------------------------------------------------ one step

    def _quorum(self) -> None:
        self.quorum_started = time.perf_counter()
        self.heal = None
        try:
            self.manager.start_quorum()  # raises when no quorum forms in launch.ft_quorum_timeout_s
        except (RuntimeError, TimeoutError) as e:
            launch = self.t.cfg.launch
            raise RuntimeError(
                f"replica {self.index}: no quorum from the coordinator at {lighthouse_address(self.t.cfg)} within "
                f"launch.ft_quorum_timeout_s ({launch.ft_quorum_timeout_s:g} s; launch.min_replicas "
                f"{launch.min_replicas}): is `ecpt lighthouse` running there and reachable from this node? ({e})"
            ) from e
        rank = self.manager.participating_rank()
        if rank is None:
            raise RuntimeError("this replica is not a participant of its quorum (torchft spare mode is not used)")
        self.rank, self.size = rank, self.manager.num_participants()
        self.members = self._members() if self.partial else ()
        self.own_id = self.members[self.rank] if self.members else ""
        previous_quorum, self.quorum_id = self.quorum_id, self.manager._quorum_id  # torchft has no public getter
        self.quorum_changed = self.quorum_id != previous_quorum
        if self.heal is None and self.joined and self.quorum_id != previous_quorum:
            self._refuse_if_stale()
        self.t.is_main = self.rank == 0
        self.metrics.on_quorum(self.quorum_id, self.size)
        if self.heal is not None:
            self.metrics.on_heal(self.heal.seconds)
            self.log.step = self.heal.step
            self.log.info(
                f"healed from live peer replica {self.heal.source_replica}: step {self.heal.step} in "
                f"{self.heal.seconds:.2f} s, read nothing from disk; quorum {self.quorum_id}, rank {self.rank} of "
                f"{self.size}"
            )
            self.t.jsonl.write_event(
                "heal",
                step=self.heal.step,
                replica=self.index,
                source_replica=self.heal.source_replica,
                seconds=round(self.heal.seconds, 3),
            )

    def _members(self) -> tuple[str, ...]:
        """The quorum's replica ids in quorum-rank order (``replica-0001:<uuid>``: a restarted replica has a new
        id), checked against this replica's own rank and the quorum size."""
        result = self.quorums.last
        members = tuple(result.replica_ids) if result is not None else ()
        own = members[self.rank] if self.rank < len(members) else ""
        if len(members) != self.size or not own.startswith(f"replica-{self.index:04d}:"):
            raise RuntimeError(
                f"torchft's quorum result does not list this replica at its rank: replica_ids {members}, rank "
                f"{self.rank} of {self.size}; set launch.ft_reuse_partial_step = false if this torchft differs "
                f"from the pinned one"
            )
        return members

    def _refuse_if_stale(self) -> None:
        """A replica that was away (frozen, cut off) and finds no peer ahead of it in its new quorum may still be
        behind the run: the peers that went on may have finished, or be cut off from it. The quorum leaders'
        progress mark says how far the run got; a replica behind it never trains on with its stale state."""
        reached = self.progress.read()
        step = self.t.state.step
        if reached <= step:
            return
        if reached >= self.t.total_steps:
            self.log.warning(
                f"refusing stale state: the run finished at step {reached} while this replica was away at step "
                f"{step}; leaving without training or saving"
            )
            self.finished_elsewhere = True
            return
        raise StaleReplicaError(
            f"refusing stale state: this replica is at step {step} but the run reached step {reached} and no live "
            f"peer in quorum {self.quorum_id} is that far; exiting so the agent restarts this replica, which then "
            f"heals from a live peer or restores the newest checkpoint"
        )

    def _start_all_reduce(self, tensor: torch.Tensor):
        """Start a SUM over the quorum in place; its work. A failure is recorded by the manager and fails the
        commit vote, and every later all-reduce of the attempt is a no-op."""
        return self.manager.allreduce(tensor, reduce_op=dist.ReduceOp.SUM)

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        """SUM over the quorum in place, waiting for it."""
        self._start_all_reduce(tensor).wait()

    def _fresh_start(self) -> bool:
        """At step 0 (after the quorum): skip this attempt because the job may have (re)started?

        After the quorum either every member is at step 0 (the quorum's newest step is 0) or none is (members
        behind healed), so all members take this branch together and run the same small all-reduce of two flags:
        a member joins for the first time (it restores its newest checkpoint from disk, since no live peer has
        progress), and a member still waits for the other replicas to start (up to launch.ft_start_timeout_s
        after its own start, so a fresh run starts with every replica rather than with whichever came up first).
        Any flag set on any member: every member skips the attempt, together."""
        if self.t.state.step != 0:
            self.joined = True
            return False
        waiting = self.size < self.t.cfg.launch.replica_groups and time.monotonic() < self.start_deadline
        flags = torch.tensor([0.0 if self.joined else 1.0, 1.0 if waiting else 0.0], dtype=torch.float64)
        self._all_reduce(flags)
        if self.manager.errored():
            return True  # retry with the next quorum
        if not flags.any():
            return False  # everyone is here, nobody new, nobody has progress: train from step 0
        first_join, self.joined = not self.joined, True
        if first_join and self.progress.read() >= self.t.total_steps:
            self.log.warning(
                f"the run already reached step {self.progress.read()} of {self.t.total_steps} (progress mark): "
                f"nothing to train; leaving without restoring or saving"
            )
            self.finished_elsewhere = True
            return True
        restored = self.t.checkpoints.restore() if first_join and self.t.checkpoints is not None else None
        if first_join:
            # the run (re)starts from here: a mark an earlier incarnation left must not call this replica stale
            self.progress.write(restored.step if restored else 0)
        if restored is not None:
            if self.partial:
                self.partial.drop()
            self.manager.load_state_dict({"step": restored.step, "batches_committed": 0})
            self.log.warning(
                f"no live peer has progress: fell back to checkpoints, restored step {restored.step} from "
                f"{restored.level}; the next quorum heals any replica that restored an older step"
            )
            self.t.jsonl.write_event("fallback", step=restored.step, level=restored.level, replica=self.index)
        if flags[1] > 0:
            time.sleep(START_POLL_SECONDS)  # a quorum of the members present forms at once: do not spin
        return True

    def _flat_grad(self) -> torch.Tensor:
        """This replica's local gradients as one flat tensor (one all-reduce for all of them)."""
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])

    def _discard(self, step: int) -> None:
        """No update applied: the same step runs again with the next quorum (kept parts stay for it)."""
        self.discarded += 1
        self.just_discarded = True
        self.metrics.on_discard()
        self.t.state.counters.steps_lost += 1
        reason = self.manager.errored()
        self.log.warning(
            f"step {step} discarded, no update applied (quorum {self.quorum_id}, {self.size} replicas): "
            f"{str(reason).splitlines()[0] if reason else 'too few replicas'}"
        )
        self.t.jsonl.write_event(
            "discard", step=step, replica=self.index, quorum_id=self.quorum_id, quorum_size=self.size
        )
        if reason:
            # Tear this replica's side of the failed group down now: a survivor blocked in the collective on this
            # one rather than on the dead replica (3+ replicas: gloo's algorithms do not pair every member with
            # every other) fails at once instead of after launch.ft_timeout_s, and asks for the next quorum with
            # us (measured: a survivor of 3 waited 1.4 s, until the next quorum rebuilt the group here). The next
            # quorum always rebuilds it: the failed commit makes the coordinator issue a new quorum id.
            self.manager._pg.abort()

    def _compute(self, step: int, retry: Retry | None, early: EarlyOrphans | None) -> tuple[torch.Tensor, float, int]:
        """This attempt's local gradient (flat: the all-reduce reduces this copy in place and leaves ``.grad``
        alone) and loss sum, and how many samples it computed now. Whole share: ``rank_batch`` of this quorum,
        from zeroed gradients; a retry: ``ReuseSteps._compute_retry``."""
        if retry is not None:
            return self._compute_retry(step, retry, early)
        t, g = self.t, self.t.cfg.train.global_batch
        t.engine.zero_grad()
        share = rank_batch(step, g, t.cfg.train.micro_batch, self.rank, self.size)
        if self.overlap and share.micro_batches:
            self.overlap.arm(len(share.micro_batches))  # buckets start reducing during the last backward
        local_loss = t.forward_backward_share(step, share)
        if self.partial and self.size > 1:  # alone, no member can leave: nothing to keep for
            self.partial.keep_full(step, self.quorum_id, self.members, g, local_loss)
        elif self.partial:
            self.partial.drop()
        flat = self.overlap.flat if self.overlap and self.overlap.in_flight else self._flat_grad()
        return flat, local_loss, share.count

    def _reduce_gradients(self, flat: torch.Tensor) -> None:
        """SUM ``flat`` over the quorum: complete the buckets the backward started, or all-reduce it whole."""
        if self.overlap and self.overlap.in_flight:
            self.overlap.complete()
        else:
            self._all_reduce(flat)

    def train_step(self, step: int):
        """Run step ``state.step`` with the current quorum; the StepResult, or None when the attempt was
        discarded (the same step then runs again with the next quorum)."""
        from elastic.trainer import StepResult

        t = self.t
        timing = bool(os.environ.get("ECPT_FT_TIMING"))
        started = time.perf_counter()
        after_discard, self.just_discarded = self.just_discarded, False
        early = self._quorum_computing_orphans(step, after_discard)  # None: it ran no quorum
        if early is None:
            self._quorum()
        if self.finished_elsewhere:
            return None
        t_quorum = time.perf_counter()
        if self._fresh_start():
            return None
        step = t.state.step  # a heal may have moved it
        if self.manager.current_step() != step:
            raise RuntimeError(f"torchft is at step {self.manager.current_step()} but the trainer at {step}")
        g = t.cfg.train.global_batch
        retry = self._agreed_retry(step)
        early = self._settle_early(step, early, retry)
        t_vote = time.perf_counter()
        if self.manager.errored():  # a member left between the quorum and the vote: nothing computed yet
            self.manager.should_commit()  # false; counts the failed commit, so the next quorum gets a new id
            self._discard(step)
            return None
        flat, local_loss, computed = self._compute(step, retry, early)
        if t.faults:
            t.faults.mid_step(step)  # "kill rank R during step S": every member has computed its share
        loss_stop = torch.tensor([local_loss, 1.0 if t.stop_signal is not None else 0.0], dtype=torch.float64)
        t_fb = time.perf_counter()
        self._reduce_gradients(flat)
        self._all_reduce(loss_stop)
        t_ar = time.perf_counter()
        committed = self.manager.should_commit()
        t_commit = time.perf_counter()
        if not committed:
            self._discard(step)
            return None
        kept = self.partial.attempt if self.partial else None
        covered = kept.covered[self.rank] if kept is not None else rank_ranges(step, g, self.size)[self.rank]
        if self.partial:
            self.partial.drop()
        self._set_grads(flat)  # the reduced gradients
        lr = t.lr_for(step)
        t.engine.step(lr, t.checkpoints.before_optimizer_step if t.checkpoints else lambda: None)
        t_update = time.perf_counter()
        t.state.step = step + 1
        t.state.tokens += g * t.cfg.model.seq_len
        self.metrics.on_commit()
        if self.rank == 0:
            self.progress.write(step + 1)
            if t.checkpoints:
                t.checkpoints.after_optimizer_step(step + 1)
        t.log_committed_share(step, covered, self.size, self.quorum_id)
        if timing:
            self.log.info(
                f"timing: step {step}: quorum {t_quorum - started:.3f} s, vote {t_vote - t_quorum:.3f} s, "
                f"forward/backward {t_fb - t_vote:.3f} s ({computed} samples), all-reduce {t_ar - t_fb:.3f} s, "
                f"commit {t_commit - t_ar:.3f} s, update {t_update - t_commit:.3f} s, "
                f"record {time.perf_counter() - t_update:.3f} s"
            )
        return StepResult(
            step=step,
            loss=float(loss_stop[0]) / g,
            lr=lr,
            seconds=time.perf_counter() - started,
            phase=t.plan.phase_of(step),
            stop=bool(loss_stop[1] > 0),
        )

    def state_digest(self) -> str:
        """sha256 over every tensor of the training state (parameters and AdamW moments), in name order."""
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            h.update(name.encode())
            h.update(self.tensors[name].detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def close(self) -> None:
        """Record where this replica ended (``<run_dir>/replicas/replica-<i>.json``: step and state digest, so
        replicas can be compared) and leave the quorum."""
        self.manager.shutdown(wait=False)
        if self.finished_elsewhere:
            return  # this replica's state is stale: it is no end state of the run
        path = Path(self.t.run_dir) / "replicas" / f"replica-{self.index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        row = {"replica": self.index, "step": self.t.state.step, "digest": self.state_digest()}
        row |= {"heals": [vars(h) for h in self.heals], "discarded": self.discarded}
        path.write_text(json.dumps(row))
