"""Elastic recovery end to end: real torchrun agents, real kills, real checkpoints, the real `ecpt train`.

Each test asserts what a user cares about: training finished every step, resumed at the right step, kept the
global batch and consumed every sample exactly once, and (same world size) reproduced the uninterrupted run.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from elastic.metrics import read_jsonl
from support.configs import recovery_config, tiny_config_dict
from support.faults import lose_and_rejoin_node, node_loss_budget
from support.processes import TRAIN_TIMEOUT, check_ok, ecpt_train, run_ecpt
from support.trajectory import final_losses, final_samples, node_resizes

pytestmark = pytest.mark.slow
MARGIN = 60
"""Seconds on top of a test's inner budgets, so they, not pytest's timeout, end a stuck test (with its output)."""
CLEAN_RUN = TRAIN_TIMEOUT
"""The module's clean_run fixture: paid by whichever test needs it first."""
HUNG_RUN, VERIFY_TIMEOUT = 180, 60


@pytest.fixture(scope="module")
def clean_run(text_corpus, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run every faulty run must reproduce (data and init depend only on seeds and content)."""
    tmp_path = tmp_path_factory.mktemp("clean")
    raw = tiny_config_dict(text_corpus, tmp_path)
    run = tmp_path / "clean"
    check_ok(ecpt_train(recovery_config(raw, tmp_path), run))
    return final_losses(run)


@pytest.mark.timeout(CLEAN_RUN + TRAIN_TIMEOUT + MARGIN)
def test_killed_worker_restarts_from_memory_bit_exactly(tiny_raw, tmp_path, clean_run):
    run = tmp_path / "faulty"
    result = run_ecpt(
        [
            "chaos",
            "--config",
            str(recovery_config(tiny_raw, tmp_path)),
            "--run-dir",
            str(run),
            "--plan",
            "kill rank 1 at step 5",
        ],
        timeout=TRAIN_TIMEOUT,
    )
    check_ok(result)
    report_row = next(line for line in result.stdout.splitlines() if line.startswith("| kill rank 1 at step 5"))
    cells = [c.strip() for c in report_row.strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[2]) >= float(cells[1])  # restart, then the first step after it
    assert cells[3].startswith("L0 step") and cells[5] == "2 -> 2"
    resumes = read_jsonl(run / "metrics.jsonl", "resume")
    assert len(resumes) == 1, f"expected one restart, got {resumes}:\n{result.stderr[-6000:]}"
    resume = resumes[0]
    # Persisting is asynchronous, so the newest committed snapshot may trail the kill by a step or two on a busy
    # machine; whatever it is, it comes from node memory and the lost steps are counted.
    assert 1 <= resume["step"] <= 5 and resume["level"] == "L0" and resume["restarts"] == 1
    assert resume["steps_lost"] == 5 - resume["step"]
    assert final_losses(run) == clean_run  # bit-exact: same world size, same samples, same RNG
    assert final_samples(run) == list(range(12 * 6))


@pytest.mark.timeout(CLEAN_RUN + 2 * TRAIN_TIMEOUT + MARGIN)
def test_sigterm_saves_then_the_rerun_resumes_exactly(tiny_raw, tmp_path, clean_run):
    config = recovery_config(tiny_raw, tmp_path)
    run = tmp_path / "preempted"
    first = ecpt_train(config, run, "--fault", "sigterm all at step 6")
    assert first.returncode != 0  # the agent was terminated: the job did not finish
    stops = read_jsonl(run / "metrics.jsonl", "stop")
    assert stops and stops[-1]["step"] >= 6
    check_ok(ecpt_train(config, run))
    resume = read_jsonl(run / "metrics.jsonl", "resume")[-1]
    assert resume["step"] == stops[-1]["step"]
    assert final_losses(run) == clean_run


@pytest.mark.timeout(CLEAN_RUN + TRAIN_TIMEOUT + MARGIN)
def test_corrupted_newest_checkpoint_falls_back_to_an_older_one(tiny_raw, tmp_path, clean_run):
    run = tmp_path / "corrupt"
    config = recovery_config(tiny_raw, tmp_path, l0_interval=0)  # L1 only, every 3 steps: 3, 6, 9
    result = ecpt_train(config, run, "--fault", "corrupt newest at step 7", "--fault", "kill rank 0 at step 8")
    check_ok(result)
    resume = read_jsonl(run / "metrics.jsonl", "resume")[-1]
    assert resume["step"] == 3  # step 6 was corrupted, so the loader fell back
    assert any("step 6" in f or "step-00000006" in f for f in resume["fallbacks"]), resume["fallbacks"]
    assert "corrupted" in result.stderr
    assert final_losses(run) == clean_run


@pytest.mark.timeout(CLEAN_RUN + HUNG_RUN + MARGIN)
def test_hung_rank_is_detected_by_the_watchdog(tiny_raw, tmp_path, clean_run):
    run = tmp_path / "hung"
    config = recovery_config(tiny_raw, tmp_path)
    result = ecpt_train(
        config, run, "--set", "train.hang_timeout=4", "--fault", "stall rank 0 at step 5 for 600s", timeout=HUNG_RUN
    )
    check_ok(result)
    assert "watchdog: no step completed" in result.stderr
    resumes = read_jsonl(run / "metrics.jsonl", "resume")
    assert len(resumes) == 1, f"expected one restart, got {resumes}:\n{result.stderr[-6000:]}"
    resume = resumes[0]
    assert 1 <= resume["step"] <= 5 and resume["level"] == "L0"
    assert final_losses(run) == clean_run


@pytest.mark.timeout(TRAIN_TIMEOUT + node_loss_budget() + MARGIN)
def test_node_loss_shrinks_and_rejoin_grows_with_the_same_global_batch(tiny_raw, tmp_path):
    config = recovery_config(tiny_raw, tmp_path, steps_per_phase=40)
    reference = tmp_path / "uninterrupted"
    check_ok(ecpt_train(config, reference))  # one agent, 2 workers: the same world size the job starts with
    run = tmp_path / "nodes"
    lose_and_rejoin_node(config, run, tmp_path, kill_step=10)
    assert node_resizes(run) == [2, 1, 2]
    total = 3 * 40
    assert final_samples(run) == list(range(total * 6))  # same global batch, nothing skipped or repeated
    final, clean = final_losses(run), final_losses(reference)
    assert sorted(final) == list(range(1, total + 1))
    # Different world sizes change only the float reduction order, so the curve stays within 1% throughout.
    worst = max(abs(final[s] - clean[s]) / clean[s] for s in clean)
    assert worst < 0.01, f"largest relative loss difference {worst:.4f}"


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for a few checkpoints of the tiny model, then a real ENOSPC."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a tmpfs needs root (CI runs as root); without it disk-full cannot be made real")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(CLEAN_RUN + TRAIN_TIMEOUT + VERIFY_TIMEOUT + MARGIN)
def test_disk_full_keeps_training_and_older_checkpoints(tiny_raw, tmp_path, clean_run, small_disk):
    run = tmp_path / "full"
    config = recovery_config(tiny_raw, tmp_path, l0_interval=0, dir=str(small_disk))
    result = ecpt_train(config, run, "--fault", "fill disk at step 5")
    assert result.returncode == 4, result.stderr[-4000:]  # training finished; the launcher reports the failure
    assert "checkpoint saves failed" in result.stderr and "No space left" in result.stderr
    assert final_losses(run) == clean_run  # no restart loop: every step once, same trajectory
    assert not read_jsonl(run / "metrics.jsonl", "resume")
    older = small_disk / "step-00000003"
    verify = run_ecpt(["ckpt", "verify", str(older)], timeout=VERIFY_TIMEOUT)
    assert verify.returncode == 0, verify.stdout + verify.stderr
