"""Exceptions raised by the checkpointing library.

Every message names the level, path, file or rank involved and, where there is one, the fix: a caller that catches
`CheckpointError` can log it as is and continue training.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A save or load could not complete (disk full, no valid checkpoint, layout mismatch, failing ranks)."""


class CheckpointCorruptError(CheckpointError):
    """A committed checkpoint does not match its manifest: a chunk is missing, truncated or fails its crc32c."""
