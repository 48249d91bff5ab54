"""Prometheus metrics every rank serves, and the JSONL metrics log rank 0 writes.

Names follow Prometheus conventions: ``ecpt_`` prefix, base units, ``_total`` counters, ``_seconds`` histograms.
Every series carries a ``rank`` label so dashboards can tell ranks apart on one host; Prometheus adds ``instance``.
Each rank also writes a file_sd target file (``<run_dir>/prometheus/rank-<r>.json``) so a Prometheus server with
``file_sd_configs`` finds the endpoints, whose ports may be chosen at random.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
RECOVERY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300)


class WorkerMetrics:
    """The training metrics of one rank, registered on a private registry and served over HTTP."""

    def __init__(self, rank: int, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.rank = str(rank)
        r = self.registry
        lbl = ("rank",)
        self._step = Gauge("ecpt_step", "Last completed optimizer step", lbl, registry=r)
        self._loss = Gauge("ecpt_loss", "Training loss of the last step (global-batch mean)", lbl, registry=r)
        self._lr = Gauge("ecpt_lr", "Learning rate of the last step", lbl, registry=r)
        self._tokens = Counter("ecpt_tokens", "Tokens processed by this rank", lbl, registry=r)
        self._tps = Gauge("ecpt_tokens_per_second", "Global tokens per second over the last step", lbl, registry=r)
        self._step_s = Histogram(
            "ecpt_step_seconds", "Wall time of one optimizer step", lbl, buckets=STEP_BUCKETS, registry=r
        )
        self._phase = Gauge("ecpt_phase", "Index of the current data phase", lbl, registry=r)
        self._world = Gauge("ecpt_world_size", "Ranks in the current worker group", lbl, registry=r)
        self._eval = Gauge("ecpt_eval_loss", "Validation loss per domain", ("rank", "domain"), registry=r)
        self._recovery = Histogram(
            "ecpt_recovery_seconds",
            "Process start to first completed step after a restart",
            lbl,
            buckets=RECOVERY_BUCKETS,
            registry=r,
        )
        self._steps_lost = Counter(
            "ecpt_steps_lost", "Steps recomputed because they were not checkpointed", lbl, registry=r
        )
        self.port: int | None = None

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = server.server_port
        return self.port

    def write_target_file(self, run_dir: Path, host: str, node: str) -> Path:
        """A Prometheus file_sd entry for this endpoint (atomic write, so a scraper never reads half a file)."""
        target_dir = run_dir / "prometheus"
        target_dir.mkdir(parents=True, exist_ok=True)
        path = target_dir / f"rank-{self.rank}.json"
        scrape_host = host if host not in ("0.0.0.0", "") else node
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps([{"targets": [f"{scrape_host}:{self.port}"], "labels": {"job": "ecpt", "rank": self.rank}}])
        )
        os.replace(tmp, path)
        return path

    def on_step(
        self,
        step: int,
        loss: float,
        lr: float,
        local_tokens: int,
        global_tokens: int,
        seconds: float,
        phase: int,
        world_size: int,
    ) -> None:
        self._step.labels(self.rank).set(step)
        self._loss.labels(self.rank).set(loss)
        self._lr.labels(self.rank).set(lr)
        self._tokens.labels(self.rank).inc(local_tokens)
        self._tps.labels(self.rank).set(global_tokens / max(seconds, 1e-9))
        self._step_s.labels(self.rank).observe(seconds)
        self._phase.labels(self.rank).set(phase)
        self._world.labels(self.rank).set(world_size)

    def on_eval(self, losses: dict[str, float]) -> None:
        for domain, loss in losses.items():
            self._eval.labels(self.rank, domain).set(loss)

    def on_start(self, world_size: int) -> None:
        self._world.labels(self.rank).set(world_size)

    def track_run(self, counters) -> None:
        """Serve run-level counters that survive restarts (they travel in the checkpoint): ``counters`` is read
        at every scrape, so values restored from a checkpoint show up as counters continuing where they were."""
        self.registry.register(RunCounters(self.rank, counters))

    def on_recovered(self, seconds: float, steps_lost: int) -> None:
        self._recovery.labels(self.rank).observe(seconds)
        self._steps_lost.labels(self.rank).inc(steps_lost)


class RunCounters:
    """Collector for ecpt_restarts_total, ecpt_membership_changes_total and ecpt_goodput_ratio.

    prometheus_client counters start at 0 in every new process; these values are restored from the checkpoint
    after a restart, so they are exposed from the live state at scrape time instead.
    """

    def __init__(self, rank: str, counters):
        self.rank, self.counters = rank, counters

    def collect(self):
        c = self.counters
        restarts = CounterMetricFamily(
            "ecpt_restarts", "Worker-group restarts (resumes from a checkpoint) in this run", labels=["rank"]
        )
        restarts.add_metric([self.rank], c.restarts)
        changes = CounterMetricFamily(
            "ecpt_membership_changes", "Resumes at a different world size (shrink or grow)", labels=["rank"]
        )
        changes.add_metric([self.rank], c.membership_changes)
        goodput = GaugeMetricFamily(
            "ecpt_goodput_ratio",
            "Time in steps that were kept / wall time since the run first started",
            labels=["rank"],
        )
        goodput.add_metric([self.rank], c.goodput())
        return [restarts, changes, goodput]


class JsonlLog:
    """Append-only JSON-lines log of steps and evaluations (rank 0 only), flushed per line so a crash keeps it."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file = open(path, "a", buffering=1) if path else None

    def write(self, kind: str, **fields) -> None:
        if self._file:
            self._file.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **fields}) + "\n")

    def close(self) -> None:
        if self._file:
            self._file.close()


def read_jsonl(path: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]
