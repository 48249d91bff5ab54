"""The node-loss scenario shared by the fault tests: simulated nodes (one `ecpt train` agent each) at a standalone
rendezvous store, one of them killed and started again. A failure shows every agent's log."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from elastic.world import free_port
from support.processes import REPO, ecpt_command
from support.trajectory import step_rows
from support.waiting import wait_for

NODE_WAIT = 120
"""Seconds each stage of the scenario may take on a loaded 2-core machine (see node_loss_budget)."""


def node_loss_budget(wait: float = NODE_WAIT) -> float:
    """The longest lose_and_rejoin_node(timeout=wait) can take: its sequential waits (n1 killed, shrink, grow,
    n0 finishing in 2 x wait, n1 finishing in wait / 2)."""
    return wait + wait + wait + 2 * wait + wait / 2


def start_rendezvous_store() -> tuple[str, subprocess.Popen]:
    """A standalone `ecpt rdzv-store` on a free port of 127.0.0.1 (no agent hosts the store, so losing any node does
    not end the job); returns its endpoint once it is listening, and the process (its own session: kill its group)."""
    port = free_port()
    store = subprocess.Popen(
        ecpt_command(["rdzv-store", "--port", str(port)]),
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line = store.stdout.readline()
    if "listening" not in line:
        store.kill()
        raise AssertionError(f"ecpt rdzv-store on port {port} did not start: {line!r}")
    return f"127.0.0.1:{port}", store


def start_node(
    config: Path,
    run: Path,
    node: str,
    endpoint: str,
    log: Path,
    faults: list[str],
    nproc: int = 1,
    nnodes: str = "1:2",
    overrides: tuple[str, ...] = (),
) -> subprocess.Popen:
    """One simulated node: its own `ecpt train` agent with ``nproc`` workers, joining the job of ``nnodes`` nodes at
    the external store ``endpoint``, with the fault plan ``faults`` (every node gets the same plan; each fault fires
    once per run) and ``--set`` ``overrides``."""
    return subprocess.Popen(
        ecpt_command(
            [
                "train",
                "--config",
                str(config),
                "--run-dir",
                str(run),
                "--nnodes",
                nnodes,
                "--nproc-per-node",
                str(nproc),
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-store",
                "external",
                "--node-id",
                node,
                *(arg for f in faults for arg in ("--fault", f)),
                *(arg for o in overrides for arg in ("--set", o)),
            ]
        ),
        cwd=REPO,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def lose_and_rejoin_node(
    config: Path, run: Path, logs: Path, kill_step: int, extra_faults: tuple[str, ...] = (), timeout: float = NODE_WAIT
) -> None:
    """The node-loss scenario: a standalone rendezvous store and two simulated nodes n0, n1 (one worker each);
    n1 is killed at ``kill_step``, the job must shrink to world 1, n1's command is started again, the job must grow
    back to world 2 and both agents must finish with exit code 0. ``extra_faults`` join the plan of every node.
    Agent logs go to ``logs/<node>.log``; when any stage fails, the failure carries the tail of each of them."""
    agent_logs = [logs / "n0.log", logs / "n1.log", logs / "n1-again.log"]
    endpoint, store = start_rendezvous_store()
    nodes = []
    try:
        faults = [f"kill node n1 at step {kill_step}", *extra_faults]
        nodes = [start_node(config, run, n, endpoint, log, faults) for n, log in zip(("n0", "n1"), agent_logs)]
        assert nodes[1].wait(timeout=timeout) != 0, "node n1's agent outlived its kill"
        killed = time.time()
        # after the kill: a late first join can also give world-1 steps at the start (see node_resizes)
        wait_for(
            lambda: any(r["world_size"] == 1 and r["time"] > killed for r in step_rows(run)),
            timeout,
            "the job to shrink to 1 node",
            nodes[0],
        )
        nodes[1] = start_node(config, run, "n1", endpoint, agent_logs[2], faults)
        wait_for(
            lambda: [r for r in step_rows(run) if r["world_size"] == 2 and r["step"] > kill_step],
            timeout,
            "the job to grow back to 2 nodes",
            nodes[0],
        )
        assert nodes[0].wait(timeout=2 * timeout) == 0, "node n0's agent failed"
        assert nodes[1].wait(timeout=timeout / 2) == 0, "node n1's restarted agent failed"
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        raise AssertionError(f"node-loss scenario: {exc}{_tails(agent_logs)}") from exc
    finally:
        for p in [*nodes, store]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def _tails(logs: list[Path], chars: int = 3000) -> str:
    return "".join(
        f"\n--- {log.name} (last {chars} characters) ---\n{log.read_text(errors='replace')[-chars:]}"
        for log in logs
        if log.exists()
    )
