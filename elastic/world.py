"""Who am I in the job: rank, world size and node, whatever started this process; and the process groups.

torchrun (and Kubernetes' PyTorchJob, which runs torchrun) sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.
srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; mpiexec sets PMI_* (MPICH, Intel MPI) or OMPI_COMM_WORLD_*
(Open MPI). Workers read these here and never import ``launch/``. Training uses nccl when CUDA is available and gloo
otherwise; checkpoint collectives always get their own gloo group so they never queue behind training collectives.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# (rank, world size, local rank, local world size) variable names per launcher, most specific first.
ENV_SCHEMES = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    """Which environment the ranks came from: torchrun, openmpi, mpich, slurm or single."""
    restart_count: int = 0
    """torchrun's TORCHELASTIC_RESTART_COUNT: how many times the worker group was restarted."""

    @property
    def node_index(self) -> int:
        return self.rank // max(self.local_world_size, 1)


def _local_size(value: str | None, world_size: int) -> int:
    """SLURM_NTASKS_PER_NODE can read '2(x3)'; the first number is what this node runs."""
    if not value:
        return world_size
    return int(value.split("(")[0].split(",")[0])


def detect_world(env: dict[str, str] | None = None) -> WorldInfo:
    env = dict(os.environ if env is None else env)
    restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for name, rank_key, size_key, local_key, local_size_key in ENV_SCHEMES:
        if rank_key in env and size_key in env:
            world_size = int(env[size_key])
            return WorldInfo(rank=int(env[rank_key]), world_size=world_size,
                             local_rank=int(env.get(local_key, "0")),
                             local_world_size=_local_size(env.get(local_size_key), world_size),
                             launcher=name, restart_count=restarts)
    return WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def training_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(world: WorldInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


@dataclass
class ProcessGroups:
    """The default (training) group plus the groups checkpoint collectives use."""

    ckpt: dist.ProcessGroup | None
    """All ranks, gloo: checkpoint commit and load agreement."""
    node: dist.ProcessGroup | None
    """This node's ranks, gloo: node-local checkpoint levels."""


def init_distributed(world: WorldInfo, timeout_s: float = 600.0) -> ProcessGroups:
    """Join the job's process group (env:// rendezvous) and create the checkpoint groups."""
    if world.world_size == 1:
        return ProcessGroups(ckpt=None, node=None)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise RuntimeError("MASTER_PORT is not set: start workers with torchrun, srun + ecpt, or mpiexec + ecpt, "
                           "which set it")
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend=training_backend(), rank=world.rank, world_size=world.world_size,
                            timeout=timeout)
    ckpt = dist.new_group(backend="gloo", timeout=timeout)
    node = None
    if world.local_world_size < world.world_size and world.world_size % world.local_world_size == 0:
        # Every rank must create every subgroup, in the same order.
        node, _ = dist.new_subgroups(group_size=world.local_world_size, backend="gloo", timeout=timeout)
    return ProcessGroups(ckpt=ckpt, node=node)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
