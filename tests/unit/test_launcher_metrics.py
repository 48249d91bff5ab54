"""The launcher's job-level metrics, folded from a metrics.jsonl and scraped over HTTP on 127.0.0.1."""

import json
import time
import urllib.request

from launch.launcher_metrics import RunLogFollower, serve_launcher_metrics


def _rows(now):
    return [
        {"kind": "start", "time": now - 100, "step": 0, "world_size": 2},
        *[{"kind": "step", "time": now - 100 + s, "step": s, "world_size": 2, "seconds": 1.0} for s in range(1, 11)],
        # node lost at step 10; resumed from step 8 at world size 1: steps 9 and 10 are computed again
        {
            "kind": "resume",
            "time": now - 80,
            "step": 8,
            "world_size": 1,
            "saved_world_size": 2,
            "steps_lost": 2,
            "process_started": now - 82,
        },
        *[{"kind": "step", "time": now - 79 + s, "step": 8 + s, "world_size": 1, "seconds": 1.0} for s in range(1, 5)],
    ]


def test_follower_counts_restarts_changes_and_lost_steps(tmp_path):
    now = time.time()
    log = tmp_path / "metrics.jsonl"
    rows = _rows(now)
    log.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]) + json.dumps(rows[5])[:10])  # a torn last line
    f = RunLogFollower(log)
    f.poll()
    assert f.world_size == 2 and f.restarts == 0
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    f2 = RunLogFollower(log)
    f2.poll()
    assert (f2.world_size, f2.restarts, f2.membership_changes, f2.steps_lost) == (1, 1, 1, 2)
    assert f2.recoveries == [(now - 78) - (now - 90)]  # last step before the restart to the first after it
    assert sorted(f2.kept_seconds) == list(range(1, 13))  # 9 and 10 were replaced by their recomputation
    assert 0.11 < f2.goodput() < 0.13  # 12 kept seconds of ~100


def test_launcher_endpoint_serves_the_job_view(tmp_path):
    now = time.time()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(now)))
    port = serve_launcher_metrics(tmp_path, "127.0.0.1", 0, "n0")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'ecpt_restarts_total{node="n0",role="launcher"} 1.0' in text
    assert 'ecpt_membership_changes_total{node="n0",role="launcher"} 1.0' in text
    assert 'ecpt_world_size{node="n0",role="launcher"} 1.0' in text
    assert 'ecpt_recovery_seconds_count{node="n0",role="launcher"} 1.0' in text
    target = json.loads((tmp_path / "prometheus" / "launcher-n0.json").read_text())
    assert target[0]["targets"] == [f"127.0.0.1:{port}"]
