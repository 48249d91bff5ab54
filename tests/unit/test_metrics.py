"""A real Prometheus scrape over HTTP on 127.0.0.1 of one rank's endpoint."""

import json
import urllib.request

import time

from elastic.metrics import JsonlLog, WorkerMetrics, read_jsonl
from elastic.trainer import RunCounters


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_worker_metrics_are_served_over_http(tmp_path):
    m = WorkerMetrics(rank=1)
    port = m.serve("127.0.0.1", 0)
    m.on_start(world_size=2)
    counters = RunCounters(restarts=2, membership_changes=1, productive_seconds=30.0, started_unix=time.time() - 40.0)
    m.track_run(counters)
    m.on_step(step=5, loss=2.5, lr=1e-3, local_tokens=1024, global_tokens=2048, seconds=0.5, phase=1, world_size=2)
    m.on_step(step=6, loss=2.25, lr=1e-3, local_tokens=1024, global_tokens=2048, seconds=0.25, phase=1, world_size=2)
    m.on_eval({"prose": 3.0, "c": 4.0})
    s = _scrape(port)
    assert s['ecpt_step{rank="1"}'] == 6
    assert s['ecpt_loss{rank="1"}'] == 2.25
    assert s['ecpt_tokens_total{rank="1"}'] == 2048
    assert s['ecpt_step_seconds_count{rank="1"}'] == 2
    assert s['ecpt_step_seconds_bucket{le="0.25",rank="1"}'] == 1
    assert s['ecpt_tokens_per_second{rank="1"}'] == 8192
    assert s['ecpt_world_size{rank="1"}'] == 2
    assert s['ecpt_eval_loss{domain="c",rank="1"}'] == 4.0
    assert s['ecpt_restarts_total{rank="1"}'] == 2
    assert s['ecpt_membership_changes_total{rank="1"}'] == 1
    assert 0.7 < s['ecpt_goodput_ratio{rank="1"}'] <= 0.75  # 30 s kept of ~40 s wall
    counters.restarts = 3  # restored or incremented after a restart: the next scrape shows it
    assert _scrape(port)['ecpt_restarts_total{rank="1"}'] == 3
    target = json.loads(m.write_target_file(tmp_path, "127.0.0.1", "node0").read_text())
    assert target == [{"targets": [f"127.0.0.1:{port}"], "labels": {"job": "ecpt", "rank": "1"}}]


def test_jsonl_log_round_trip(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl")
    log.write("step", step=1, loss=3.0)
    log.write("eval", step=1, losses={"c": 2.0})
    log.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl", "step")] == [1]
    assert read_jsonl(tmp_path / "m.jsonl", "eval")[0]["losses"] == {"c": 2.0}
