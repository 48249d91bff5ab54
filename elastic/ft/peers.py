"""How a replica is named and reached: its fixed index, the quorum coordinator's address, the cross-replica process
group that advertises this node's host, and the run's progress mark that a returning replica checks itself against.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from elastic.process_env import LIGHTHOUSE_ENV, REPLICA_INDEX_ENV


class ProgressMark:
    """``<run_dir>/replicas/progress.json``: the newest step a quorum leader committed (one small atomic write per
    step), so a replica returning from a freeze can tell that the run went on without it."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, self.path)

    def read(self) -> int:
        try:
            return int(json.loads(self.path.read_text())["step"])
        except FileNotFoundError:
            return 0


def replica_index(env: dict[str, str] | None = None) -> int:
    """This replica group's fixed index, set by the launcher (``ECPT_REPLICA_INDEX``)."""
    env = os.environ if env is None else env
    value = env.get(REPLICA_INDEX_ENV)
    if value is None or not value.isdigit():
        raise RuntimeError(
            f'launch.fault_tolerance = "replicas" but {REPLICA_INDEX_ENV} is {value!r}: start replicas with '
            f"`ecpt train` (or set {REPLICA_INDEX_ENV}=<0, 1, ...> per replica group and {LIGHTHOUSE_ENV})"
        )
    return int(value)


def lighthouse_address(cfg) -> str:
    address = cfg.launch.lighthouse or os.environ.get(LIGHTHOUSE_ENV, "")
    if not address:
        raise RuntimeError(
            f'launch.fault_tolerance = "replicas" needs the quorum coordinator: set launch.lighthouse or '
            f"{LIGHTHOUSE_ENV} to http://host:port of an `ecpt lighthouse`"
        )
    return address


def advertised_process_group(timeout: timedelta, host: str):
    """torchft's reconfigurable group (nccl on GPUs, gloo on CPU) whose reconfigure handle names ``host``.

    Peers rebuild the group on the store named in each member's handle, and torchft writes the process's
    ``socket.gethostname()`` there, which other pods of a Kubernetes job cannot resolve."""
    from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

    base = ProcessGroupNCCL if torch.cuda.is_available() else ProcessGroupGloo

    class AdvertisedProcessGroup(base):
        def get_reconfigure_handle(self) -> str:
            handle = json.loads(super().get_reconfigure_handle())
            handle["store"] = f"{host}:{handle['store'].rpartition(':')[2]}"
            return json.dumps(handle)

    return AdvertisedProcessGroup(timeout=timeout)
