"""``ecpt experiment cpt``: the continual pre-training experiment (schedules x replay across data shifts).

The experiment itself lives in ``launch.cpt``; this module only parses the command line.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from launch.cpt import CPT_CONFIG, load_experiment, run_experiment


def _arm_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--arms expects comma-separated arm names, got {text!r}")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--parallel must be >= 1, got {value}")
    return value


def cmd_experiment_cpt(args: argparse.Namespace) -> int:
    exp = load_experiment(args.config, args.overrides, base=args.base)
    out = Path(args.out or exp.spec.out)
    argv = ["ecpt", "experiment", "cpt"] + (["--config", str(args.config)] if args.config else [])
    argv += (["--out", str(args.out)] if args.out else []) + (["--arms", ",".join(args.arms)] if args.arms else [])
    argv += ["--parallel", str(args.parallel)] if args.parallel else []
    argv += ["--base", args.base] if args.base else []
    argv += [f"--set={o}" for o in args.overrides]
    return run_experiment(
        exp,
        out,
        arm_names=args.arms,
        parallel=args.parallel,
        command=shlex.join(argv),
        say=lambda msg: print(msg, flush=True),
    )


def add_experiment_parser(sub) -> None:
    """``ecpt experiment <name>``; today the only experiment is ``cpt``."""
    experiment = sub.add_parser("experiment", help="run a research experiment and write a table, plots and JSON")
    which = experiment.add_subparsers(dest="experiment", required=True)
    cpt = which.add_parser(
        "cpt",
        help="continual pre-training: LR schedules (repeated cosine, infinite, WSD, constant) x replay",
        description="Pre-train a base on the first data phase until its validation loss flattens (cached in "
        "data.cache_dir and reused; --base takes a given model instead), continue it through the later phases "
        "under every arm of the experiment config, then print a Markdown table and write results.md, results.json "
        "and curves.png to --out. Arms with a result in --out are skipped; an unfinished arm resumes from its "
        "newest checkpoint.",
    )
    cpt.add_argument(
        "--config", default=None, help=f"experiment TOML file or bundled config name (default: {CPT_CONFIG})"
    )
    cpt.add_argument("--out", default=None, help="output directory (default: experiment.out of the config)")
    cpt.add_argument(
        "--base",
        default=None,
        metavar="hf:DIR",
        help="start every arm from this Hugging Face model directory (save_pretrained) instead of pre-training a "
        "base; the data is tokenized with its tokenizer unless data.tokenizer says otherwise",
    )
    cpt.add_argument(
        "--arms",
        type=_arm_list,
        default=None,
        metavar="A,B",
        help="train only these arms (the report still covers every finished arm)",
    )
    cpt.add_argument(
        "--parallel",
        type=_positive,
        default=None,
        metavar="N",
        help="arms trained at once, each in its own process (default: experiment.parallel)",
    )
    cpt.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a base-config or experiment value, e.g. --set train.eval_interval=10; "
        "arms apply their schedule on top",
    )
    cpt.set_defaults(func=cmd_experiment_cpt)
