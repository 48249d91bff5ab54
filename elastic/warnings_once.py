"""Each distinct third-party warning once per job; ecpt's own warnings every time.

Why: DeepSpeed's ZeRO-3 calls torch collectives that torch has deprecated, and torch warns on every call. Python's
usual once-per-location rule does not hold them back, because every change to the warning filters (libraries
enter ``warnings.catch_warnings`` all the time) forgets which warnings were already shown. A 12-step ZeRO-3 run
printed about 50 identical ``FutureWarning`` lines, from every rank. Filtering them away would hide a deprecation
the user should know about; showing each distinct one once keeps it visible without the flood.

How: ``install(rank)`` wraps ``warnings.showwarning`` in every training process (``elastic.bootstrap.join_job``).
A warning raised from ecpt's own packages (``elastic``, ``checkpointing``, ``launch``) is shown as Python would
show it. Any other warning is shown by rank 0 the first time its (category, message, source file) is seen in the
process; every rank runs the same code and meets the same warnings, so once on rank 0 is once per job. The other
ranks log it at DEBUG on the ``ecpt.warnings`` logger instead of printing it, so a warning that only one of them
meets is still there with DEBUG logging. The warning filters (``-W``, ``PYTHONWARNINGS``) still decide first:
this only sees warnings they let through.

A shown warning goes out through logging (the ``py.warnings`` logger, as ``logging.captureWarnings`` does), so
while rank 0's progress bar is open it is written through the bar like every log line instead of into it.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

OWN_PACKAGES = ("elastic", "checkpointing", "launch")
"""Top-level packages whose warnings are ecpt's own: shown every time."""
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
_OWN_DIRS = tuple(_SOURCE_ROOT / name for name in OWN_PACKAGES)


def is_own_source(filename: str) -> bool:
    """True when ``filename`` (a warning's source file) belongs to one of ecpt's own packages."""
    path = Path(filename).resolve()
    return any(path.is_relative_to(d) for d in _OWN_DIRS)


class WarningsOnce:
    """A ``warnings.showwarning`` replacement: third-party warnings once per job (see the module docstring)."""

    def __init__(self, rank: int, to_file=None):
        self.rank = rank
        self._to_file = to_file or warnings.showwarning  # for a warning whose caller named a file to write to
        self._shown = logging.getLogger("py.warnings")
        self._hidden = logging.getLogger("ecpt.warnings")
        self._seen: set[tuple[type, str, str]] = set()
        self._lock = threading.Lock()  # DeepSpeed and the checkpoint threads may warn concurrently

    def _show(self, message, category, filename, lineno, file, line) -> None:
        if file is not None:
            self._to_file(message, category, filename, lineno, file, line)
            return
        self._shown.warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"))

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        if is_own_source(filename):
            self._show(message, category, filename, lineno, file, line)
            return
        key = (category, str(message), filename)
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        if not first:
            return
        if self.rank == 0:
            self._show(message, category, filename, lineno, file, line)
        else:
            self._hidden.debug("%s:%d: %s: %s (shown by rank 0)", filename, lineno, category.__name__, message)


def install(rank: int) -> WarningsOnce:
    """Make this process show third-party warnings once per job; idempotent (a later call only updates the rank,
    for processes that join more than one job, such as the arms of the CPT experiment)."""
    current = warnings.showwarning
    if isinstance(current, WarningsOnce):
        current.rank = rank
        return current
    hook = WarningsOnce(rank, to_file=current)
    warnings.showwarning = hook
    return hook
