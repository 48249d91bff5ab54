"""Render and submit an sbatch script: one torchrun elastic agent per node, c10d rendezvous on the first node.

The script is what an experienced Slurm user would write by hand:
- ``srun --ntasks-per-node=1`` starts one agent per node; the agents meet at the first node of the allocation
  (``scontrol show hostnames``) and run the same ``python -m launch.agent ... -m elastic.worker`` command line as
  ``ecpt train`` (``launch.local.torchrun_command``; torchrun's agent and flags), with ``--nnodes MIN:MAX``.
- ``--signal=B:USR1@S`` warns the batch shell S seconds before the time limit; its trap forwards USR1 to the job
  step, where every worker stops at the next step boundary (after its emergency checkpoint), then the script
  requeues the job (``--requeue``); the rerun sees SLURM_RESTART_COUNT and resumes from the newest checkpoint.
- The torchrun agents ignore USR1 (``trap '' USR1`` before ``exec``): Slurm signals every process of the step,
  and an agent killed by USR1's default action would take its workers down before they could checkpoint.

In replicas mode (``launch.fault_tolerance = "replicas"``) the batch shell also starts the quorum coordinator
(``ecpt lighthouse``) on the first node, and srun runs ``python -m launch.replicas_node`` on every node instead of one
agent: each node starts its share of the replica groups (one torchrun agent per replica group, node rank from
SLURM_NODEID). A node that fails leaves the quorum and the others go on at the next step; the coordinator lives as
long as the batch shell, like the c10d rendezvous of the restart mode lives on the first node.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from elastic.config import ConfigError
from launch.local import torchrun_command
from launch.spec import LaunchSpec

RDZV_PLACEHOLDER = "@ECPT_RDZV_ENDPOINT@"
RUN_ID_PLACEHOLDER = "@ECPT_RUN_ID@"
LIGHTHOUSE_PLACEHOLDER = "@ECPT_LIGHTHOUSE@"
_SHELL_VALUES = {
    RDZV_PLACEHOLDER: "${rdzv_host}:${rdzv_port}",
    RUN_ID_PLACEHOLDER: "${SLURM_JOB_ID}",
    LIGHTHOUSE_PLACEHOLDER: "http://${rdzv_host}:${lighthouse_port}",
}
LIGHTHOUSE_PORT_BASE = 29510
"""The coordinator listens on LIGHTHOUSE_PORT_BASE + job id % 1000, so jobs sharing a node do not collide."""
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time(text: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (sbatch --time formats)."""
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ConfigError(
            f"--time {text!r} is not a Slurm time: use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60


@dataclass
class SlurmOptions:
    time: str
    """sbatch --time (the job's wall-time limit)."""
    partition: str = ""
    """sbatch --partition; empty = the cluster's default partition."""
    account: str = ""
    """sbatch --account; empty = the user's default account."""
    signal_seconds: int = 120
    """USR1 reaches the batch shell this long before the time limit (Slurm may send it up to a minute earlier)."""
    cpus_per_node: int = 0
    """CPUs for the agent and its workers on each node; 0 = --exclusive (the whole node)."""
    requeue_on_signal: bool = True
    """After a USR1-triggered stop the script requeues the job so it resumes from its checkpoint."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More #SBATCH options, verbatim (e.g. --constraint=a100, --qos=high)."""

    def validate(self) -> None:
        limit = parse_slurm_time(self.time)
        if limit <= 0:
            raise ConfigError(f"--time must be positive, got {self.time!r}")
        if not 0 < self.signal_seconds < limit:
            raise ConfigError(
                f"--signal-seconds ({self.signal_seconds}) must be > 0 and below the time limit "
                f"--time {self.time} = {limit} s, or the checkpoint warning would never fit"
            )
        if self.cpus_per_node < 0:
            raise ConfigError(f"--cpus-per-node must be >= 0 (0 = whole node), got {self.cpus_per_node}")


def _shell_word(word: str) -> str:
    """Quote one argument; placeholders become shell variables inside double quotes."""
    if any(p in word for p in _SHELL_VALUES):
        for placeholder, value in _SHELL_VALUES.items():
            word = word.replace(placeholder, value)
        return f'"{word}"'
    return shlex.quote(word)


def _command_lines(cmd: list[str]) -> list[str]:
    """Quoted words grouped one option per line: long torchrun command lines stay readable in the script."""
    lines: list[list[str]] = [[]]
    seen_module = False
    for word in cmd:
        starts_option = word.startswith("--") or (word == "-m" and seen_module)
        seen_module = seen_module or word == "-m"
        if starts_option and lines[-1]:
            lines.append([])
        lines[-1].append(_shell_word(word))
    return [" ".join(line) for line in lines]


def agent_command(spec: LaunchSpec) -> list[str]:
    """What srun runs on every node: the same torchrun command line as ``ecpt train``, with the rendezvous and run
    id left to the shell; in replicas mode, the node's replica groups against the job's coordinator."""
    if spec.replicas:
        return [
            sys.executable,
            "-m",
            "launch.replicas_node",
            f"--config={spec.config_json}",
            f"--lighthouse={LIGHTHOUSE_PLACEHOLDER}",
        ]
    return torchrun_command(spec.cfg, Path(spec.config_json), RDZV_PLACEHOLDER, run_id=RUN_ID_PLACEHOLDER)


def _lighthouse_lines(spec: LaunchSpec) -> str:
    """Replicas mode: the coordinator in the background of the batch shell (first node), up before srun starts."""
    if not spec.replicas:
        return ""
    launch = spec.cfg.launch
    address_file = spec.run_dir / "lighthouse-${SLURM_JOB_ID}.json"
    return f"""
# replicas mode: the quorum coordinator on this (the first) node, for as long as the job runs.
lighthouse_port=$(({LIGHTHOUSE_PORT_BASE} + SLURM_JOB_ID % 1000))
lighthouse_file="{address_file}"
rm -f "$lighthouse_file"
RUST_LOG=${{RUST_LOG:-warn}} {shlex.quote(sys.executable)} -m launch.lighthouse lighthouse --host=0.0.0.0 \\
    --port="$lighthouse_port" --min-replicas={launch.min_replicas} \\
    --heartbeat-timeout-ms={launch.ft_heartbeat_timeout_ms} --join-timeout-ms={launch.ft_join_timeout_ms} \\
    --address-file="$lighthouse_file" &
lighthouse=$!
for _ in $(seq 600); do [ -s "$lighthouse_file" ] || ! kill -0 "$lighthouse" 2>/dev/null && break; sleep 0.1; done
if [ ! -s "$lighthouse_file" ]; then
    echo "ecpt: the quorum coordinator did not start (port $lighthouse_port); see the lines above" >&2
    exit 1
fi
trap 'kill "$lighthouse" 2>/dev/null' EXIT
"""


def _directives(spec: LaunchSpec, opts: SlurmOptions) -> list[str]:
    lines = [f"--job-name={spec.job_name}", f"--nodes={spec.max_nodes}", "--ntasks-per-node=1"]
    lines.append(f"--cpus-per-task={opts.cpus_per_node}" if opts.cpus_per_node else "--exclusive")
    if spec.gpus_per_node:
        lines.append(f"--gpus-per-node={spec.gpus_per_node}")
    lines.append(f"--time={opts.time}")
    if opts.partition:
        lines.append(f"--partition={opts.partition}")
    if opts.account:
        lines.append(f"--account={opts.account}")
    lines += [
        f"--output={spec.run_dir / 'slurm-%j.out'}",
        "--open-mode=append",
        f"--signal=B:USR1@{opts.signal_seconds}",
        "--requeue",
    ]
    if spec.elastic or spec.replicas:
        lines.append("--no-kill")  # a failed node must not end the allocation: the others continue without it
    return [f"#SBATCH {line}" for line in lines + list(opts.extra_sbatch)]


def _srun_line(spec: LaunchSpec) -> str:
    flags = [
        '--nodes="$SLURM_JOB_NUM_NODES"',
        "--ntasks-per-node=1",
        '--cpus-per-task="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}"',
        "--kill-on-bad-exit=0",
    ]
    if spec.gpus_per_node:
        flags.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.elastic or spec.replicas:
        flags.append("--no-kill")
    agent = " \\\n        ".join(_command_lines(agent_command(spec)))
    return f'srun {" ".join(flags)} \\\n    bash -c \'trap "" USR1; exec "$@"\' ecpt-agent \\\n        {agent} &'


def _port_line(spec: LaunchSpec) -> str:
    port = int(spec.cfg.launch.rdzv_endpoint.rpartition(":")[2] or 0)
    if port:
        return f"rdzv_port={port}"
    return "rdzv_port=$((29400 + SLURM_JOB_ID % 1000))  # per job, so jobs sharing a node do not collide"


def render_sbatch(spec: LaunchSpec, opts: SlurmOptions) -> str:
    """The complete sbatch script for ``spec``."""
    opts.validate()
    n = spec.nproc_per_node
    devices = f"{spec.gpus_per_node} GPU(s) per node" if spec.gpus_per_node else "CPU nodes"
    backend = f"{devices}, {spec.backend}"
    if spec.replicas:
        per_node = spec.cfg.launch.replica_groups_per_node
        shape = f"{spec.max_nodes} nodes, {per_node} replica groups of one worker per node (replicas mode)"
    else:
        shape = f"{spec.nnodes} nodes (torchrun --nnodes), {n} workers per node"
    body = f"""#!/bin/bash
# ecpt training job rendered by `ecpt launch slurm`: {shape},
# {backend}. Resolved config: {spec.config_json}
{chr(10).join(_directives(spec, opts))}

set -uo pipefail
echo "ecpt: job ${{SLURM_JOB_ID}} $(date -Is) on ${{SLURM_JOB_NODELIST}} (${{SLURM_JOB_NUM_NODES}} nodes)," \\
     "SLURM_RESTART_COUNT=${{SLURM_RESTART_COUNT:-0}}"

# c10d rendezvous on the first node of the allocation.
rdzv_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
{_port_line(spec)}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 PYTHONUNBUFFERED=1
cpus=${{SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( cpus / {n} > 0 ? cpus / {n} : 1 ))}}
{_lighthouse_lines(spec)}
# USR1 arrives {opts.signal_seconds} s before the time limit (or on preemption): pass it to every process of the step;
# the workers checkpoint and stop at the next step boundary, then the job is requeued and resumes.
stop_requested=0
agents=""
forward_usr1() {{
    stop_requested=1
    echo "ecpt: $(date -Is) USR1 received: workers checkpoint and stop at the next step"
    if [ -n "$agents" ]; then kill -USR1 "$agents" 2>/dev/null || true; fi
}}
trap forward_usr1 USR1

{_srun_line(spec)}
agents=$!
# `wait` returns early whenever a trapped signal arrives; keep waiting until srun itself has exited.
while :; do
    wait "$agents"
    rc=$?
    kill -0 "$agents" 2>/dev/null || break
done
echo "ecpt: $(date -Is) agents exited with code $rc"
"""
    if opts.requeue_on_signal:
        body += """if [ "$stop_requested" = 1 ]; then
    echo "ecpt: requeueing job ${SLURM_JOB_ID} to resume from its newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
"""
    return body + 'exit "$rc"\n'


def submit(script: Path, env: dict[str, str] | None = None) -> str:
    """``sbatch --parsable``; returns the job id. The script's #SBATCH lines carry every option."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
