"""Start workers on this machine through torchrun's elastic agent (c10d rendezvous).

The agent runs as a child process in its own session, so the launcher decides how signals reach it: Ctrl-C or
SIGTERM to ``ecpt`` is forwarded once to the agent, which terminates its workers (and workers die with a killed
agent through PR_SET_PDEATHSIG, see ``elastic.worker``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from elastic.config import Config
from elastic.ports import free_port

# Localhost elastic settings measured on 2-core machines (docs/architecture.md, Elasticity): without them a
# rejoining agent waits for MASTER_ADDR (pytorch issue 135712), and keep_alive_max_attempt=2 led to split brain.
RDZV_CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def resolve_endpoint(cfg: Config) -> str:
    host, _, port = cfg.launch.rdzv_endpoint.rpartition(":")
    if port == "0":
        if cfg.launch.max_nodes > 1:
            raise ValueError(
                "launch.rdzv_endpoint needs an explicit port for a multi-node job "
                "(every node must reach the same host:port)"
            )
        port = str(free_port(host or "127.0.0.1"))
    return f"{host or '127.0.0.1'}:{port}"


def torchrun_command(
    cfg: Config,
    config_json: Path,
    endpoint: str,
    node_rank: int | None = None,
    run_id: str = "ecpt",
    external_store: bool = False,
) -> list[str]:
    """The elastic agent's command line (torchrun's flags). ``external_store``: the c10d store runs in its own process
    (``ecpt rdzv-store``), so losing the node whose agent would otherwise host it does not end the job."""
    rdzv_conf = RDZV_CONF + (",is_host=false" if external_store else "")
    # launch.agent is torchrun (same parser, same elastic agent) with workers forked from a preloaded server.
    cmd = [
        sys.executable,
        "-m",
        "launch.agent",
        f"--nnodes={cfg.launch.nnodes}",
        f"--nproc-per-node={cfg.launch.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf={rdzv_conf}",
        f"--max-restarts={cfg.launch.max_restarts}",
        f"--monitor-interval={cfg.launch.monitor_interval}",
    ]
    if node_rank is not None:
        cmd.append(f"--node-rank={node_rank}")
    return cmd + ["-m", "elastic.worker", "--config-json", str(config_json)]


def _terminate_with_parent() -> None:
    """In the agent, before exec: SIGTERM it if the launcher dies (even by SIGKILL), so the agent stops its
    workers instead of training on as an orphan."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_agent(cmd: list[str], extra_env: dict[str, str] | None = None, threads_per_worker: int = 1) -> int:
    """Run a torchrun agent to completion; forward SIGINT/SIGTERM to it once; return its exit code."""
    # Setting OMP_NUM_THREADS ourselves stops torchrun's oversubscription banner; workers still call
    # torch.set_num_threads from the config.
    env = {"OMP_NUM_THREADS": str(threads_per_worker), **os.environ, **AGENT_ENV, **(extra_env or {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    agent = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_terminate_with_parent)

    def forward(signum, _frame):
        if agent.poll() is None:
            os.killpg(agent.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return agent.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if agent.poll() is None:  # the launcher itself is going away: take the agent's session with it
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


def serve_rendezvous_store(host: str, port: int) -> None:
    """A standalone c10d TCPStore for elastic jobs: run it on a machine that outlives the training nodes."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(hours=24), multi_tenant=True)
    print(f"rendezvous store listening on {host}:{port}; stop it with Ctrl-C", flush=True)
    stop = signal.sigwait({signal.SIGINT, signal.SIGTERM})
    print(f"rendezvous store stopping on signal {stop}", flush=True)
    del store
