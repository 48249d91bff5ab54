"""A survivor keeps the work it already did: this replica's own part of a step whose attempt was discarded.

A replica keeps its local (not yet reduced) gradient and loss sum of the step in flight, with the attempt's
membership (replica ids in quorum-rank order) and which samples each member's gradient holds. The gradient is the
parameters' ``.grad`` itself (the all-reduce reduces a flat copy), so keeping it costs no copy and no memory.
When the attempt is discarded (a member died mid-step) and the next quorum retries the same step:

* the new members are a subset of the attempt's members (by replica id: a restarted replica has a new id), nobody
  healed, and every member holds a kept gradient of this step from the same attempt (one tiny all-reduce decides
  it, so all members agree; it runs only when the quorum id changed): each member adds to its kept gradient only
  the departed members' samples, split over the new members by ``elastic.batch.orphan_shares``; the same members
  again (a transient error) compute nothing and just redo the all-reduce;
* otherwise: the whole step is computed again with the new quorum's ``rank_batch`` split (as without reuse).

The global batch stays exact: every sample of the step is in exactly one member's gradient (sums in another
order than a full recomputation, so equal within float tolerance, not bit for bit).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from elastic.batch import Ranges, SampleShare, covered_after, orphan_shares, rank_ranges


def replica_of(member: str) -> int:
    """The fixed replica index in a torchft replica id (``replica-0001:<uuid>`` -> 1)."""
    return int(member.split(":", 1)[0].rsplit("-", 1)[1])


class QuorumRecorder:
    """torchft's Manager keeps only parts of each quorum's result; this wraps its ManagerClient (``_quorum`` is
    the call the Manager makes for every quorum) to keep the whole ``QuorumResult``, whose ``replica_ids`` are the
    members in quorum-rank order. Every other call goes to the client unchanged."""

    def __init__(self, client):
        self._client = client
        self.last = None

    def _quorum(self, *args, **kwargs):
        self.last = None
        result = self._client._quorum(*args, **kwargs)
        self.last = result
        return result

    def __getattr__(self, name):
        return getattr(self._client, name)


@dataclass
class Attempt:
    """The kept attempt of one step: whose, and which samples each member's gradient holds."""

    step: int
    quorum_id: int
    members: tuple[str, ...]
    """The attempt's members (replica ids), in quorum-rank order."""
    covered: list[Ranges]
    """Samples each member's gradient holds (rank order): this replica's is covered[members.index(own id)]."""
    loss_sum: float
    """This replica's summed per-sequence loss over its covered samples."""


@dataclass(frozen=True)
class Retry:
    """What this replica computes in a retry that reuses its kept part."""

    orphans: SampleShare
    """The departed members' samples this replica computes."""
    covered: list[Ranges]
    """Samples each new member's gradient holds after the retry."""
    kept_samples: int
    """Samples this replica's kept gradient already holds."""
    departed: tuple[int, ...]
    """Fixed indices of the replicas whose samples are orphaned."""


class PartialStep:
    """The attempt whose local gradient the parameters' ``.grad`` still hold.

    No copy is made: the all-reduce works on a flat concatenation of the gradients (``ReplicaStepper``), so a
    discarded attempt leaves each ``.grad`` as this replica's local gradient, and a retry accumulates the orphaned
    samples' gradients onto it (autograd adds into ``.grad``) instead of zeroing it first. The extra memory is
    nothing beyond the gradients the step holds anyway; a committed step or a heal forgets the attempt."""

    def __init__(self):
        self.attempt: Attempt | None = None

    def keep_full(self, step: int, quorum_id: int, members: tuple[str, ...], global_batch: int, loss: float) -> None:
        """A whole-share attempt (the ``rank_batch`` split of this quorum) is in the gradients."""
        self.attempt = Attempt(step, quorum_id, members, rank_ranges(step, global_batch, len(members)), loss)

    def candidate(
        self, step: int, members: tuple[str, ...], own_id: str, healed: bool, global_batch: int, micro_batch: int
    ) -> Retry | None:
        """This replica's own view: can the retry of ``step`` by ``members`` (this replica is ``own_id``) reuse
        the kept attempt? All members must agree before acting on it: ``ReplicaStepper`` all-reduces the answer."""
        kept = self.attempt
        if healed or kept is None or kept.step != step or not set(members) <= set(kept.members):
            return None
        shares = orphan_shares(step, global_batch, micro_batch, kept.members, members, kept.covered)
        own = kept.covered[kept.members.index(own_id)]
        return Retry(
            orphans=shares[members.index(own_id)],
            covered=covered_after(kept.members, members, kept.covered, shares),
            kept_samples=sum(count for _, count in own),
            departed=tuple(replica_of(m) for m in kept.members if m not in members),
        )

    def add_retry(self, step: int, quorum_id: int, members: tuple[str, ...], retry: Retry, loss: float) -> float:
        """The orphans' gradients were added: the gradients now hold the retry's coverage (kept for a further
        retry should this one be discarded too). Returns this replica's loss sum over all of it."""
        assert self.attempt is not None
        self.attempt = Attempt(step, quorum_id, members, retry.covered, self.attempt.loss_sum + loss)
        return self.attempt.loss_sum

    def drop(self) -> None:
        """The gradients no longer hold the attempt (its step committed, or the state was replaced)."""
        self.attempt = None


@dataclass
class EarlyOrphans:
    """Orphaned samples computed while the quorum formed (``ReuseSteps._quorum_computing_orphans``)."""

    orphans: SampleShare
    loss: float
    """Their summed per-sequence loss."""
    saved: torch.Tensor
    """A flat copy of the gradients the discarded attempt left: added back if the retry uses the early orphans,
    put back in ``.grad`` otherwise."""
    seconds: float
    """Their forward/backward time."""


class ReuseSteps:
    """The reuse half of ``ReplicaStepper`` (mixed into it): orphans computed while the quorum forms, the vote and a
    retry's compute. Uses the stepper's trainer ``t``, ``partial``, ``params``, quorum (``members``, ``own_id``,
    ``rank``, ``size``, ``quorum_id``, ``quorum_changed``, ``heal``), ``manager``, ``log``, ``index``,
    ``_all_reduce``, ``_flat_grad``, ``_quorum`` and ``heal_lock``."""

    def _quorum_computing_orphans(self, step: int, after_discard: bool) -> EarlyOrphans | None:
        """Run the quorum while computing the likely orphans, or return None (without a quorum) if that does not
        apply. After a discarded attempt of two members the likely next quorum is this replica alone (the other
        died); forming it waits for the dead replica's heartbeats to expire, so the other's samples are computed
        during that wait instead of after it. The quorum runs on a helper thread (torchft's quorum call releases
        the GIL); a heal in it waits for ``heal_lock`` so that it never changes parameters under a backward pass.
        Costs one gradient copy, only here. If the quorum is not this replica alone, the work is dropped."""
        kept = self.partial.attempt if self.partial else None
        if not after_discard or kept is None or kept.step != step or step == 0 or len(kept.members) != 2:
            return None
        cfg = self.t.cfg.train
        alone = (self.own_id,)
        (orphans,) = orphan_shares(step, cfg.global_batch, cfg.micro_batch, kept.members, alone, kept.covered)
        saved = self._flat_grad()
        self.t.engine.zero_grad()
        with ThreadPoolExecutor(1, thread_name_prefix="ecpt-quorum") as pool:
            with self.heal_lock:
                quorum = pool.submit(self._quorum)
                started = time.perf_counter()
                loss = self.t.forward_backward_share(step, orphans)
                seconds = time.perf_counter() - started
            quorum.result()  # re-raises what the quorum raised
        return EarlyOrphans(orphans, loss, saved, seconds)

    def _settle_early(self, step: int, early: EarlyOrphans | None, retry: Retry | None) -> EarlyOrphans | None:
        """Right after the vote, so that ``.grad`` and the kept attempt agree whatever happens next: if the agreed
        retry computes exactly the early orphans, the saved gradients are added to theirs and the attempt now holds
        both (returns ``early``); otherwise the saved gradients go back into ``.grad`` (unless a heal replaced the
        state: then nothing is kept) and None."""
        if early is None:
            return None
        if retry is not None and retry.orphans.ranges == early.orphans.ranges:
            self._set_grads(early.saved, add=True)
            self.partial.add_retry(step, self.quorum_id, self.members, retry, early.loss)
            return early
        if self.partial.attempt is not None:
            self._set_grads(early.saved)
        return None

    def _set_grads(self, flat: torch.Tensor, add: bool = False) -> None:
        """Each parameter's ``.grad`` from its slice of ``flat`` (a copy), or plus it with ``add``."""
        offset = 0
        for p in self.params:
            part = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if add and p.grad is not None:
                p.grad += part
            else:
                p.grad = part.clone()

    def _agreed_retry(self, step: int) -> Retry | None:
        """Whether this attempt reuses the kept part of a discarded attempt of ``step``, the same answer on every
        member: each says whether it could (``PartialStep.candidate``) and with which kept attempt's quorum id,
        one tiny SUM all-reduce of [can, id, id^2] follows, and reuse applies only if every member can and all
        ids are equal (sum n*id and sum of squares n*id^2 hold only if they are).

        Whether the vote runs must be the same on every member too: it runs in quorums of two or more whose id
        differs from the previous quorum's. The coordinator keeps the id when the members are the same and none
        reported a failed commit (torchft's Lighthouse), so all members see the id change or all see it stay; a
        member holding a discarded attempt of its current step failed its last commit, so it always sees a new
        id. The steady state (same members, commits succeed) pays no extra collective."""
        if self.partial is None:
            return None
        cfg = self.t.cfg.train
        mine = self.partial.candidate(
            step, self.members, self.members[self.rank], self.heal is not None, cfg.global_batch, cfg.micro_batch
        )
        if self.size == 1:
            return mine
        if not self.quorum_changed:
            return None
        qid = float(self.partial.attempt.quorum_id) if mine is not None else 0.0
        votes = torch.tensor([1.0 if mine is not None else 0.0, qid, qid * qid], dtype=torch.float64)
        self._all_reduce(votes)
        n = self.size
        agreed = votes[0] == n and votes[1] == n * qid and votes[2] == n * qid * qid
        return mine if agreed and not self.manager.errored() else None

    def _compute_retry(self, step: int, retry: Retry, early: EarlyOrphans | None) -> tuple[torch.Tensor, float, int]:
        """A retry: the orphaned samples only, added onto the gradients the discarded attempt left in ``.grad``
        (no zeroing), or those gradients added onto the early orphans'; the local gradient (flat), loss sum and
        samples computed after the quorum."""
        t = self.t
        orphans = retry.orphans
        departed = ", ".join(map(str, retry.departed)) or "none (same members)"
        when = f" while the quorum formed ({early.seconds:.2f} s)" if early else ""
        self.log.info(
            f"step {step}: reused own share ({retry.kept_samples} samples), computed {orphans.count} orphaned "
            f"samples of replica {departed}{when}; quorum {self.quorum_id}, rank {self.rank} of {self.size}"
        )
        t.jsonl.write_event(
            "reuse",
            step=step,
            replica=self.index,
            reused_samples=retry.kept_samples,
            orphaned_samples=orphans.count,
            early=early is not None,
            departed=list(retry.departed),
            quorum_id=self.quorum_id,
        )
        if early is not None:  # already in .grad and in the kept attempt (_settle_early)
            return self._flat_grad(), self.partial.attempt.loss_sum, 0
        loss = t.forward_backward_share(step, orphans) if orphans.count else 0.0
        local_loss = self.partial.add_retry(step, self.quorum_id, self.members, retry, loss)
        return self._flat_grad(), local_loss, orphans.count
