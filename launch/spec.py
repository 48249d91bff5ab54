"""One description of a cluster job, rendered by every backend (SLURM, MPI, Kubernetes).

The command-line flags of ``ecpt launch <backend>`` only decide the shape of the job (how many nodes, workers per
node, GPUs); everything about training stays in the config. ``build_spec`` folds the shape back into the config
(``launch.nnodes``, ``launch.nproc_per_node``, ...) so the resolved config the workers read and the rendered job
agree, and config validation (e.g. the global batch covering the largest world) sees the real world size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from elastic.config import DEFAULT_CONFIG_NAME, Config, ConfigError, load_config

DEFAULT_RDZV_PORT = 29400
"""torchrun's default c10d port; used when launch.rdzv_endpoint leaves the port at 0."""
DEFAULT_METRICS_PORT = 9400
"""Base port of the workers' metrics endpoints where a fixed port is needed (scrape annotations, static targets)."""
REPLICAS_BACKENDS = ("slurm", "k8s")
"""The cluster launches that can run launch.fault_tolerance = "replicas" (one replica-group launcher per node)."""
JOB_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")


@dataclass
class JobShape:
    """What the launch flags decide; the rest comes from the config."""

    max_nodes: int
    """Nodes requested (the allocation, or PyTorchJob replicas)."""
    min_nodes: int | None = None
    """Fewest nodes training continues with (torchrun --nnodes MIN:MAX); None = the config's minimum, capped."""
    gpus_per_node: int = 0
    """GPUs per node; 0 runs CPU workers over gloo."""
    nproc_per_node: int | None = None
    """Workers per node; None = one per GPU, or launch.nproc_per_node of the config on CPU nodes."""
    run_dir: str = ""
    """Overrides train.run_dir (must be on storage every node sees)."""
    metrics_host: str = ""
    """Overrides metrics.host (0.0.0.0 on clusters, so Prometheus on another host can scrape)."""
    metrics_port: int = -1
    """Overrides metrics.port when >= 0 (a fixed port is needed for static targets and pod annotations)."""

    def validate(self) -> None:
        if self.max_nodes < 1:
            raise ConfigError(f"--nodes/--max-nodes must be >= 1, got {self.max_nodes}")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.max_nodes:
            raise ConfigError(f"--min-nodes must be in [1, {self.max_nodes}] (the maximum), got {self.min_nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be >= 0 (0 = CPU nodes, gloo), got {self.gpus_per_node}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")


@dataclass
class LaunchSpec:
    """A job every backend renders: the resolved config plus where the workers find it."""

    cfg: Config
    """The resolved config; its launch section carries the job shape."""
    config_json: str
    """Path of the resolved config as the workers see it (shared storage, or the container's mount)."""
    job_name: str
    """Slurm job name, PyTorchJob name and c10d rendezvous id."""
    gpus_per_node: int = 0
    """GPUs per node; 0 = CPU workers over gloo."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the agents and workers."""

    @property
    def min_nodes(self) -> int:
        return self.cfg.launch.min_nodes

    @property
    def max_nodes(self) -> int:
        return self.cfg.launch.max_nodes

    @property
    def nnodes(self) -> str:
        """torchrun's --nnodes, always MIN:MAX so the agents tolerate losing nodes down to MIN."""
        return f"{self.min_nodes}:{self.max_nodes}"

    @property
    def elastic(self) -> bool:
        return self.min_nodes < self.max_nodes

    @property
    def replicas(self) -> bool:
        """launch.fault_tolerance = "replicas": every node runs its replica groups against one coordinator."""
        return self.cfg.launch.fault_tolerance == "replicas"

    @property
    def nproc_per_node(self) -> int:
        return self.cfg.launch.nproc_per_node

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus_per_node else "gloo"

    @property
    def rdzv_port(self) -> int:
        """The c10d port from launch.rdzv_endpoint, or torchrun's default when that says 0."""
        port = int(self.cfg.launch.rdzv_endpoint.rpartition(":")[2] or 0)
        return port or DEFAULT_RDZV_PORT

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)


def default_job_name(config_path: str | None) -> str:
    """'configs/tiny-cpu.toml' -> 'ecpt-tiny-cpu' (lower case, dashes: valid for Slurm and Kubernetes)."""
    stem = Path(config_path).stem if config_path else DEFAULT_CONFIG_NAME
    return "ecpt-" + (re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "job")


def check_job_name(name: str) -> str:
    if not JOB_NAME_RE.match(name):
        raise ConfigError(
            f"--job-name {name!r} must be lower-case letters, digits and '-', start and end with a "
            f"letter or digit, at most 52 characters (it names Kubernetes objects and the rendezvous)"
        )
    return name


def shape_overrides(cfg: Config, shape: JobShape) -> list[str]:
    """--set style overrides that write the job shape into the config."""
    shape.validate()
    cfg_min = cfg.launch.min_nodes if ":" in cfg.launch.nnodes else 1
    min_nodes = min(cfg_min, shape.max_nodes) if shape.min_nodes is None else shape.min_nodes
    nproc = shape.nproc_per_node or shape.gpus_per_node or cfg.launch.nproc_per_node  # validated: None or >= 1
    out = [f'launch.nnodes="{min_nodes}:{shape.max_nodes}"', f"launch.nproc_per_node={nproc}"]
    if shape.run_dir:
        out.append(f'train.run_dir="{shape.run_dir}"')
    if shape.metrics_host:
        out.append(f'metrics.host="{shape.metrics_host}"')
    if shape.metrics_port >= 0:
        out.append(f"metrics.port={shape.metrics_port}")
    return out


def load_with_shape(config: str | None, overrides: list[str], shape: JobShape, backend: str) -> Config:
    """Load the config, apply the user's --set overrides, then the job shape (which wins), and validate."""
    base = load_config(config, overrides)
    if base.launch.fault_tolerance == "replicas" and backend not in REPLICAS_BACKENDS:
        raise ConfigError(
            f'launch.fault_tolerance = "replicas" is not supported by `ecpt launch {backend}`: mpirun starts every '
            f"worker as one job, so one failure ends them all. Use `ecpt launch slurm` or `ecpt launch k8s`, or the "
            f'restart mode (launch.fault_tolerance = "restart") with {backend}'
        )
    return load_config(config, [*overrides, *shape_overrides(base, shape)])
