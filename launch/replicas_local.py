"""``ecpt train`` in replicas mode on this machine: the quorum coordinator plus one agent per replica group.

Each replica group (here: one worker) is its own torchrun job with its own agent and rendezvous, so a failure
restarts only that replica (its agent's ``--max-restarts``) while the others keep training; the restarted worker
heals from a live peer (``elastic.ft.replica``). Every agent gets the replica's fixed index, the coordinator's
address and its own node id, so each replica has its own L0 memory directory.

The coordinator (``launch.lighthouse``, a child process) is watched: if it dies, no replica can form a quorum,
so the job stops at once with an error that says so (the replicas would otherwise wait up to
``launch.ft_quorum_timeout_s``). Checkpoints already written are untouched and a rerun resumes from them.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from elastic.config import Config
from elastic.faults import COORDINATOR_FILE
from elastic.process_env import LIGHTHOUSE_ENV, NODE_ID_ENV, REPLICA_INDEX_ENV, SHARED_MACHINE_ENV
from elastic.world import free_port
from launch.local import AGENT_ENV, _terminate_with_parent, torchrun_command

COORDINATOR_LOST_EXIT = 3
LIGHTHOUSE_FILE = COORDINATOR_FILE
"""``<run_dir>/lighthouse.json``: the coordinator's address and pid (for fault plans, ``ecpt chaos`` and tests)."""
STOP_GRACE_SECONDS = 10.0


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
    # torchft's Rust side logs every quorum at INFO; RUST_LOG (unless the user set it) keeps warnings only
    env = {"RUST_LOG": "warn", **os.environ}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_terminate_with_parent)
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


def train_replicas(cfg: Config, config_json: Path, node_id: str | None, threads: int) -> int:
    """Run the coordinator (unless launch.lighthouse names one) and every replica's agent; the exit code."""
    run_dir = Path(cfg.train.run_dir)
    lighthouse, address = None, cfg.launch.lighthouse
    if not address:
        lighthouse, address = start_lighthouse(cfg, run_dir)
    count = cfg.launch.replica_groups
    print(f"replicas mode: {count} replica groups of one worker, quorum coordinator at {address}", flush=True)
    node = node_id or os.uname().nodename
    env = {"OMP_NUM_THREADS": str(threads), "RUST_LOG": "warn", **os.environ, **AGENT_ENV, LIGHTHOUSE_ENV: address}
    if not cfg.train.threads_per_worker:
        env[SHARED_MACHINE_ENV] = "1"  # every replica is on this machine: they share its cores
    env.setdefault("PYTHONUNBUFFERED", "1")
    agents = [
        subprocess.Popen(
            replica_agent_command(cfg, config_json, i),
            env={**env, REPLICA_INDEX_ENV: str(i), NODE_ID_ENV: f"{node}-replica-{i}"},
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        for i in range(count)
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
