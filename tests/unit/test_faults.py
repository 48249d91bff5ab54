"""The fault plan: parsing, once-per-run claiming, corruption and the watchdog, without a training job."""

import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from elastic.config import ConfigError
from elastic.fault_plan import fired_faults, parse_plan, random_plan, released_marker
from elastic.faults import FILL_DISK_MAX_BYTES, FaultInjector, corrupt_newest_checkpoint, fill_file_system
from elastic.watchdog import Watchdog


def test_plan_sentences_parse():
    plan = parse_plan(
        [
            "kill rank 1 at step 30",
            "kill rank 1 during step 31",
            "Kill  node n1 at step 50",
            "sigterm all at step 70",
            "stall rank 0 at step 20 for 60s",
            "corrupt newest at step 40",
            "fill disk at step 60",
        ]
    )
    assert [(f.kind, f.step, f.rank, f.node, f.seconds) for f in plan] == [
        ("kill", 30, 1, None, 0),
        ("kill_mid_step", 31, 1, None, 0),
        ("kill_node", 50, None, "n1", 0),
        ("sigterm", 70, None, None, 0),
        ("stall", 20, 0, None, 60),
        ("corrupt", 40, None, None, 0),
        ("fill_disk", 60, None, None, 0),
    ]


def test_describe_round_trips_through_the_parser():
    sentences = [
        "kill rank 1 at step 30",
        "kill rank 1 during step 31",
        "kill rank 1 during step 31 until step 40",
        "kill rank 0 at step 3 until step 4",
        "kill node n1 at step 50",
        "sigterm all at step 70",
        "stall rank 0 at step 20 for 60s",
        "corrupt newest at step 40",
        "fill disk at step 60",
    ]
    assert [f.describe() for f in parse_plan(sentences)] == sentences
    assert [f.until for f in parse_plan(sentences)[:4]] == [None, None, 40, 4]


def test_a_replacement_that_would_rejoin_before_the_kill_is_refused():
    with pytest.raises(ConfigError, match=r"faults.plan\[0\] 'kill rank 1 during step 5 until step 5'.*after"):
        parse_plan(["kill rank 1 during step 5 until step 5"])


def test_until_needs_replicas_mode():
    from elastic.config import Config

    cfg = Config()
    cfg.faults.plan = ["kill rank 1 at step 5 until step 9"]
    with pytest.raises(ConfigError, match=r"faults.plan\[0\].*launch.fault_tolerance = \"replicas\""):
        cfg.validate_faults()
    cfg.launch.fault_tolerance = "replicas"
    cfg.validate_faults()


def test_a_held_replacement_waits_for_a_survivor_to_start_the_until_step(tmp_path, monkeypatch):
    """Rank 1 killed during step 5 until step 8: its replacement blocks until a survivor starts step 8; the killed
    rank's own replacements never release themselves, and a plan whose kill has not fired holds nobody."""
    log = logging.getLogger("test")
    plan = parse_plan(["kill rank 1 during step 5 until step 8"])
    monkeypatch.setattr("elastic.faults.HOLD_TIMEOUT_SECONDS", 0.3)

    def injector(rank):
        return FaultInjector(plan, tmp_path, rank=rank, local_rank=0, node_id="n0", checkpoint_levels=[], log=log)

    survivor, replacement = injector(0), injector(1)
    replacement.hold_if_replacement()  # not killed yet: a first start is never held
    assert replacement._claim(plan[0])  # what the kill does before SIGKILL
    survivor.at_step(7)
    replacement.at_step(8)  # the killed rank itself does not release its replacement
    with pytest.raises(TimeoutError, match=r"a survivor to start step 8 .*released-0 never appeared"):
        injector(1).hold_if_replacement()
    survivor.at_step(8)
    assert released_marker(tmp_path, plan[0]).exists()
    injector(1).hold_if_replacement()  # returns at once


def test_the_end_of_the_run_releases_a_replacement_held_past_it(tmp_path):
    plan = parse_plan(["kill rank 1 at step 2 until step 500"])
    log = logging.getLogger("test")
    survivor = FaultInjector(plan, tmp_path, rank=0, local_rank=0, node_id="n0", checkpoint_levels=[], log=log)
    survivor.finish()
    assert not released_marker(tmp_path, plan[0]).exists(), "released a fault that never fired"
    assert FaultInjector(plan, tmp_path, rank=1, local_rank=0, node_id="n0", checkpoint_levels=[], log=log)._claim(
        plan[0]
    )
    survivor.finish()
    assert released_marker(tmp_path, plan[0]).exists()


def test_unknown_sentence_names_the_plan_entry():
    with pytest.raises(ConfigError, match=r"faults.plan\[1\] 'explode at step 3'"):
        parse_plan(["kill rank 0 at step 1", "explode at step 3"])


def test_a_fault_fires_once_per_run_even_after_a_restart(tmp_path):
    log = logging.getLogger("test")
    plan = parse_plan(["stall rank 0 at step 2 for 0s"])
    first = FaultInjector(plan, tmp_path, rank=0, local_rank=0, node_id="n0", checkpoint_levels=[], log=log)
    assert first._claim(plan[0]) is True
    again = FaultInjector(plan, tmp_path, rank=0, local_rank=0, node_id="n0", checkpoint_levels=[], log=log)
    assert again._claim(plan[0]) is False  # a restarted worker replaying step 2 does not fire it again
    fired = fired_faults(tmp_path)
    assert [(r["fault"], r["rank"], r["step"]) for r in fired] == [("stall rank 0 at step 2 for 0s", 0, 2)]


def test_random_plan_is_reproducible_and_parses():
    plan = random_plan(seed=7, total_steps=200, count=4, ranks=2)
    assert plan == random_plan(seed=7, total_steps=200, count=4, ranks=2)
    faults = parse_plan(plan)
    assert len({f.step for f in faults}) == 4 and all(20 <= f.step < 198 for f in faults)


def test_corrupt_newest_flips_bytes_of_the_newest_committed_checkpoint(tmp_path):
    for step in (3, 6):
        d = tmp_path / f"step-{step:08d}"
        (d / "model" / "w" / "c").mkdir(parents=True)
        (d / "model" / "w" / "c" / "0").write_bytes(bytes(range(64)))
        (d / "manifest.json").write_text("{}")
    uncommitted = tmp_path / "step-00000009.partial-ab"
    (uncommitted / "model" / "w" / "c").mkdir(parents=True)
    (uncommitted / "model" / "w" / "c" / "0").write_bytes(bytes(64))
    path = corrupt_newest_checkpoint([tmp_path])
    assert path == tmp_path / "step-00000006" / "model" / "w" / "c" / "0"
    assert path.read_bytes() == bytes(b ^ 0xFF for b in range(64))
    assert (tmp_path / "step-00000003" / "model" / "w" / "c" / "0").read_bytes() == bytes(range(64))


def test_fill_disk_refuses_a_real_disk(tmp_path, monkeypatch):
    """Whatever this machine's /tmp holds, the fault sees a file system with more room than it may fill (the real
    statvfs could report a small /tmp, and then the fault would really fill it)."""
    asked = []

    def statvfs_with(free_bytes: int):
        def statvfs(path):
            asked.append(Path(path))
            return SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096)

        return statvfs

    for free, shown in ((FILL_DISK_MAX_BYTES + 4096, "2.0 GiB free"), (40 << 30, "40.0 GiB free")):
        monkeypatch.setattr("elastic.faults.os.statvfs", statvfs_with(free))
        with pytest.raises(ConfigError, match="only fills small test file systems") as refused:
            fill_file_system(tmp_path)
        assert str(tmp_path) in str(refused.value) and shown in str(refused.value), refused.value
        assert asked[-1] == tmp_path
        assert list(tmp_path.iterdir()) == [], "the fault wrote before refusing"


def test_watchdog_exits_a_worker_that_makes_no_progress(tmp_path):
    code = (
        "import logging, time\n"
        "from elastic.watchdog import Watchdog\n"
        "Watchdog(1.0, logging.getLogger('w')).start()\n"
        "time.sleep(60)\n"
    )  # the simulated hang
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == Watchdog.EXIT_CODE
    assert time.monotonic() - start < 10
    assert "no step completed" in result.stderr
