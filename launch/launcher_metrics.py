"""Metrics served by the launcher (`ecpt train`), which outlives every worker restart.

Workers come and go on failures, so their endpoints vanish exactly when the interesting things happen. The launcher
follows the run's ``metrics.jsonl`` (written by rank 0 of every incarnation) incrementally and serves the job-level
view under the same names as the workers, labelled ``role="launcher"``: world size, restarts, membership changes,
recovery time, steps lost and goodput.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from elastic.metrics import RECOVERY_BUCKETS


class RunLogFollower:
    """Reads new lines of metrics.jsonl since the last call and folds them into job-level totals."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = b""
        self._lock = threading.Lock()
        self.world_size = 0
        self.restarts = 0
        self.membership_changes = 0
        self.steps_lost = 0
        self.recoveries: list[float] = []
        self._last_step_time: float | None = None
        self.kept_seconds: dict[int, float] = {}
        self.first_time: float | None = None
        self._pending_resume: dict | None = None

    def poll(self) -> None:
        with self._lock:
            if not self.path.exists():
                return
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
            self._offset += len(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()  # an unfinished last line waits for the next poll
            for line in lines:
                if line.strip():
                    self._fold(json.loads(line))

    def _fold(self, row: dict) -> None:
        self.first_time = self.first_time or row["time"]
        if row["kind"] == "resume":
            self.restarts += 1
            self.membership_changes += int(row["saved_world_size"] != row["world_size"])
            self.steps_lost += row["steps_lost"]
            self.world_size = row["world_size"]
            self._pending_resume = row
            # steps after the resume point will be recomputed: their old durations are no longer kept work
            self.kept_seconds = {s: v for s, v in self.kept_seconds.items() if s <= row["step"]}
        elif row["kind"] == "step":
            self.world_size = row["world_size"]
            self.kept_seconds[row["step"]] = row["seconds"]
            if self._pending_resume is not None and self._last_step_time is not None:
                # the fault came after the last step logged before the restart: from there to the first step
                # after it, no training progressed (detection, rendezvous, start, restore and the step itself)
                self.recoveries.append(row["time"] - self._last_step_time)
            self._pending_resume = None
            self._last_step_time = row["time"]

    def goodput(self) -> float:
        if self.first_time is None:
            return 0.0
        return sum(self.kept_seconds.values()) / max(time.time() - self.first_time, 1e-9)


class LauncherCollector:
    def __init__(self, follower: RunLogFollower, node: str):
        self.follower, self.node = follower, node

    def collect(self):
        f = self.follower
        f.poll()
        labels, values = ["role", "node"], ["launcher", self.node]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        hist = HistogramMetricFamily(
            "ecpt_recovery_seconds",
            "Seconds without a completed step around a restart (last step before it to the first after it)",
            labels=labels,
        )
        buckets = [(str(b), sum(1 for r in f.recoveries if r <= b)) for b in RECOVERY_BUCKETS]
        hist.add_metric(values, buckets + [("+Inf", len(f.recoveries))], sum(f.recoveries))
        return [
            gauge("ecpt_world_size", "Ranks in the current worker group", f.world_size),
            counter("ecpt_restarts", "Worker-group restarts (resumes) in this run", f.restarts),
            counter("ecpt_membership_changes", "Resumes at a different world size", f.membership_changes),
            counter("ecpt_steps_lost", "Steps computed again after restarts", f.steps_lost),
            gauge("ecpt_goodput_ratio", "Time in kept steps / wall time since the run started", f.goodput()),
            hist,
        ]


def serve_launcher_metrics(run_dir: Path, host: str, port: int, node: str) -> int:
    """Start the launcher's endpoint; write its Prometheus file_sd target next to the ranks'. Returns the port."""
    registry = CollectorRegistry()
    registry.register(LauncherCollector(RunLogFollower(run_dir / "metrics.jsonl"), node))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_port
    target_dir = run_dir / "prometheus"
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / f"launcher-{node}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    scrape_host = host if host not in ("0.0.0.0", "") else os.uname().nodename
    tmp.write_text(json.dumps([{"targets": [f"{scrape_host}:{bound}"], "labels": {"job": "ecpt", "role": "launcher"}}]))
    os.replace(tmp, path)
    return bound
