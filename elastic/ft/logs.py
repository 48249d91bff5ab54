"""The run's metrics log in replicas mode: every replica holds it open, the quorum's rank 0 writes each row."""

from __future__ import annotations

from collections.abc import Callable

from elastic.metrics import JsonlLog


class LeaderJsonl:
    """Rows go to ``<run_dir>/metrics.jsonl`` only while this replica leads the quorum, so a step is logged once
    whichever replicas are alive (append mode: each row is one write, so rows of two leaders never interleave)."""

    def __init__(self, log: JsonlLog, is_leader: Callable[[], bool]):
        self.log, self.is_leader = log, is_leader
        self.path = log.path

    def write(self, kind: str, **fields) -> None:
        if self.is_leader():
            self.log.write(kind, **fields)

    def write_event(self, kind: str, **fields) -> None:
        """A replica's own event (heal, discard, fallback): written by whichever replica it happened to."""
        self.log.write(kind, **fields)

    def close(self) -> None:
        self.log.close()
