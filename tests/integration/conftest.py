"""Real components for integration tests, as session or per-test fixtures: a private single-node Slurm cluster and
Prometheus servers on 127.0.0.1, their Debian packages installed on demand (support.packages, support.slurm,
support.prometheus hold the machinery)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.packages import ensure_debian_packages
from support.prometheus import PrometheusServer, start_prometheus
from support.slurm import start_slurm_cluster, stop_slurm_cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private single-node Slurm cluster (slurmctld + slurmd + munged on 127.0.0.1) for the whole session."""
    ensure_debian_packages(
        ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged", "mungekey"], ["slurm-wlm", "munge"]
    )
    if os.geteuid() != 0:
        pytest.skip("a private Slurm cluster needs root (slurmd runs jobs as their users)")
    cluster = start_slurm_cluster()
    try:
        yield cluster
    finally:
        stop_slurm_cluster(cluster)


@pytest.fixture(scope="session")
def promtool() -> str:
    return ensure_debian_packages(["promtool", "prometheus"], ["prometheus"])["promtool"]


@pytest.fixture
def prometheus_server(promtool, tmp_path):
    """Factory: start a real Prometheus on 127.0.0.1 (free port, temporary storage) with a given config file; every
    server started is stopped at teardown."""
    started: list[PrometheusServer] = []

    def start(config: Path) -> PrometheusServer:
        started.append(start_prometheus(config, tmp_path))
        return started[-1]

    yield start
    for server in started:
        server.stop()
