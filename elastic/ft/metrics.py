"""Prometheus metrics of replicas mode, on the worker's registry (``elastic.metrics.WorkerMetrics``)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HEAL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class ReplicaMetrics:
    """Quorum size and id, heal seconds, steps discarded and time without progress of one replica."""

    def __init__(self, registry: CollectorRegistry | None, replica: int):
        self.registry = registry or CollectorRegistry()
        self.label = str(replica)
        r, lbl = self.registry, ("replica",)
        self._size = Gauge("ecpt_quorum_size", "Replicas in the current quorum", lbl, registry=r)
        self._id = Gauge("ecpt_quorum_id", "Id of the current quorum (changes with membership)", lbl, registry=r)
        self._heal = Histogram(
            "ecpt_heal_seconds", "Quorum request to a peer's state applied", lbl, buckets=HEAL_BUCKETS, registry=r
        )
        self._discarded = Counter(
            "ecpt_steps_discarded", "Steps in flight discarded because the quorum changed or failed", lbl, registry=r
        )
        self.last_progress = time.monotonic()
        stall = Gauge(
            "ecpt_seconds_without_progress", "Seconds since this replica last committed a step", lbl, registry=r
        )
        stall.labels(self.label).set_function(lambda: time.monotonic() - self.last_progress)

    def on_quorum(self, quorum_id: int, size: int) -> None:
        self._id.labels(self.label).set(quorum_id)
        self._size.labels(self.label).set(size)

    def on_heal(self, seconds: float) -> None:
        self._heal.labels(self.label).observe(seconds)

    def on_discard(self) -> None:
        self._discarded.labels(self.label).inc()

    def on_commit(self) -> None:
        self.last_progress = time.monotonic()
