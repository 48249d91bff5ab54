"""The one way tests wait: poll an observable condition (a file, a metric, a process) against a deadline."""

from __future__ import annotations

import subprocess
import time
from typing import Callable


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    interval: float = 0.05,
):
    """Poll ``predicate`` until it returns something truthy and return that; fail naming ``what`` after ``timeout``
    seconds, or at once if ``proc`` exits first (with its stderr when that is a pipe).

    Checks that cost a command or a request (Slurm clients, HTTP queries) pass a longer ``interval``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            stderr = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(
                f"process exited ({proc.returncode}) while waiting for {what}"
                + (f":\n{stderr[-4000:]}" if stderr else "")
            )
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
