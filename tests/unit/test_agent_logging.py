"""The agent's log of a dead worker: the same text as torch's own formatting, without torch's formatter importing
torch._dynamo (1.4 s here) on the recovery path of the first fault."""

from __future__ import annotations

import subprocess
import sys

AGENT_LOGS_A_DEAD_WORKER = """
import logging, sys
import torch
from launch.agent import install_traceback_filter
install_traceback_filter()
log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")  # where torchrun logs the failure
try:
    raise RuntimeError("process 0 terminated with signal SIGKILL")
except RuntimeError:
    log.exception("failed (exitcode: -9) local_rank: 0")
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


def test_a_dead_workers_traceback_is_logged_without_importing_dynamo():
    done = subprocess.run(
        [sys.executable, "-c", AGENT_LOGS_A_DEAD_WORKER], capture_output=True, text=True, timeout=120, check=True
    )
    assert "dynamo imported: False" in done.stdout
    assert "failed (exitcode: -9) local_rank: 0" in done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "RuntimeError: process 0 terminated with signal SIGKILL" in done.stderr


def test_without_the_filter_torch_imports_dynamo_to_format_it():
    """The cost the filter avoids is real in the pinned torch (if a torch release drops it, this says so)."""
    script = AGENT_LOGS_A_DEAD_WORKER.replace("install_traceback_filter()", "")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert "dynamo imported: True" in done.stdout
