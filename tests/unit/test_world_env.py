"""A worker finds its rank without flags, whoever started it: torchrun, Kubernetes, srun or mpiexec."""

from __future__ import annotations

import pytest

from elastic.world import (
    SLURM_PORT_BASE,
    WorldInfo,
    detect_world,
    ensure_master_env,
    first_host,
    mpi_master,
    place_on_nodes,
    slurm_master,
)

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "n1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "ecpt",
    "TORCHELASTIC_RESTART_COUNT": "2",
}
# torchrun started by srun (ecpt launch slurm): the agent's Slurm variables are still in the worker's environment.
TORCHRUN_UNDER_SRUN = {
    **TORCHRUN,
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_ID": "77",
    "SLURM_JOB_NODELIST": "n[1-2]",
}
# A PyTorchJob without torchrun: the operator sets RANK/WORLD_SIZE/MASTER_* itself, one process per pod.
KUBERNETES = {
    "RANK": "2",
    "WORLD_SIZE": "3",
    "MASTER_ADDR": "job-master-0",
    "MASTER_PORT": "23456",
    "KUBERNETES_SERVICE_HOST": "10.0.0.1",
    "PYTHONUNBUFFERED": "0",
}
# Inside an elastic PyTorchJob the pod runs torchrun, which sets its own variables and run id.
KUBERNETES_TORCHRUN = {**TORCHRUN, "KUBERNETES_SERVICE_HOST": "10.0.0.1", "PET_NNODES": "1:4"}
SRUN = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "6",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
    "SLURM_NODEID": "2",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[07-09]",
}
# srun -n 4 over 2 nodes without --ntasks-per-node: 3 tasks on the first node, 1 on the second (this one).
SRUN_UNEVEN = {
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "3,1",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_NODEID": "1",
    "SLURM_JOB_ID": "8",
}
# Only --ntasks-per-node's variable (an older srun, or a hand-made environment).
SRUN_NTASKS_PER_NODE = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2"}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "9"}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}
# mpiexec inside an sbatch allocation: the batch step's Slurm variables must not win over MPI's.
MPICH_UNDER_SBATCH = {**MPICH, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "9"}


@pytest.mark.parametrize(
    "env,expected",
    [
        (TORCHRUN, WorldInfo(3, 4, 1, 2, "torchrun", restart_count=2)),
        (TORCHRUN_UNDER_SRUN, WorldInfo(3, 4, 1, 2, "torchrun", restart_count=2)),
        (KUBERNETES, WorldInfo(2, 3, 0, 3, "kubernetes")),
        (KUBERNETES_TORCHRUN, WorldInfo(3, 4, 1, 2, "torchrun", restart_count=2)),
        (SRUN, WorldInfo(5, 6, 1, 2, "slurm")),
        (SRUN_UNEVEN, WorldInfo(3, 4, 0, 1, "slurm")),
        (SRUN_NTASKS_PER_NODE, WorldInfo(1, 4, 1, 2, "slurm")),
        (MPICH, WorldInfo(1, 2, 1, 2, "mpich")),
        (OPENMPI, WorldInfo(2, 4, 0, 2, "openmpi")),
        (MPICH_UNDER_SBATCH, WorldInfo(1, 2, 1, 2, "mpich")),
        ({"HOME": "/root"}, WorldInfo(0, 1, 0, 1, "single")),
    ],
    ids=[
        "torchrun",
        "torchrun-under-srun",
        "kubernetes",
        "kubernetes-torchrun",
        "srun",
        "srun-uneven",
        "srun-ntasks-per-node",
        "mpich",
        "openmpi",
        "mpich-under-sbatch",
        "single",
    ],
)
def test_detect_world(env, expected):
    assert detect_world(env) == expected


def test_ranks_are_placed_on_nodes_by_node_id_even_when_nodes_hold_different_counts():
    ids = ["n0", "n0", "n1"]  # 2 ranks on n0, 1 on n1: no local world size divides the world evenly
    assert [(p.node_index, p.node_rank, p.node_size) for p in (place_on_nodes(ids, r) for r in range(3))] == [
        (0, 0, 2),
        (0, 1, 2),
        (1, 0, 1),
    ]
    assert place_on_nodes(ids, 2).nodes == [[0, 1], [2]]
    # srun's uneven '2(x3),1' placement, and a launcher that does not number a node's ranks consecutively
    assert place_on_nodes(["a", "a", "b", "b", "c", "c", "d"], 6).nodes == [[0, 1], [2, 3], [4, 5], [6]]
    interleaved = place_on_nodes(["b", "a", "b"], 2)
    assert (interleaved.nodes, interleaved.node_index, interleaved.node_rank) == ([[0, 2], [1]], 0, 1)


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("vm", "vm"),
        ("gpu[07-09]", "gpu07"),
        ("gpu[3,5-6],cpu1", "gpu3"),
        ("cpu1,gpu[3-4]", "cpu1"),
        ("rack[1-2]-n[007-010]", "rack1-n007"),
        ("node-a[10-11].cluster", "node-a10.cluster"),
    ],
)
def test_first_host_of_slurm_hostlists(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_started_ranks_agree_on_master_without_talking():
    assert slurm_master(SRUN) == ("gpu07", SLURM_PORT_BASE + 3456)
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST"):
        slurm_master({"SLURM_PROCID": "0"})


class FakeComm:
    """Stands in for mpi4py's COMM_WORLD: records what rank 0 broadcasts."""

    def __init__(self, rank: int, size: int, from_root=None):
        self.rank, self.size, self.from_root, self.sent = rank, size, from_root, None

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, obj, root=0):
        assert root == 0
        if self.rank == 0:
            self.sent = obj
            return obj
        return self.from_root


def test_mpi_rank0_broadcasts_loopback_address_for_a_single_node_job():
    world = detect_world(MPICH | {"PMI_RANK": "0", "MPI_LOCALRANKID": "0"})
    comm = FakeComm(0, 2)
    host, port = mpi_master(world, comm)
    assert host == "127.0.0.1" and 1024 < port < 65536 and comm.sent == (host, port)
    assert mpi_master(detect_world(MPICH), FakeComm(1, 2, from_root=(host, port))) == (host, port)


def test_mpi_rank0_broadcasts_its_hostname_across_nodes(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setattr("socket.gethostname", lambda: "node17")
    world = detect_world(OPENMPI | {"OMPI_COMM_WORLD_RANK": "0"})
    assert mpi_master(world, FakeComm(0, 4))[0] == "node17"


def test_mpi4py_from_another_mpi_is_a_clear_error():
    """mpi4py linked to a different MPI than the launcher starts singletons: every process would be rank 0."""
    with pytest.raises(RuntimeError, match="different MPI"):
        mpi_master(detect_world(OPENMPI), FakeComm(0, 1))


def test_ensure_master_env_fills_in_only_what_is_missing():
    env = dict(SRUN)
    assert ensure_master_env(detect_world(env), env) == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(15000 + 3456)}
    assert env["MASTER_PORT"] == "18456"
    env = dict(TORCHRUN)
    assert ensure_master_env(detect_world(env), env) == {} and env["MASTER_ADDR"] == "n1"
    env = {"RANK": "0", "WORLD_SIZE": "2"}  # someone set ranks by hand but forgot the rendezvous
    with pytest.raises(RuntimeError, match="MASTER_PORT is not set"):
        ensure_master_env(detect_world(env), env)
