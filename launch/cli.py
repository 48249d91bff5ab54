"""The ``ecpt`` command: the parser assembled from the subcommand modules, and config errors turned into exit 2.

Each subcommand module exposes ``add_<name>_parser(subparsers)`` and sets ``func`` on its parsers. Everything
imported here runs on every ``ecpt`` start (``ecpt --help`` included), so none of it may import torch: the
subcommands that need it import it when they run.
"""

from __future__ import annotations

import argparse
import sys

from elastic.config import ConfigError
from launch.chaos import add_chaos_parser
from launch.ckpt_commands import add_ckpt_parser
from launch.cluster_commands import add_launch_parser
from launch.experiment_commands import add_experiment_parser
from launch.train_commands import add_lighthouse_parser, add_rdzv_store_parser, add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecpt", description="Elastic Continual Pre-Training")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_rdzv_store_parser(sub)
    add_lighthouse_parser(sub)
    add_ckpt_parser(sub)
    add_chaos_parser(sub)
    add_launch_parser(sub)
    add_experiment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"ecpt: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
