"""Nodes with different numbers of ranks, end to end: two `ecpt train` agents on this machine share one c10d
rendezvous as nodes n0 (2 workers) and n1 (1 worker), with node-local L0 checkpoints in memory and a shared L1.

No local world size divides the world of 3 evenly, so the node groups (and each node's copy of L0) must come from
the ranks' node ids. What a user cares about: the job trains at world size 3 to its last step, each node keeps its
own complete L0 copies, and running the job again resumes at exactly the step the first run ended on.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
from pathlib import Path

import pytest

from checkpointing import committed_steps
from checkpointing.manifest import read_manifest
from elastic.metrics import read_jsonl
from support.configs import write_toml
from support.faults import start_node, start_rendezvous_store

NODES = {"n0": 2, "n1": 1}  # node id -> workers on that node
WORLD = sum(NODES.values())
JOB_TIMEOUT = 300.0
"""Seconds one job (rendezvous, 8 or 4 steps of a tiny model on 3 workers, checkpoints) may take on a loaded box."""


def _config(raw: dict, tmp_path: Path) -> Path:
    raw = copy.deepcopy(raw)
    raw["checkpoint"] = {"interval": 3, "keep_last": 2, "l0_interval": 1, "l0_dir": str(tmp_path / "shm")}
    raw["launch"]["monitor_interval"] = 0.2
    return write_toml(raw, tmp_path / "cfg.toml")


def _run_job(config: Path, run: Path, logs: Path, max_steps: int) -> None:
    """One job on the two uneven nodes, each agent started the way a user starts it on its own machine, with a
    standalone rendezvous store of its own; both agents must finish with exit code 0."""
    endpoint, store = start_rendezvous_store()
    agents: dict[str, subprocess.Popen] = {}
    try:
        for node, nproc in NODES.items():
            log = logs / f"{node}-max{max_steps}.log"
            agents[node] = start_node(
                config,
                run,
                node,
                endpoint,
                log,
                faults=[],
                nproc=nproc,
                nnodes="2",
                overrides=(f"train.max_steps={max_steps}",),
            )
        for node, agent in agents.items():
            log = logs / f"{node}-max{max_steps}.log"
            assert agent.wait(timeout=JOB_TIMEOUT) == 0, f"agent of {node} failed:\n{log.read_text()[-4000:]}"
    finally:
        for p in [*agents.values(), store]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_three_ranks_on_two_uneven_nodes_train_checkpoint_and_resume(tiny_raw, tmp_path):
    config, run = _config(tiny_raw, tmp_path), tmp_path / "run"

    _run_job(config, run, tmp_path, max_steps=8)
    metrics = run / "metrics.jsonl"
    starts = read_jsonl(metrics, "start")
    assert [(r["step"], r["world_size"]) for r in starts] == [(0, WORLD)]  # one start: no worker-group restart
    assert not read_jsonl(metrics, "resume")
    steps = read_jsonl(metrics, "step")
    assert [r["step"] for r in steps] == list(range(1, 9)) and {r["world_size"] for r in steps} == {WORLD}

    # every node holds its own L0 copies (<l0_dir>/<run key>-<run id>/<node id>, beside the nodes' owner records),
    # complete and committed by that node; step 8 is on no slower level, so finishing the run keeps it in memory
    l0_roots = {root.name: root for root in (tmp_path / "shm").glob("*/*") if root.is_dir()}
    assert sorted(l0_roots) == sorted(NODES)
    for node, root in l0_roots.items():
        committed = committed_steps(root)
        assert committed and committed[-1][0] == 8, (node, committed)
        manifest = read_manifest(committed[-1][1])
        assert (manifest.node_id, manifest.node_local, manifest.world_size) == (node, True, WORLD)
        assert manifest.complete, f"{node}'s L0 copy of step 8 is missing chunks"
    assert [s for s, _ in committed_steps(run / "checkpoints")] == [3, 6]  # L1, shared by all ranks

    _run_job(config, run, tmp_path, max_steps=12)
    resumes = read_jsonl(metrics, "resume")
    assert len(resumes) == 1, resumes
    assert (resumes[0]["step"], resumes[0]["level"]) == (8, "L0")
    assert (resumes[0]["world_size"], resumes[0]["saved_world_size"], resumes[0]["steps_lost"]) == (WORLD, WORLD, 0)
    steps = read_jsonl(metrics, "step")
    assert [r["step"] for r in steps] == list(range(1, 13)) and {r["world_size"] for r in steps} == {WORLD}
