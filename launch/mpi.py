"""Run the workers under ``mpiexec``: one MPI rank per worker, no torchrun agent.

The workers find their rank, world size and local rank in the MPI launcher's variables and get MASTER_ADDR/PORT from
rank 0 over MPI (``elastic.world``), then build the usual gloo/nccl group, so training is the same as under torchrun.
MPICH's (Hydra) and Open MPI's mpiexec take different flags; the flavour is read from ``mpiexec --version``.
An MPI job is not elastic: a lost rank ends the job (restart it; it resumes from the newest checkpoint).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from elastic.config import ConfigError
from launch.spec import LaunchSpec

FLAVOURS = ("mpich", "openmpi", "intel")
PASSED_ENV = ("OMP_NUM_THREADS", "PYTHONUNBUFFERED", "PYTHONPATH", "PATH", "LD_LIBRARY_PATH")
"""Variables Open MPI must be told to pass on (-x); Hydra passes the whole environment by default."""


@dataclass
class MpiOptions:
    nprocs: int
    """Total ranks (mpiexec -n)."""
    hostfile: str = ""
    """Hosts and slots (mpiexec -f for MPICH, --hostfile for Open MPI); empty = this machine."""
    mpiexec: str = ""
    """mpiexec to use; empty = the one next to this Python (the mpich wheel's), else the first on PATH."""
    extra_args: list[str] = field(default_factory=list)
    """More mpiexec flags, verbatim (e.g. --bind-to none)."""

    def validate(self) -> None:
        if self.nprocs < 1:
            raise ConfigError(f"-n must be >= 1, got {self.nprocs}")
        if self.hostfile and not Path(self.hostfile).is_file():
            raise ConfigError(
                f"--hostfile {self.hostfile} does not exist; write one host per line "
                f"(MPICH: host:slots, Open MPI: host slots=N)"
            )


def find_mpiexec(requested: str = "") -> str:
    """The venv's mpiexec (the mpich wheel installs it next to python) beats one on PATH: mpi4py matches it."""
    if requested:
        found = shutil.which(requested)
        if not found:
            raise ConfigError(f"--mpiexec {requested} is not an executable")
        return found
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.is_file() else shutil.which("mpiexec")
    if not found:
        raise ConfigError(
            "no mpiexec found: pip install 'ecpt[mpi]' (brings the mpich wheel's mpiexec), "
            "load your cluster's MPI module, or pass --mpiexec PATH"
        )
    return found


def mpi_flavour(mpiexec: str) -> str:
    """'mpich' (Hydra), 'openmpi' or 'intel' from ``mpiexec --version``; Hydra-style flags when unknown."""
    proc = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    text = (proc.stdout + proc.stderr).lower()
    if "open mpi" in text or "open-rte" in text or "openrte" in text:
        return "openmpi"
    if "intel" in text:
        return "intel"
    return "mpich"


def worker_command(spec: LaunchSpec) -> list[str]:
    """Exactly what torchrun runs per rank (see launch.local.torchrun_command), minus the agent."""
    return [sys.executable, "-m", "elastic.worker", "--config-json", str(spec.config_json)]


def mpiexec_command(
    spec: LaunchSpec, opts: MpiOptions, mpiexec: str, flavour: str, is_root: bool | None = None
) -> list[str]:
    opts.validate()
    cmd = [mpiexec, "-n", str(opts.nprocs)]
    if flavour == "openmpi":
        if opts.hostfile:
            cmd += ["--hostfile", opts.hostfile]
        if os.geteuid() == 0 if is_root is None else is_root:
            cmd += ["--allow-run-as-root"]  # Open MPI refuses root without it (containers often run as root)
        cmd += ["--oversubscribe"]  # more ranks than cores is fine for CPU workers
        for name in PASSED_ENV:
            cmd += ["-x", name]
    elif opts.hostfile:
        cmd += ["-f", opts.hostfile]
    return cmd + list(opts.extra_args) + worker_command(spec)


def threads_per_rank(spec: LaunchSpec, opts: MpiOptions) -> int:
    """Cores per local rank when all ranks share this machine; 1 is the safe guess across a hostfile."""
    if spec.cfg.train.threads_per_worker:
        return spec.cfg.train.threads_per_worker
    if opts.hostfile:
        return 1
    return max(1, (os.cpu_count() or 1) // opts.nprocs)
