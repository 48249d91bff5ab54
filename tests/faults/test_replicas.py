"""Replicas mode (launch.fault_tolerance = "replicas") end to end: the real `ecpt train`, a real torchft
Lighthouse, one real agent per replica, real kill -9 / SIGSTOP, real checkpoints.

What each test proves: survivors keep training at the exact global batch with no half-applied update (state
digests of the replicas equal at the end), a survivor of a mid-step kill keeps its own part of the step and
computes only the departed replica's samples, every sample is used once, losses track an uninterrupted run, a
returning replica heals from a live peer (not from disk), a frozen replica is excluded and then healed, a lost
coordinator stops the job with a clear error, losing every replica falls back to checkpoints, and a node started
while the job runs (a cluster node, against a standalone coordinator) joins at a step boundary and heals from a peer.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time

import pytest

from support.processes import check_ok, ecpt_train, start_ecpt_train
from support.replicas import assert_each_sample_once, replica_ends, replicas_config, start_lighthouse
from support.trajectory import final_losses, step_rows
from support.waiting import wait_for

pytestmark = pytest.mark.slow
PER_PHASE = 20  # long enough for the killed replica's restart (a few seconds) before the run ends
STEPS = 3 * PER_PHASE
G = 6  # tiny_config_dict's global batch
RUN_TIMEOUT = 240


@pytest.fixture(scope="module")
def clean_losses(text_corpus, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted replicas-mode run: the loss trajectory faulty runs must track."""
    from support.configs import tiny_config_dict

    tmp = tmp_path_factory.mktemp("replicas-clean")
    run = tmp / "run"
    config = replicas_config(tiny_config_dict(text_corpus, tmp), tmp, steps_per_phase=PER_PHASE)
    check_ok(ecpt_train(config, run, timeout=RUN_TIMEOUT))
    assert max(final_losses(run)) == STEPS
    return final_losses(run)


def _assert_replicas_agree(run, steps: int = STEPS) -> dict[int, dict]:
    ends = replica_ends(run)
    assert sorted(ends) == [0, 1], ends
    assert {e["step"] for e in ends.values()} == {steps}, ends
    assert ends[0]["digest"] == ends[1]["digest"], "replicas ended with different parameters or optimizer state"
    return ends


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_killed_replica_survivor_continues_and_it_heals_from_the_peer(tiny_raw, tmp_path, clean_losses):
    run = tmp_path / "run"
    config = replicas_config(tiny_raw, tmp_path, steps_per_phase=PER_PHASE)
    # killed mid-step: after both replicas computed their shares of step 5, before the gradient all-reduce; its
    # replacement rejoins once the survivor starts step 8 (it is up within a second, which can beat the survivor's
    # quorum of one: that race is not what this test is about)
    result = ecpt_train(config, run, "--fault", "kill rank 1 during step 5 until step 8")
    check_ok(result)
    log = result.stdout + result.stderr
    rows = {r["step"]: r for r in step_rows(run)}
    # the survivor went on alone: step 5 (in flight when replica 1 died) committed with a quorum of one
    assert rows[6]["world_size"] == 1, [(s, r["world_size"]) for s, r in sorted(rows.items())]
    # ... keeping its own half of step 5 and computing only replica 1's half (G = 6: 3 samples each)
    assert "step 5 discarded" in log, log[-4000:]
    assert "step 5: reused own share (3 samples), computed 3 orphaned samples of replica 1" in log, log[-4000:]
    # ... during the wait for the quorum (replica 1's heartbeats to expire), not after it
    assert "orphaned samples of replica 1 while the quorum formed" in log, log[-4000:]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reuse = [e for e in events if e["kind"] == "reuse"]
    assert [(e["step"], e["replica"], e["orphaned_samples"], e["early"]) for e in reuse] == [(5, 0, 3, True)], reuse
    heals = [e["step"] for e in events if e["kind"] == "heal"]
    assert heals and heals[0] >= 8, heals  # held back until the survivor started step 8
    assert rows[STEPS]["world_size"] == 2, "replica 1 never rejoined"
    assert "healed from live peer replica 0" in log, log[-4000:]
    assert "[rank 1 step 0] restored step" not in log and "fell back to checkpoints" not in log
    ends = _assert_replicas_agree(run)
    assert ends[1]["heals"] and ends[1]["heals"][-1]["source_replica"] == 0
    assert_each_sample_once(run, STEPS, G)
    faulty = final_losses(run)
    # the retried step 5 (row 6) starts from the clean run's parameters: the same 6 samples in the same micro-batches,
    # only summed in another order, give its loss to float precision (a wrong or missing sample would not)
    assert faulty[6] == pytest.approx(clean_losses[6], rel=1e-6), (faulty[6], clean_losses[6])
    for step in range(6, STEPS + 1):
        assert abs(faulty[step] - clean_losses[step]) <= 0.01 * clean_losses[step], (step, faulty[step])


@pytest.mark.timeout(RUN_TIMEOUT)
def test_without_reuse_the_survivor_recomputes_the_whole_step(tiny_raw, tmp_path, clean_losses):
    """launch.ft_reuse_partial_step = false: the survivor of a mid-step kill discards its part too and runs the whole
    step alone; same samples, same result as the clean run, no reuse row."""
    run = tmp_path / "run"
    raw = copy.deepcopy(tiny_raw)
    raw["train"]["max_steps"] = 10
    config = replicas_config(raw, tmp_path, steps_per_phase=PER_PHASE, ft_reuse_partial_step=False)
    result = ecpt_train(config, run, "--fault", "kill rank 1 during step 5 until step 8")
    check_ok(result)
    log = result.stdout + result.stderr
    assert "step 5 discarded" in log and "reused own share" not in log, log[-4000:]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["kind"] == "reuse"]
    rows = {r["step"]: r for r in step_rows(run)}
    assert rows[6]["world_size"] == 1, [(s, r["world_size"]) for s, r in sorted(rows.items())]
    faulty = final_losses(run)
    assert faulty[6] == pytest.approx(clean_losses[6], rel=1e-6), (faulty[6], clean_losses[6])
    ends = replica_ends(run)
    assert ends[0]["step"] == 10 and (1 not in ends or ends[1]["digest"] == ends[0]["digest"]), ends
    assert_each_sample_once(run, 10, G)


@pytest.mark.timeout(RUN_TIMEOUT)
def test_two_survivors_of_three_vote_to_reuse_and_split_the_orphans(tiny_raw, tmp_path, clean_losses):
    """3 replicas (G = 6: 2 samples each), replica 1 killed mid-step 3: replicas 0 and 2 agree (the reuse vote),
    each keeps its own 2 samples and computes one of replica 1's; they end identical, every sample is used once
    and the losses are the clean 2-replica run's (the global batch is the same whatever the quorum)."""
    run = tmp_path / "run"
    raw = copy.deepcopy(tiny_raw)
    raw["train"]["max_steps"] = 8  # the LR schedule follows the phases, so the clean run's steps 1-8 compare
    config = replicas_config(raw, tmp_path, steps_per_phase=PER_PHASE, replicas=3)
    result = ecpt_train(config, run, "--fault", "kill rank 1 during step 3 until step 6")
    check_ok(result)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reuse = sorted(  # not early: with 3 members nobody can tell who left before the quorum says
        (e["replica"], e["step"], e["reused_samples"], e["orphaned_samples"], e["departed"], e["early"])
        for e in events
        if e["kind"] == "reuse"
    )
    assert reuse == [(0, 3, 2, 1, [1], False), (2, 3, 2, 1, [1], False)], (
        reuse,
        (result.stdout + result.stderr)[-4000:],
    )
    assert {r["step"]: r["world_size"] for r in step_rows(run)}[4] == 2
    ends = replica_ends(run)
    assert ends[0]["step"] == ends[2]["step"] == 8 and ends[0]["digest"] == ends[2]["digest"], ends
    assert_each_sample_once(run, 8, G)
    faulty = final_losses(run)
    for step in range(1, 9):
        assert abs(faulty[step] - clean_losses[step]) <= 0.01 * clean_losses[step], (step, faulty[step])


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_frozen_replica_is_excluded_then_healed_never_stale(tiny_raw, tmp_path):
    """SIGSTOP for 3 s (heartbeat timeout 0.5 s): the survivor goes on alone; on SIGCONT the frozen replica either
    heals from the survivor or, if the survivor already finished, refuses its stale state. Either way it never
    trains or logs a step from its stale state (the run's step rows only ever increase)."""
    run = tmp_path / "run"
    result = ecpt_train(
        replicas_config(tiny_raw, tmp_path, steps_per_phase=8), run, "--fault", "stall rank 1 at step 4 for 3s"
    )
    check_ok(result)
    log = result.stdout + result.stderr
    rows = step_rows(run)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"a step was logged twice or out of order: {steps}"
    assert any(r["world_size"] == 1 for r in rows if r["step"] > 4), "the survivor did not continue alone"
    ends = replica_ends(run)
    if "healed from live peer replica 0" in log:
        assert ends[0]["digest"] == ends[1]["digest"] and ends[0]["step"] == ends[1]["step"] == 24
    else:
        assert "refusing stale state: the run finished" in log, log[-4000:]
        assert sorted(ends) == [0], "the stale replica recorded an end state"
    assert_each_sample_once(run, 24, G)


@pytest.mark.timeout(RUN_TIMEOUT)
def test_coordinator_killed_stops_the_job_with_a_clear_error(tiny_raw, tmp_path):
    run = tmp_path / "run"
    config = replicas_config(tiny_raw, tmp_path, steps_per_phase=200)
    proc = start_ecpt_train(config, "--run-dir", str(run), log=tmp_path / "train.log")
    try:
        wait_for(lambda: len(step_rows(run)) >= 3, 120, "three committed steps", proc=proc)
        coordinator = json.loads((run / "lighthouse.json").read_text())["pid"]
        killed = time.monotonic()
        os.kill(coordinator, signal.SIGKILL)
        code = proc.wait(timeout=60)
        stopped = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "train.log").read_text()
    assert code == 3, text[-3000:]
    assert "quorum coordinator" in text and "exited" in text and "resume" in text, text[-3000:]
    assert stopped < 30, f"stopping took {stopped:.1f} s"


@pytest.mark.timeout(RUN_TIMEOUT)
def test_every_replica_lost_falls_back_to_checkpoints(tiny_raw, tmp_path):
    run = tmp_path / "run"
    config = replicas_config(tiny_raw, tmp_path, steps_per_phase=PER_PHASE)
    result = ecpt_train(config, run, "--fault", "kill rank 0 at step 7", "--fault", "kill rank 1 at step 7")
    check_ok(result)
    log = result.stdout + result.stderr
    assert "no live peer has progress: fell back to checkpoints, restored step" in log, log[-4000:]
    fallbacks = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    restored = [r["step"] for r in fallbacks if r["kind"] == "fallback"]
    assert restored and 3 <= restored[0] <= 7, restored
    _assert_replicas_agree(run)
    assert_each_sample_once(run, STEPS, G)


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_a_node_started_later_joins_the_running_job_and_heals_from_a_peer(tiny_raw, tmp_path):
    """Two cluster nodes of one replica group each (launch.nnodes 1:2) against a standalone `ecpt lighthouse`, as
    `ecpt launch slurm` or k8s run them: node 0 trains alone; node 1, started once node 0 has committed steps,
    joins at a step boundary, heals from replica 0 (reading nothing from disk), and both finish identical with
    every sample used once. 180 steps: node 0 alone would take ~25 s, longer than node 1's start-up (~15 s)."""
    per_phase = 60
    lighthouse, address = start_lighthouse(tmp_path)
    run = tmp_path / "run"
    raw = copy.deepcopy(tiny_raw)
    raw["train"]["threads_per_worker"] = 1  # two "nodes" on this machine's 2 cores
    config = replicas_config(
        raw, tmp_path, steps_per_phase=per_phase, replicas=2, nnodes="1:2", lighthouse=address, ft_start_timeout_s=1.0
    )
    loopback = {"ECPT_ADVERTISE_HOST": "127.0.0.1"}  # a cluster node advertises its hostname; here: loopback only
    nodes = []

    def start_node(rank: int):
        log = tmp_path / f"node{rank}.log"
        args = ("--run-dir", str(run), "--node-rank", str(rank), "--node-id", f"node{rank}")
        return start_ecpt_train(config, *args, log=log, env=loopback)

    try:
        nodes.append(start_node(0))
        wait_for(lambda: len(step_rows(run)) >= 2, 120, "node 0 training alone", proc=nodes[0])
        assert {r["world_size"] for r in step_rows(run)} == {1}
        nodes.append(start_node(1))
        codes = [p.wait(timeout=RUN_TIMEOUT) for p in nodes]
    finally:
        for p in [*nodes, lighthouse]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = [(tmp_path / f"node{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "replica groups 1..1 of one worker on node rank 1" in logs[1], logs[1][-3000:]
    assert "healed from live peer replica 0" in logs[1] and "read nothing from disk" in logs[1], logs[1][-3000:]
    rows = step_rows(run)
    joined = min(r["step"] for r in rows if r["world_size"] == 2)
    assert joined > 2 and {r["world_size"] for r in rows if r["step"] >= joined} == {2}, rows
    ends = _assert_replicas_agree(run, 3 * per_phase)
    assert ends[1]["heals"][0]["source_replica"] == 0, ends[1]
    assert_each_sample_once(run, 3 * per_phase, G)


def test_a_node_rank_needs_the_jobs_coordinator(tiny_raw, tmp_path):
    """A node rank joins an existing job: without launch.lighthouse, or beyond nnodes MAX, it is a config error
    before any process starts."""
    from support.processes import run_ecpt

    config = replicas_config(tiny_raw, tmp_path, replicas=2, nnodes="1:2")
    result = run_ecpt(["train", "--config", str(config), "--run-dir", str(tmp_path / "r"), "--node-rank", "1"])
    assert result.returncode == 2 and "set launch.lighthouse" in result.stderr, result.stderr
    config = replicas_config(tiny_raw, tmp_path, replicas=2, nnodes="1:2", lighthouse="http://127.0.0.1:9")
    result = run_ecpt(["train", "--config", str(config), "--run-dir", str(tmp_path / "r"), "--node-rank", "2"])
    assert result.returncode == 2 and "outside launch.nnodes '1:2'" in result.stderr, result.stderr
    assert not (tmp_path / "r" / "config.json").exists(), "the run started before the error"
