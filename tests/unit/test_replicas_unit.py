"""Replicas mode's pure parts: config validation, the fault grammar, the heal transport's no-pickle load, and the
progress mark a returning replica is checked against."""

from __future__ import annotations

import json
import pickle
from datetime import timedelta

import pytest
import torch

from elastic.config import ConfigError, load_config
from elastic.fault_plan import parse_plan
from elastic.ft.overlap import OverlappedReduce
from elastic.ft.peers import ProgressMark
from elastic.ft.transport import SafeHTTPTransport


def test_replicas_mode_is_opt_in_and_sized_from_the_workers():
    assert load_config(None, []).launch.fault_tolerance == "restart"
    cfg = load_config(None, ['launch.fault_tolerance="replicas"'])
    assert cfg.launch.replica_groups == cfg.launch.nproc_per_node * cfg.launch.max_nodes
    assert load_config(None, ['launch.fault_tolerance="replicas"', "launch.replicas=3"]).launch.replica_groups == 3


@pytest.mark.parametrize(
    "overrides,message",
    [
        (['launch.fault_tolerance="replicas"', 'train.engine="deepspeed"'], 'works with train.engine = "ddp" only'),
        (['launch.fault_tolerance="quorum"'], "launch.fault_tolerance must be one of"),
        (['launch.fault_tolerance="replicas"', "launch.replicas=2", "launch.min_replicas=3"], "launch.min_replicas"),
        (['launch.lighthouse="10.0.0.1:29510"'], "launch.lighthouse must be an http://"),
        (["launch.ft_timeout_s=0"], "launch.ft_timeout_s must be > 0"),
        (["launch.ft_bucket_mb=-1"], "launch.ft_bucket_mb must be >= 0"),
        (['launch.fault_tolerance="replicas"', "launch.replicas=17"], "train.global_batch (16) cannot be covered"),
    ],
)
def test_invalid_replicas_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_kill_coordinator_is_a_fault_sentence():
    (fault,) = parse_plan(["Kill coordinator at step 40"])
    assert (fault.kind, fault.step) == ("kill_coordinator", 40)
    assert parse_plan([fault.describe()])[0] == fault


def _round_trip(state: dict) -> dict:
    timeout = timedelta(seconds=10)
    sender = SafeHTTPTransport("127.0.0.1", timeout=timeout, num_chunks=0)
    receiver = SafeHTTPTransport("127.0.0.1", timeout=timeout, num_chunks=0)
    try:
        # the address names the host the launcher told it (ECPT_ADVERTISE_HOST), not this machine's hostname
        assert sender.metadata().startswith("http://127.0.0.1:"), sender.metadata()
        sender.send_checkpoint(dst_ranks=[1], step=7, state_dict=state, timeout=timeout)
        return receiver.recv_checkpoint(src_rank=0, metadata=sender.metadata(), step=7, timeout=timeout)
    finally:
        sender.shutdown(wait=False)
        receiver.shutdown(wait=False)


def test_heal_transport_carries_tensors_and_plain_values():
    state = {"tensors": {"model/w": torch.arange(6.0).reshape(2, 3)}, "step": 7, "counters": '{"restarts": 1}'}
    got = _round_trip(state)
    assert torch.equal(got["tensors"]["model/w"], state["tensors"]["model/w"])
    assert got["step"] == 7 and got["counters"] == state["counters"]


class Payload:
    """Stands for any object a malicious or buggy peer could pickle (its reduce could run code on load)."""

    def __reduce__(self):
        return (print, ("this ran on load",))


def test_heal_transport_refuses_pickled_objects():
    """A peer can send tensors, not code: anything the weights-only unpickler does not allow fails the heal."""
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        _round_trip({"step": 7, "payload": Payload()})


def test_progress_mark_round_trip(tmp_path):
    mark = ProgressMark(tmp_path / "replicas" / "progress.json")
    assert mark.read() == 0
    mark.write(12)
    assert mark.read() == 12


A, B, C = "replica-0000:aa", "replica-0001:bb", "replica-0002:cc"


@pytest.mark.parametrize(
    "step,members,own,healed,expected",
    [
        # step 4 of G=6 over 3 replicas: 24-25, 26-27, 28-29. Replica 1 left mid-step: its 2 samples go one each
        # to replicas 0 and 2; alone, replica 2 computes replicas 0's and 1's (adjacent: one piece)
        (4, (A, C), A, False, ("reuse", ((26, 1),), 2, (1,))),
        (4, (A, C), C, False, ("reuse", ((27, 1),), 2, (1,))),
        (4, (C,), C, False, ("reuse", ((24, 4),), 2, (0, 1))),
        # the same members again (a transient error): nothing to compute, just the all-reduce again
        (4, (A, B, C), B, False, ("reuse", (), 2, ())),
        # no reuse: another step, a healed member, a member that was not in the attempt (a restarted replica
        # has a new id), or nothing kept
        (5, (A, C), A, False, None),
        (4, (A, C), A, True, None),
        (4, (A, "replica-0001:new"), A, False, None),
    ],
)
def test_partial_step_reuses_only_a_discarded_attempt_of_the_same_step(step, members, own, healed, expected):
    from elastic.ft.partial import PartialStep

    partial = PartialStep()
    partial.keep_full(4, quorum_id=7, members=(A, B, C), global_batch=6, loss=1.5)
    retry = partial.candidate(step, members, own, healed, global_batch=6, micro_batch=2)
    if expected is None:
        assert retry is None
        return
    _, orphans, kept, departed = expected
    assert (retry.orphans.ranges, retry.kept_samples, retry.departed) == (orphans, kept, departed)
    assert partial.add_retry(4, 8, members, retry, loss=0.5) == 2.0
    assert partial.attempt.members == members and partial.attempt.quorum_id == 8
    # what the retry's members hold together is again the whole step: a further retry stays exact
    ids = sorted(i for ranges in partial.attempt.covered for s, n in ranges for i in range(s, s + n))
    assert ids == list(range(24, 30))


def test_nothing_is_reused_once_dropped_or_before_anything_was_kept():
    from elastic.ft.partial import PartialStep, replica_of

    partial = PartialStep()
    assert partial.candidate(4, (A,), A, False, 6, 2) is None
    partial.keep_full(4, 7, (A, B), 6, 1.0)
    partial.drop()
    assert partial.candidate(4, (A,), A, False, 6, 2) is None
    assert replica_of("replica-0012:5f3c") == 12


def test_chaos_report_shows_what_the_survivors_reused(tmp_path):
    import json

    from launch.chaos import format_replicas_report, replicas_fault_report

    (tmp_path / "faults").mkdir()
    fault = {"fault": "kill rank 1 during step 5", "index": 0, "kind": "kill_mid_step", "step": 5, "time": 100.0}
    (tmp_path / "faults" / "fired-0").write_text(json.dumps(fault))
    rows = [
        {"kind": "step", "time": 99.0, "step": 5, "world_size": 2},
        {"kind": "discard", "time": 100.1, "step": 5, "replica": 0},
        {"kind": "reuse", "time": 100.4, "step": 5, "replica": 0, "reused_samples": 3, "orphaned_samples": 3},
        {"kind": "step", "time": 100.8, "step": 6, "world_size": 1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (entry,) = replicas_fault_report(tmp_path)
    assert entry["survivors_next_step_seconds"] == 0.8 and entry["discarded_attempts"] == 1
    assert entry["reused"] == "replica 0 kept 3 + computed 3"
    assert "| replica 0 kept 3 + computed 3 |" in format_replicas_report([entry])


def test_process_group_handle_names_the_advertised_host():
    """Peers rebuild the cross-replica group on the store in each member's reconfigure handle: it must name the
    host the launcher advertises (a pod IP on Kubernetes), not this process's hostname (torchft's default)."""
    from elastic.ft.peers import advertised_process_group

    handle = json.loads(advertised_process_group(timedelta(seconds=5), "10.1.2.3").get_reconfigure_handle())
    host, _, port = handle["store"].rpartition(":")
    assert host == "10.1.2.3" and int(port) > 0, handle


class _TwinSum:
    """A stand-in for the SUM over a quorum of two identical replicas: doubles the slice in place, and records
    which parameters still had to produce their gradient when each bucket started."""

    def __init__(self):
        self.started: list[tuple[int, int]] = []
        self.pending_at_start: list[int] = []
        self.backward_pending = 0

    def __call__(self, part: torch.Tensor):
        self.started.append((part.storage_offset(), part.numel()))
        self.pending_at_start.append(self.backward_pending)
        part.mul_(2)
        return type("Done", (), {"wait": lambda self: None})()


def _mlp():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4), torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64)]
    return torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(64, 4))


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_overlapped_reduce_sums_every_gradient_in_bucket_order_during_the_backward(micro_batches):
    model = _mlp()
    unused = model[0]  # never in the graph: its bucket (the last) starts in complete() and reduces zeros
    params = list(model.parameters())
    twin = _TwinSum()
    reduce = OverlappedReduce(params, twin, bucket_bytes=64 * 65 * 4)  # the middle layer fills a bucket alone
    for p in params:  # counts the parameters whose gradient backward has not produced yet, as each bucket starts
        p.register_post_accumulate_grad_hook(lambda _p: setattr(twin, "backward_pending", twin.backward_pending - 1))
    for attempt in range(2):  # the same buffer serves every step
        model.zero_grad(set_to_none=True)
        twin.started.clear(), twin.pending_at_start.clear()
        reduce.arm(micro_batches)
        assert reduce.in_flight
        for _ in range(micro_batches):
            twin.backward_pending = sum(p is not unused.weight and p is not unused.bias for p in params)
            model[1:](torch.randn(16, 8)).square().sum().backward()
        flat = reduce.complete()
        assert not reduce.in_flight
        local = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        assert torch.equal(flat, 2 * local)  # every gradient reduced once; .grad itself left local
        assert unused.weight.grad is None and flat[: unused.weight.numel() + 4].abs().sum() == 0
        offsets = [offset for offset, _ in twin.started]
        assert offsets == sorted(offsets, reverse=True)  # buckets start last layer first, in order
        assert sum(n for _, n in twin.started) == flat.numel()
        assert len(twin.started) >= 3 and twin.pending_at_start[0] > 0  # the first bucket started mid-backward


def test_overlapped_reduce_ignores_backward_passes_it_was_not_armed_for():
    model = _mlp()
    params = list(model.parameters())
    twin = _TwinSum()
    reduce = OverlappedReduce(params, twin, bucket_bytes=1024)
    model[1:](torch.randn(4, 8)).sum().backward()  # e.g. a retry's orphaned samples, outside arm()/complete()
    assert twin.started == [] and not reduce.in_flight
