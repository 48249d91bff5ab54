"""The step watchdog: a worker that stops making progress exits, so the agent restarts the worker group."""

from __future__ import annotations

import os
import threading
import time


class Watchdog:
    """Exits this worker when no step completes within ``timeout`` seconds (a hung rank or a stuck collective).

    The ranks blocked behind a hung peer exit too, so torchrun sees failed workers and restarts the group,
    killing the hung one. A thread, so it runs while the main thread is blocked in C++ (a collective) or asleep.
    """

    EXIT_CODE = 75

    def __init__(self, timeout: float, log):
        self.timeout, self.log = timeout, log
        self.last = time.monotonic()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ecpt-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.last = time.monotonic()
        if self.timeout > 0:
            self._thread.start()
        return self

    def progress(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop = True

    def _run(self) -> None:
        while not self._stop:
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                self.log.error(
                    f"watchdog: no step completed for {idle:.1f} s (> train.hang_timeout "
                    f"{self.timeout:g} s); exiting so the agent restarts the worker group"
                )
                os._exit(self.EXIT_CODE)
            time.sleep(min(1.0, self.timeout / 4))  # polling interval of the watchdog thread, not synchronisation
