"""Process-level faults: SIGKILL in the middle of a write, SIGTERM leading to an emergency save."""

from __future__ import annotations

import json
import signal

import pytest

from checkpointing import CheckpointManager, LevelSpec, verify
from support.ckpt_state import make_state, matches
from support.ckpt_workers import start_worker
from support.waiting import wait_for

pytestmark = pytest.mark.slow


def level(tmp, name, interval, keep=3, node_local=True) -> dict:
    return {"name": name, "root": str(tmp / name), "interval": interval, "keep_last": keep, "node_local": node_local}


@pytest.fixture
def worker(tmp_path):
    """start(cfg, env=None) -> one worker process in tmp_path; one still running at teardown (a failed wait or
    assertion) is killed."""
    started = []

    def start(cfg: dict, env: dict | None = None):
        started.append(start_worker(tmp_path, cfg, env))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_sigkill_mid_write_leaves_older_checkpoint_loadable(tmp_path, worker):
    marker = tmp_path / "paused"
    proc = worker(
        {
            "levels": [level(tmp_path, "L1", 1)],
            "chunk_bytes": 128,
            "ops": [
                {"op": "save", "steps": [1], "layout": "replica"},
                {"op": "save", "steps": [2], "layout": "replica"},
            ],
            "pause_after_first_chunk": {"step": 2, "marker": str(marker)},
        },
    )
    wait_for(marker.exists, 30, f"{marker} (step 2 paused after one chunk)", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    partial = list((tmp_path / "L1").glob("step-00000002.partial-*"))
    assert len(partial) == 1 and any(p.is_file() for p in partial[0].rglob("*")), "the kill was not mid-write"
    mgr = CheckpointManager([LevelSpec(**level(tmp_path, "L1", 1))], chunk_bytes=128)
    assert [i.step for i in mgr.list()] == [1]
    assert verify(tmp_path / "L1" / "step-00000001") == []
    target = make_state(0, "replica", 0, zero=True)
    res = mgr.load(target)
    assert res.step == 1 and res.fallbacks == [] and matches(target, 1) == []
    mgr.save(2, make_state(0, "replica", 2), {"step": 2})  # the restarted run saves step 2 again
    assert mgr.wait_durable() == ["L1"]
    assert not list((tmp_path / "L1").glob("*.partial-*"))
    assert mgr.load(target).step == 2 and matches(target, 2) == []
    mgr.close()


def test_sigterm_emergency_save_makes_newest_step_durable(tmp_path, worker):
    ready = tmp_path / "ready"
    proc = worker(
        {
            "levels": [level(tmp_path, "L0", 1), level(tmp_path, "L2", 100, 1, False)],
            "ops": [
                {"op": "save", "steps": [1, 2, 3], "layout": "replica"},
                {"op": "wait_sigterm", "ready": str(ready)},
            ],
        }
    )
    wait_for(ready.exists, 30, f"{ready} (the worker waits for SIGTERM)", proc)
    assert not (tmp_path / "L2").exists()  # step 3 is only in node memory (L0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    results = json.loads((tmp_path / "result-0.json").read_text())
    assert results[-1] == {"written": ["L2"]}
    mgr = CheckpointManager([LevelSpec(**level(tmp_path, "L2", 100, 1, False))])
    target = make_state(0, "replica", 0, zero=True)
    assert mgr.load(target).step == 3 and matches(target, 3) == []
    mgr.close()
