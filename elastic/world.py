"""Who am I in the job: rank, world size and node, whatever started this process; and the process groups.

torchrun (and Kubernetes' PyTorchJob, which runs torchrun or sets RANK/WORLD_SIZE itself) sets
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; mpiexec sets
PMI_* (MPICH, Intel MPI) or OMPI_COMM_WORLD_* (Open MPI). Workers read these here and never import ``launch/``.
When mpiexec or srun started the workers directly there is no MASTER_ADDR/MASTER_PORT: under MPI rank 0 picks them
and broadcasts them over MPI (mpi4py); under srun they follow from the job (first node, port from the job id).
A CPU build of torch has no MPI backend, so the ranks MPI assigned always build a gloo (or nccl) group.
Training uses nccl when CUDA is available and gloo otherwise; checkpoint collectives always get their own gloo group
so they never queue behind training collectives.

Nodes may hold different numbers of ranks (2 on one node, 1 on another): which ranks share a node is learnt from
every rank's ``node_id()``, gathered at start-up, never computed from rank arithmetic on a local world size.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from checkpointing.comm import Comm
from elastic.ports import free_port  # noqa: F401 (re-exported: launchers and tests import it from here)
from elastic.process_env import node_id

# (rank, world size, local rank, local world size) variable names per launcher, most specific first.
ENV_SCHEMES = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    (
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
)
SLURM_TASKS_PER_NODE_KEYS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
"""srun always sets the step's tasks per node ('2(x3),1'); --ntasks-per-node alone sets the last one."""


class RankLogger(logging.LoggerAdapter):
    """Prefixes every line with ``[rank r step s]`` (``step -`` before the first step is known), so the
    interleaved logs of many ranks stay readable. The trainer sets ``step`` as it goes."""

    def __init__(self, logger: logging.Logger, rank: int, step: int | None = None):
        super().__init__(logger, {})
        self.rank, self.step = rank, step

    def process(self, msg, kwargs):
        return f"[rank {self.rank} step {'-' if self.step is None else self.step}] {msg}", kwargs


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    """Which environment the ranks came from: torchrun, kubernetes, openmpi, mpich, slurm or single."""
    restart_count: int = 0
    """torchrun's TORCHELASTIC_RESTART_COUNT: how many times the worker group was restarted."""


def _local_size(value: str | None, world_size: int, node: int = 0) -> int:
    """Tasks on this node; Slurm writes per-node counts compressed: '2(x3),1' is 2, 2, 2, 1 for nodes 0..3."""
    if not value:
        return world_size
    counts = []
    for part in value.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[min(node, len(counts) - 1)]


def _slurm_local_size(env: dict[str, str], world_size: int) -> int:
    value = next((env[k] for k in SLURM_TASKS_PER_NODE_KEYS if env.get(k)), None)
    return _local_size(value, world_size, int(env.get("SLURM_NODEID", "0")))


def _launcher_name(scheme: str, env: dict[str, str]) -> str:
    """A non-elastic PyTorchJob sets torchrun's variables itself (one process per pod, no torchrun run id)."""
    if scheme == "torchrun" and "TORCHELASTIC_RUN_ID" not in env and "KUBERNETES_SERVICE_HOST" in env:
        return "kubernetes"
    return scheme


def detect_world(env: dict[str, str] | None = None) -> WorldInfo:
    """Rank and sizes from the first launcher whose variables are present (torchrun inside srun or mpiexec inside
    sbatch both leave the outer launcher's variables around, hence the order of ENV_SCHEMES)."""
    env = dict(os.environ if env is None else env)
    restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for name, rank_key, size_key, local_key, local_size_key in ENV_SCHEMES:
        if rank_key in env and size_key in env:
            world_size = int(env[size_key])
            local_size = (
                _slurm_local_size(env, world_size)
                if name == "slurm"
                else _local_size(env.get(local_size_key), world_size)
            )
            return WorldInfo(
                rank=int(env[rank_key]),
                world_size=world_size,
                local_rank=int(env.get(local_key, "0")),
                local_world_size=local_size,
                launcher=_launcher_name(name, env),
                restart_count=restarts,
            )
    return WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")


# --------------------------------------------------------------------------------------------------------------
# MASTER_ADDR/MASTER_PORT for ranks that mpiexec or srun started directly (torchrun and PyTorchJob set them).

SLURM_PORT_BASE = 15000
"""srun-started ranks use MASTER_PORT = 15000 + the last four digits of the job id (the convention Lightning uses),
so two jobs sharing a node do not collide and every rank computes the same port without talking."""


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: 'gpu[03-05,9],cpu1' -> 'gpu03', 'r[1-2]-n[07-08]' -> 'r1-n07'.

    Plain string work, so a worker needs neither ``scontrol`` nor a Slurm client library."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    host = nodelist[:end]
    while "[" in host:
        start = host.index("[")
        stop = host.index("]", start)
        first = host[start + 1 : stop].split(",")[0].split("-")[0]
        host = host[:start] + first + host[stop + 1 :]
    return host


def slurm_master(env: dict[str, str]) -> tuple[str, int]:
    """Rendezvous address of srun-started ranks: the job's first node and a port derived from the job id."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not nodelist or not job_id:
        raise RuntimeError(
            "srun started this worker but SLURM_JOB_NODELIST/SLURM_JOB_ID are missing; set "
            "MASTER_ADDR and MASTER_PORT for every rank, or start workers with `ecpt launch slurm`"
        )
    return first_host(nodelist), SLURM_PORT_BASE + int(job_id[-4:])


def mpi_master(world: WorldInfo, comm=None) -> tuple[str, int]:
    """Rank 0 picks the rendezvous address and a free port and broadcasts them to every rank over MPI.

    ``comm`` defaults to mpi4py's COMM_WORLD; importing mpi4py initialises MPI, which is why this runs only when
    mpiexec started the worker and no MASTER_PORT was given."""
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise RuntimeError(
                f"mpiexec ({world.launcher}) started this worker without MASTER_ADDR/MASTER_PORT and mpi4py is not "
                f"installed: pip install 'ecpt[mpi]' (mpi4py built for the MPI that mpiexec belongs to), or pass "
                f"MASTER_ADDR and MASTER_PORT to every rank (mpiexec -genv NAME VALUE, Open MPI: -x NAME=VALUE)"
            ) from exc
        comm = MPI.COMM_WORLD
    if comm.Get_size() != world.world_size or comm.Get_rank() != world.rank:
        raise RuntimeError(
            f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()} but the {world.launcher} launcher says rank "
            f"{world.rank} of {world.world_size}: mpi4py is linked to a different MPI than this mpiexec; use the "
            f"mpiexec of the MPI mpi4py was built with (python -c 'import mpi4py; print(mpi4py.get_config())')"
        )
    payload = None
    if world.rank == 0:
        single_node = world.local_world_size >= world.world_size
        host = "127.0.0.1" if single_node else os.environ.get("MASTER_ADDR") or socket.gethostname()
        payload = (host, free_port("127.0.0.1" if single_node else ""))
    host, port = comm.bcast(payload, root=0)
    return host, int(port)


def ensure_master_env(world: WorldInfo, env: dict[str, str] | None = None) -> dict[str, str]:
    """Fill in MASTER_ADDR/MASTER_PORT where the launcher did not (mpiexec, srun); returns what was set."""
    env = os.environ if env is None else env
    if "MASTER_PORT" in env or world.world_size == 1:
        return {}
    if world.launcher in ("openmpi", "mpich"):
        host, port = mpi_master(world)
    elif world.launcher == "slurm":
        host, port = slurm_master(dict(env))
    else:
        raise RuntimeError(
            f"MASTER_PORT is not set for a {world.launcher} world of {world.world_size} ranks: start "
            f"workers with torchrun (ecpt train), srun (ecpt launch slurm) or mpiexec "
            f"(ecpt launch mpi), which provide it, or export MASTER_ADDR and MASTER_PORT"
        )
    added = {"MASTER_ADDR": env.get("MASTER_ADDR") or host, "MASTER_PORT": str(port)}
    env.update(added)
    return added


def training_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(world: WorldInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


@dataclass
class ProcessGroups:
    """The default (training) group plus the groups checkpoint collectives use, and where this rank sits among
    the job's nodes (from the gathered node ids, so nodes may hold different numbers of ranks)."""

    ckpt: dist.ProcessGroup | None
    """All ranks, gloo: checkpoint commit and load agreement."""
    node: dist.ProcessGroup | None
    """This node's ranks, gloo: node-local checkpoint levels. None when the whole job is on one node (the ckpt
    group is then the node's group) or is a single process."""
    node_rank: int = 0
    """This rank's position among its node's ranks (ordered by global rank): its rank in ``node``."""
    node_size: int = 1
    """How many ranks share this rank's node."""
    node_index: int = 0
    """This node's position among the job's nodes, ordered by their lowest rank."""


@dataclass(frozen=True)
class NodePlacement:
    """Which ranks share a node, derived from every rank's node id."""

    nodes: list[list[int]]
    """The ranks of every node (ascending), nodes ordered by their lowest rank: the same list on every rank."""
    node_index: int
    """This rank's node: an index into ``nodes``."""
    node_rank: int
    """This rank's position within its node."""

    @property
    def node_size(self) -> int:
        return len(self.nodes[self.node_index])


def place_on_nodes(node_ids: list[str], rank: int) -> NodePlacement:
    """Group ranks by node id (``node_ids[r]`` is rank r's); any number of ranks per node."""
    members: dict[str, list[int]] = {}
    for r, node in enumerate(node_ids):
        members.setdefault(node, []).append(r)
    nodes = list(members.values())  # insertion order: ordered by each node's lowest rank
    mine = members[node_ids[rank]]
    return NodePlacement(nodes=nodes, node_index=nodes.index(mine), node_rank=mine.index(rank))


def init_distributed(world: WorldInfo, timeout_s: float = 600.0) -> ProcessGroups:
    """Join the job's process group (env:// rendezvous) and create the checkpoint groups."""
    if world.world_size == 1:
        return ProcessGroups(ckpt=None, node=None)
    ensure_master_env(world)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend=training_backend(), rank=world.rank, world_size=world.world_size, timeout=timeout)
    ckpt = dist.new_group(backend="gloo", timeout=timeout)
    # JSON over the gloo group (no pickled objects): every rank learns every rank's node id
    node_ids = Comm(ckpt, world.rank, world.world_size).all_gather_json(node_id())
    placement = place_on_nodes(node_ids, world.rank)
    node = None
    if len(placement.nodes) > 1:
        # new_group is collective over the whole job: every rank creates every node's group, in the same order
        for index, ranks in enumerate(placement.nodes):
            group = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
            if index == placement.node_index:
                node = group
    return ProcessGroups(
        ckpt=ckpt,
        node=node,
        node_rank=placement.node_rank,
        node_size=placement.node_size,
        node_index=placement.node_index,
    )


def shutdown_distributed() -> None:
    """Leave the job together: a rank that tears down its gloo group while a peer is still tearing down can make
    that peer exit non-zero, which torchrun answers with a needless restart of a finished job."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
