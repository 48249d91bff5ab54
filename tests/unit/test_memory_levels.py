"""Run identity, ownership, release and staleness of memory (L0) checkpoints, and `ecpt ckpt gc`, on real files in
/dev/shm and real processes (elastic/memory_levels.py states the rules)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from checkpointing import CheckpointManager, LevelSpec
from support.ckpt_state import make_state
from elastic import memory_levels as ml
from elastic.config import ConfigError, load_config
from launch.ckpt_commands import add_ckpt_parser


@pytest.fixture
def l0_root():
    """A private L0 root in node memory, removed afterwards."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    if base is None:
        pytest.skip("no /dev/shm here")
    root = base / f"ecpt-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _idle_process() -> subprocess.Popen:
    """A real process that lives until its stdin closes."""
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)


def _end(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def _entry(root: Path, key: str = "a" * 12, run_id: str | None = None) -> Path:
    return root / ml.entry_name(key, run_id or uuid.uuid4().hex[:12])


def test_concurrent_first_starts_agree_on_one_identity(tmp_path):
    run_dir = tmp_path / "run"
    code = "import sys; from elastic.memory_levels import run_identity; print(run_identity(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1 and ids == {ml.run_identity(run_dir)}
    assert sorted(p.name for p in run_dir.iterdir()) == ["run-id"]  # no temporary file left behind
    shutil.rmtree(run_dir)
    assert ml.run_identity(run_dir) not in ids  # a recreated run directory is another run


def test_unreadable_identity_names_the_file(tmp_path):
    (tmp_path / "run-id").write_text("not-an-id\n")
    with pytest.raises(ml.MemoryLevelError, match=str(tmp_path / "run-id")):
        ml.run_identity(tmp_path)


def test_owner_liveness_survives_pid_reuse(l0_root):
    proc = _idle_process()
    owner = ml.claim(_entry(l0_root), "n0", "/runs/x", "b" * 12, proc.pid)
    assert owner.alive() is True
    reused = dataclasses.replace(owner, pid_started=owner.pid_started - 1)  # same pid, another process
    assert reused.alive() is False
    assert dataclasses.replace(owner, host="elsewhere").alive() is None
    _end(proc)
    assert owner.alive() is False


def test_reaping_frees_dead_and_old_memory_only(l0_root, caplog):
    live_proc, dead_proc, spared_proc = _idle_process(), _idle_process(), _idle_process()
    live, dead, spared = _entry(l0_root), _entry(l0_root), _entry(l0_root)
    ml.claim(live, "n0", "/runs/live", live.name[-12:], live_proc.pid)
    ml.claim(dead, "n0", "/runs/dead", dead.name[-12:], dead_proc.pid)
    ml.claim(dead, "n1", "/runs/dead", dead.name[-12:], spared_proc.pid)  # a second node: both must be gone
    ml.claim(spared, "n0", "/runs/me", spared.name[-12:], spared_proc.pid)
    for path in (live, dead, spared):
        (path / "n0" / "step-00000001").mkdir(parents=True)
    legacy_old, legacy_new = l0_root / ("c" * 12), l0_root / ("d" * 12)
    for path in (legacy_old, legacy_new):
        (path / "n0" / "step-00000003").mkdir(parents=True)
    os.utime(legacy_old / "n0", (1, 1))
    os.utime(legacy_old, (1, 1))
    garbled = _entry(l0_root)  # an owner record edited by hand: liveness unknown, and the entry is fresh
    garbled.mkdir()
    (garbled / "owner-n0.json").write_text("{not json")
    unrelated = l0_root / "someone-elses"
    unrelated.mkdir()
    os.utime(unrelated, (1, 1))
    try:
        _end(dead_proc)
        _end(spared_proc)
        with caplog.at_level(logging.INFO):
            reaped = ml.reap_stale(l0_root, 3600, spare=spared, log=logging.getLogger("test"))
        assert sorted(e.path for e, _ in reaped) == sorted([dead, legacy_old])
        assert sorted(p.name for p in l0_root.iterdir()) == sorted(
            [live.name, spared.name, legacy_new.name, garbled.name, unrelated.name]
        )
        reasons = dict((e.path, r) for e, r in reaped)
        assert "has ended" in reasons[dead] and "checkpoint.l0_stale_after_s" in reasons[legacy_old]
        assert f"stale memory checkpoints {dead}" in caplog.text
    finally:
        _end(live_proc)


def test_interrupted_removal_is_finished_by_the_next_reaper(l0_root):
    leftover = l0_root / f"{ml.REAPING_PREFIX}{'e' * 12}-1234"
    (leftover / "n0" / "step-00000001").mkdir(parents=True)
    assert [e.path for e, _ in ml.reap_stale(l0_root, 3600)] == [leftover]
    assert not leftover.exists()


def _save(root: Path, steps: list[int]) -> None:
    mgr = CheckpointManager([LevelSpec("L", str(root), 1, 5, node_local=True)], chunk_bytes=256)
    for step in steps:
        mgr.save(step, make_state(0, "replica", step), {})
    mgr.wait_durable()
    mgr.close()


def test_release_frees_memory_only_when_its_newest_step_is_durable(l0_root, tmp_path, caplog):
    entry = _entry(l0_root)
    ml.claim(entry, "n0", tmp_path, entry.name[-12:], os.getpid())
    ml.claim(entry, "n1", tmp_path, entry.name[-12:], os.getpid())
    _save(entry / "n0", [1, 2, 3])
    _save(entry / "n1", [2])
    _save(tmp_path / "L1", [2])
    log = logging.getLogger("test")
    with caplog.at_level(logging.INFO):
        assert not ml.release(entry, "n0", [tmp_path / "L1"], log)  # step 3 exists only in memory
        assert "newest step 3 is only in memory" in caplog.text
        assert not ml.release(entry, "n1", [], log)  # no slower level at all
        assert "no slower level is configured" in caplog.text
        assert (entry / "n0" / "step-00000003").is_dir() and (entry / "n1" / "step-00000002").is_dir()
        assert ml.release(entry, "n1", [tmp_path / "L1"], log)
        assert sorted(p.name for p in entry.iterdir()) == ["n0", "owner-n0.json"]
        _save(tmp_path / "L1", [3])
        assert ml.release(entry, "n0", [tmp_path / "L1"], log)
    assert not entry.exists()  # the last node removes the run's entry


def gc(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ecpt")
    add_ckpt_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ckpt", "gc", *argv])
    return args.func(args)


def test_ckpt_gc_lists_then_removes_stale_memory(l0_root, capsys):
    dead_proc = _idle_process()
    dead, live = _entry(l0_root), _entry(l0_root)
    ml.claim(dead, "n0", "/runs/dead", dead.name[-12:], dead_proc.pid)
    ml.claim(live, "n0", "/runs/live", live.name[-12:], os.getpid())
    (dead / "n0" / "step-00000001").mkdir(parents=True)
    (dead / "n0" / "step-00000001" / "chunk").write_bytes(b"\0" * 2_000_000)
    _end(dead_proc)
    assert gc([str(l0_root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stale" in out and str(dead) in out and str(live) not in out and "would free 2.0 MB in 1" in out
    assert dead.exists()
    assert gc([str(l0_root)]) == 0
    assert "freed 2.0 MB in 1" in capsys.readouterr().out
    assert sorted(p.name for p in l0_root.iterdir()) == [live.name]
    assert gc([str(l0_root)]) == 0 and "in 0 stale" in capsys.readouterr().out
    assert gc([str(l0_root), "--stale-after", "0"]) == 2
    assert "--stale-after must be > 0" in capsys.readouterr().err


def test_ckpt_gc_uses_the_configured_root(l0_root, tmp_path, capsys):
    (l0_root / f"{ml.REAPING_PREFIX}{'f' * 12}-1").mkdir()
    config = tmp_path / "c.json"
    raw = load_config(None, [f'checkpoint.l0_dir="{l0_root}"']).to_dict()
    config.write_text(json.dumps(raw))
    assert gc(["--config", str(config)]) == 0
    assert f"{l0_root}: freed" in capsys.readouterr().out and not any(l0_root.iterdir())


def test_stale_age_must_be_positive():
    with pytest.raises(ConfigError, match="checkpoint.l0_stale_after_s must be > 0"):
        load_config(None, ["checkpoint.l0_stale_after_s=0"])
