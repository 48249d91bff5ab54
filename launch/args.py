"""Command-line arguments several ``ecpt`` subcommands share: the config (``--config``, ``--set``) and the
shorthand flags of a local training run, which are turned back into ``--set`` overrides.

A shorthand given on the command line always becomes an override, whatever its value, so a value that cannot work
(``--nproc-per-node 0``) is refused by config validation exactly as it would be in the TOML file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from elastic.config import DEFAULT_CONFIG_NAME


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help=f"TOML config: a file, or the name of a bundled config such as {DEFAULT_CONFIG_NAME} "
        f"(default: {DEFAULT_CONFIG_NAME})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable, e.g. --set train.max_steps=20",
    )


def add_train_shape_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``ecpt train`` that are shorthands for ``--set`` (see ``train_overrides``)."""
    p.add_argument("--nnodes", help="N or MIN:MAX (elastic); shorthand for --set launch.nnodes=...")
    p.add_argument(
        "--nproc-per-node", type=int, help="workers on this node; shorthand for --set launch.nproc_per_node=..."
    )
    p.add_argument("--run-dir", help="where logs, metrics and local checkpoints go")
    p.add_argument("--rdzv-endpoint", help="host:port of the c10d rendezvous")
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from the Hugging Face model saved in DIR (save_pretrained); shorthand for --set model.init=hf:DIR",
    )


def train_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides followed by the shorthand flags that were given, so the flags win."""
    extra = list(args.overrides)
    if args.nnodes is not None:
        extra.append(f'launch.nnodes="{args.nnodes}"')
    if args.nproc_per_node is not None:
        extra.append(f"launch.nproc_per_node={args.nproc_per_node}")
    if args.run_dir is not None:
        extra.append(f'train.run_dir="{args.run_dir}"')
    if args.rdzv_endpoint is not None:
        extra.append(f'launch.rdzv_endpoint="{args.rdzv_endpoint}"')
    if args.init_from is not None:  # absolute: every worker and a later resume read the same directory
        extra.append(f"model.init={json.dumps('hf:' + str(Path(args.init_from).expanduser().resolve()))}")
    return extra
