"""Prometheus metrics of the checkpoint manager (optional) plus plain counters that tests and logs can read."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class CheckpointStats:
    """Counters kept whether or not a registry is given (CheckpointManager.stats)."""

    saves: int = 0
    waits: int = 0  # save() found every staging buffer busy and waited (on_busy="wait")
    skips: int = 0  # save() found every staging buffer busy and skipped (on_busy="skip"), or dropped
    failures: int = 0
    blocked_seconds: float = 0.0  # total time the caller spent in save() + wait_staged()
    bytes_written: dict[str, int] = field(default_factory=dict)
    write_seconds: dict[str, float] = field(default_factory=dict)  # per level: writing (uploading) and committing
    level_failures: dict[str, int] = field(default_factory=dict)


class Metrics:
    """Thin wrapper: every call is a no-op on the Prometheus side when no registry was given."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.stats = CheckpointStats()
        self._on = registry is not None
        if not self._on:
            return
        self.blocked = Histogram(
            "ecpt_checkpoint_blocked_seconds",
            "Time the training loop was blocked in save() and wait_staged()",
            ["level"],
            registry=registry,
            buckets=_BUCKETS,
        )
        self.durable = Histogram(
            "ecpt_checkpoint_durable_seconds",
            "Time from save() to committed on a level",
            ["level"],
            registry=registry,
            buckets=_BUCKETS,
        )
        self.bytes = Counter(
            "ecpt_checkpoint_bytes_total", "Checkpoint bytes written by this rank", ["level"], registry=registry
        )
        self.write_seconds = Histogram(
            "ecpt_checkpoint_write_seconds",
            "Time one save spent writing (on object stores: uploading) and committing one level, failed ones too",
            ["level"],
            registry=registry,
            buckets=_BUCKETS,
        )
        self.failures = Counter(
            "ecpt_checkpoint_failures_total", "Checkpoint saves that failed on a level", ["level"], registry=registry
        )
        self.skipped = Counter(
            "ecpt_checkpoint_skipped_total",
            "Checkpoint saves skipped on a level: busy (on_busy=skip), or a slower level got a newer step instead",
            ["level"],
            registry=registry,
        )

    def observe_blocked(self, level: str, seconds: float) -> None:
        self.stats.blocked_seconds += seconds
        if self._on:
            self.blocked.labels(level=level).observe(seconds)

    def observe_durable(self, level: str, seconds: float) -> None:
        if self._on:
            self.durable.labels(level=level).observe(seconds)

    def observe_write(self, level: str, seconds: float) -> None:
        self.stats.write_seconds[level] = self.stats.write_seconds.get(level, 0.0) + seconds
        if self._on:
            self.write_seconds.labels(level=level).observe(seconds)

    def add_bytes(self, level: str, n: int) -> None:
        self.stats.bytes_written[level] = self.stats.bytes_written.get(level, 0) + n
        if self._on:
            self.bytes.labels(level=level).inc(n)

    def failure(self, level: str) -> None:
        self.stats.failures += 1
        self.stats.level_failures[level] = self.stats.level_failures.get(level, 0) + 1
        if self._on:
            self.failures.labels(level=level).inc()

    def skip(self, levels: list[str]) -> None:
        self.stats.skips += 1
        if self._on:
            for level in levels:
                self.skipped.labels(level=level).inc()
