"""Replicas mode on one machine or one cluster node: its replica groups' agents, plus the quorum coordinator when
the run has none.

Each replica group (here: one worker) is its own torchrun job with its own agent and rendezvous, so a failure
restarts only that replica (its agent's ``--max-restarts``) while the others keep training; the restarted worker
heals from a live peer (``elastic.ft.replica``). Every agent gets the replica's fixed index, the coordinator's
address and its own node id, so each replica has its own L0 memory directory.

Two ways in:
* ``ecpt train`` (no node rank): every replica group of the job on this machine, indices 0..launch.replicas-1,
  and a coordinator (``launch.lighthouse``, a watched child) unless launch.lighthouse names one. If the child dies
  no replica can form a quorum, so the job stops at once with an error that says so (the replicas would otherwise
  wait up to ``launch.ft_quorum_timeout_s``). Checkpoints already written are untouched and a rerun resumes.
* a node rank N (``ecpt train --node-rank N``, or ``python -m launch.replicas_node`` in the Slurm and Kubernetes
  jobs, which read N from SLURM_NODEID or JOB_COMPLETION_INDEX): this node's share of the replica groups,
  ``launch.replica_groups_per_node`` of them numbered from N x that share, against the coordinator
  launch.lighthouse names. A node started while the job runs (a replacement, or one more up to nnodes MAX) joins
  at a step boundary and heals from a live peer. Its replicas advertise the node's hostname to their peers
  (ECPT_ADVERTISE_HOST overrides it: the pod IP on Kubernetes). Losing the coordinator then shows as replicas
  failing to form a quorum within ``launch.ft_quorum_timeout_s``, with an error that names its address.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from elastic.config import Config, ConfigError, load_config
from elastic.process_env import (
    ADVERTISE_HOST_ENV,
    COORDINATOR_FILE,
    LIGHTHOUSE_ENV,
    NODE_ID_ENV,
    REPLICA_INDEX_ENV,
    REPLICA_SLOT_ENV,
    SHARED_MACHINE_ENV,
)
from elastic.ports import free_port
from launch.local import AGENT_ENV, _terminate_with_parent, torchrun_command

COORDINATOR_LOST_EXIT = 3
LIGHTHOUSE_FILE = COORDINATOR_FILE
"""``<run_dir>/lighthouse.json``: the coordinator's address and pid (for fault plans, ``ecpt chaos`` and tests)."""
STOP_GRACE_SECONDS = 10.0
NODE_RANK_ENVS = ("SLURM_NODEID", "JOB_COMPLETION_INDEX")
"""Where a cluster node finds its rank when none is given: Slurm's node index in the allocation, and the index of a
Kubernetes Indexed Job's pod."""


def start_lighthouse(cfg: Config, run_dir: Path) -> tuple[subprocess.Popen, str]:
    """Start ``python -m launch.lighthouse`` on 127.0.0.1 and wait until it listens; (process, address)."""
    launch = cfg.launch
    address_file = run_dir / LIGHTHOUSE_FILE
    address_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "launch.lighthouse",
        "lighthouse",
        "--host=127.0.0.1",
        f"--port={free_port()}",
        f"--min-replicas={launch.min_replicas}",
        f"--heartbeat-timeout-ms={launch.ft_heartbeat_timeout_ms}",
        f"--join-timeout-ms={launch.ft_join_timeout_ms}",
        f"--address-file={address_file}",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_terminate_with_parent)
    deadline = time.monotonic() + 30
    while not address_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the quorum coordinator exited with code {proc.returncode} before listening")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the quorum coordinator did not start listening in 30 s")
        time.sleep(0.05)
    return proc, json.loads(address_file.read_text())["address"]


def replica_agent_command(cfg: Config, config_json: Path, index: int) -> list[str]:
    """One replica group's agent: a one-worker, one-node torchrun job with its own rendezvous."""
    single = copy.copy(cfg)
    single.launch = copy.copy(cfg.launch)
    single.launch.nnodes, single.launch.nproc_per_node = "1", 1
    return torchrun_command(single, config_json, f"127.0.0.1:{free_port()}", run_id=f"ecpt-replica-{index}")


def _stop(procs: list[subprocess.Popen], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every live agent's session, SIGKILL what is left after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def replica_indices(cfg: Config, node_rank: int | None) -> range:
    """The replica groups this launcher starts: all of them, or node ``node_rank``'s share."""
    launch = cfg.launch
    if node_rank is None:
        return range(launch.replica_groups)
    if not launch.lighthouse:
        raise ConfigError(
            f"node rank {node_rank} in replicas mode joins a job's coordinator: set launch.lighthouse to the "
            f"http://host:port of its `ecpt lighthouse` (only a run without a node rank starts its own)"
        )
    if not 0 <= node_rank < launch.max_nodes:
        raise ConfigError(
            f"node rank {node_rank} is outside launch.nnodes {launch.nnodes!r} (ranks 0..{launch.max_nodes - 1}): "
            f"raise nnodes MAX so the global batch is validated for every replica group that can join"
        )
    per_node = launch.replica_groups_per_node
    return range(node_rank * per_node, (node_rank + 1) * per_node)


def train_replicas(cfg: Config, config_json: Path, node_id: str | None, node_rank: int | None = None) -> int:
    """Run this machine's replica groups (and the coordinator unless launch.lighthouse names one); the exit code."""
    run_dir = Path(cfg.train.run_dir)
    indices = replica_indices(cfg, node_rank)
    threads = cfg.train.threads_per_worker or max(1, (os.cpu_count() or 1) // len(indices))  # they share the cores
    lighthouse, address = None, cfg.launch.lighthouse
    if not address:
        lighthouse, address = start_lighthouse(cfg, run_dir)
    where = "this machine" if node_rank is None else f"node rank {node_rank}"
    print(
        f"replicas mode: replica groups {indices.start}..{indices.stop - 1} of one worker on {where}, quorum "
        f"coordinator at {address}",
        flush=True,
    )
    node = node_id or os.uname().nodename
    env = {"OMP_NUM_THREADS": str(threads), "RUST_LOG": "warn", **os.environ, **AGENT_ENV, LIGHTHOUSE_ENV: address}
    if node_rank is None:
        env[ADVERTISE_HOST_ENV] = "127.0.0.1"  # every replica is on this machine: peers meet on the loopback
    if not cfg.train.threads_per_worker:
        env[SHARED_MACHINE_ENV] = str(len(indices))  # the replicas on this machine share its cores
    env.setdefault("PYTHONUNBUFFERED", "1")
    agents = [
        subprocess.Popen(
            replica_agent_command(cfg, config_json, i),
            env={**env, REPLICA_INDEX_ENV: str(i), REPLICA_SLOT_ENV: str(slot), NODE_ID_ENV: f"{node}-replica-{i}"},
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        for slot, i in enumerate(indices)
    ]
    stop_signal: list[int] = []

    def forward(signum, _frame):
        stop_signal.append(signum)
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(a.poll() is None for a in agents):
            if lighthouse is not None and lighthouse.poll() is not None and not stop_signal:
                print(
                    f"ecpt: the quorum coordinator (pid {lighthouse.pid}, {address}) exited with code "
                    f"{lighthouse.returncode}: replicas cannot form a quorum any more, so the job stops now. "
                    f"Checkpoints already written are intact; rerun `ecpt train` to resume from them.",
                    file=sys.stderr,
                    flush=True,
                )
                _stop(agents)
                return COORDINATOR_LOST_EXIT
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _stop(agents)
        if lighthouse is not None and lighthouse.poll() is None:
            lighthouse.terminate()
            lighthouse.wait()
    codes = [a.returncode for a in agents]
    finished = [i for i, c in enumerate(codes) if c == 0]
    if finished and len(finished) < len(codes):
        failed = {i: c for i, c in enumerate(codes) if c != 0}
        print(f"replicas {finished} finished the run; replicas that failed for good (exit codes): {failed}")
    return 0 if finished else next(c for c in codes if c != 0)


def node_rank_from_env(env: dict[str, str] | None = None) -> int:
    """A cluster node's rank: SLURM_NODEID or JOB_COMPLETION_INDEX, whichever the scheduler set."""
    env = os.environ if env is None else env
    for name in NODE_RANK_ENVS:
        if env.get(name, "").isdigit():
            return int(env[name])
    raise ConfigError(f"no node rank: pass --node-rank, or run under a scheduler that sets one of {NODE_RANK_ENVS}")


def main(argv: list[str] | None = None) -> int:
    """One cluster node of a replicas-mode job (the command the Slurm and Kubernetes jobs run on every node)."""
    ap = argparse.ArgumentParser(prog="python -m launch.replicas_node", description=main.__doc__)
    ap.add_argument("--config", required=True, help="the resolved config (config.json written by `ecpt launch`)")
    ap.add_argument("--node-rank", type=int, default=None, help=f"default: from {' or '.join(NODE_RANK_ENVS)}")
    ap.add_argument("--lighthouse", default="", help="the coordinator's http://host:port (default: the config's)")
    args = ap.parse_args(argv)
    overrides = [f'launch.lighthouse="{args.lighthouse}"'] if args.lighthouse else []
    try:
        cfg = load_config(args.config, overrides)
        node_rank = args.node_rank if args.node_rank is not None else node_rank_from_env()
        return train_replicas(cfg, Path(args.config), os.environ.get(NODE_ID_ENV), node_rank)
    except ConfigError as e:
        print(f"ecpt replicas node: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
