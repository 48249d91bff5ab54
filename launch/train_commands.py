"""``ecpt train`` (workers on this machine through torchrun's elastic agent) and ``ecpt rdzv-store``.

``ecpt train`` validates the whole config before any process starts, builds the corpus once (workers then only
memory-map it), writes the resolved config into the run directory and starts the elastic agent. ``prepare_run``
is the same preparation for the cluster backends; ``train_on_this_machine`` is what ``ecpt chaos`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from elastic.config import Config, ConfigError, load_config, save_config
from elastic.data import build_corpus
from elastic.metrics import read_jsonl
from elastic.process_env import NODE_ID_ENV
from launch.args import add_config_args, add_train_shape_args, train_overrides

CHECKPOINT_FAILED_EXIT = 4


def with_faults(cfg: Config, faults: list[str]) -> Config:
    """--fault sentences are appended to faults.plan and validated like the rest of the config."""
    if faults:
        cfg.faults.plan = [*cfg.faults.plan, *faults]
        cfg.validate_faults()
    return cfg


def prepare_run(cfg: Config) -> Path:
    """Create the run directory, build the corpus and write the resolved config the workers read."""
    run_dir = Path(cfg.train.run_dir).resolve()
    cfg.train.run_dir = str(run_dir)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build_corpus(cfg, log=lambda msg: print(msg, flush=True))
    print(f"corpus ready in {time.perf_counter() - start:.1f} s", flush=True)
    config_json = run_dir / "config.json"
    tmp = run_dir / f".config.json.tmp{os.getpid()}"  # several agents of one run may write it at once
    save_config(cfg, tmp)
    os.replace(tmp, config_json)
    return config_json


def train_on_this_machine(
    cfg: Config, node_id: str | None = None, node_rank: int | None = None, external_store: bool = False
) -> int:
    """Prepare the run, start the elastic agent and wait for it; the exit code of ``ecpt train``."""
    from launch.local import resolve_endpoint, run_agent, torchrun_command

    if cfg.checkpoint.l2_dir:  # imports torch (checkpointing): only then, so a node joining a job starts sooner
        from checkpointing import CheckpointError
        from elastic.checkpoints import check_object_levels

        try:  # a missing bucket or a refused key: say so now, not after the workers failed and restarted
            check_object_levels(cfg)
        except CheckpointError as e:
            print(f"ecpt train: checkpoint.l2_dir = {cfg.checkpoint.l2_dir!r}: {e}", file=sys.stderr)
            return 2
    if cfg.launch.fault_tolerance == "replicas":
        from launch.replicas_node import replica_indices, train_replicas

        try:  # before the corpus is built: a wrong node rank or a missing coordinator is a config error
            replica_indices(cfg, node_rank)
        except ConfigError as e:
            print(f"ecpt train: {e}", file=sys.stderr)
            return 2
        return _finish(cfg, train_replicas(cfg, prepare_run(cfg), node_id, node_rank))
    config_json = prepare_run(cfg)
    threads = cfg.train.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.launch.nproc_per_node)
    endpoint = resolve_endpoint(cfg)
    print(
        f"run dir {cfg.train.run_dir}; torchrun: nnodes {cfg.launch.nnodes}, {cfg.launch.nproc_per_node} "
        f"workers per node, rendezvous c10d at {endpoint}",
        flush=True,
    )
    node_env = {NODE_ID_ENV: node_id} if node_id else {}
    if cfg.metrics.enabled:
        from launch.launcher_metrics import serve_launcher_metrics

        node = node_id or os.uname().nodename
        port = serve_launcher_metrics(Path(cfg.train.run_dir), cfg.metrics.host, 0, node)
        print(f"launcher metrics on http://{cfg.metrics.host}:{port}/metrics", flush=True)
    cmd = torchrun_command(cfg, config_json, endpoint, node_rank=node_rank, external_store=external_store)
    code = run_agent(cmd, extra_env=node_env, threads_per_worker=threads)
    return _finish(cfg, code)


def _finish(cfg: Config, code: int) -> int:
    if code == 0:
        code = _checkpoint_failure_code(Path(cfg.train.run_dir) / "metrics.jsonl")
    print(
        f"training {'finished' if code == 0 else f'failed with exit code {code}'}; "
        f"metrics log: {Path(cfg.train.run_dir) / 'metrics.jsonl'}",
        flush=True,
    )
    return code


def _checkpoint_failure_code(metrics_jsonl: Path) -> int:
    """Training finished, but did its last checkpoint saves fail (e.g. disk full)? Then say so and exit 4."""
    if not metrics_jsonl.exists():
        return 0
    rows = read_jsonl(metrics_jsonl)
    last_start = max((i for i, r in enumerate(rows) if r["kind"] in ("start", "resume")), default=0)
    errors = [r for r in rows[last_start:] if r["kind"] == "checkpoint_error"]
    if not errors:
        return 0
    print(
        f"ecpt: training reached step {errors[-1]['step']} but checkpoint saves failed: {errors[-1]['error']}\n"
        f"ecpt: older checkpoints are intact (ecpt ckpt list {Path(metrics_jsonl).parent}); free space and rerun "
        f"to resume",
        file=sys.stderr,
    )
    return CHECKPOINT_FAILED_EXIT


def cmd_train(args: argparse.Namespace) -> int:
    cfg = with_faults(load_config(args.config, train_overrides(args)), args.fault)
    return train_on_this_machine(
        cfg, node_id=args.node_id, node_rank=args.node_rank, external_store=args.rdzv_store == "external"
    )


def cmd_rdzv_store(args: argparse.Namespace) -> int:
    from launch.local import serve_rendezvous_store  # imports torch

    serve_rendezvous_store(args.host, args.port)
    return 0


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train on this machine through torchrun's elastic agent")
    add_config_args(train)
    add_train_shape_args(train)
    train.add_argument("--node-rank", type=int, default=None, help="fixed node rank (default: assigned by rendezvous)")
    train.add_argument(
        "--node-id",
        help="this node's identity (its own L0 memory directory); default: hostname. "
        "Give each agent its own when simulating several nodes on one machine",
    )
    train.add_argument(
        "--rdzv-store",
        choices=("agent", "external"),
        default="agent",
        help="external: the c10d store is an `ecpt rdzv-store` process, not hosted by an agent, so "
        "losing any one node does not end the job",
    )
    train.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SENTENCE",
        help="inject a fault, e.g. 'kill rank 1 at step 30' (repeatable; see elastic/fault_plan.py)",
    )
    train.set_defaults(func=cmd_train)


def add_lighthouse_parser(sub) -> None:
    from launch.lighthouse import add_lighthouse_parser as add

    add(sub)


def add_rdzv_store_parser(sub) -> None:
    store = sub.add_parser("rdzv-store", help="run a standalone c10d rendezvous store for elastic jobs")
    store.add_argument("--host", default="127.0.0.1")
    store.add_argument("--port", type=int, required=True)
    store.set_defaults(func=cmd_rdzv_store)
