"""``ecpt ckpt list|verify|inspect|export|gc``: offline checkpoint tools (no process group, no training code).

DIR may be a level root (holding step-XXXXXXXX directories) or one checkpoint directory; for a root, verify,
inspect and export act on its newest committed checkpoint. ``gc [L0_ROOT]`` lists and removes the memory
checkpoints that no run owns any more (the rules are in ``elastic/memory_levels.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The checkpoint tools below import ``checkpointing`` (hence torch) when they run, not when the parser is built:
# this module is imported on every ``ecpt`` start, ``ecpt --help`` included.
from elastic.config import ConfigError, load_config

EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_ckpt_parser(subparsers) -> None:
    """``ecpt ckpt ...`` on an argparse subparsers object; every parser sets ``func=run_ckpt``."""
    ckpt = subparsers.add_parser("ckpt", help="list, verify, inspect or export checkpoints")
    sub = ckpt.add_subparsers(dest="ckpt_command", required=True, metavar="{list,verify,inspect,export,gc}")
    for name, help_text in [
        ("list", "committed checkpoints under a level root"),
        ("verify", "check every chunk's size and crc32c against the manifest"),
        ("inspect", "step, level, extra keys and tensors of one checkpoint (JSON)"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("dir", help="a level root or one checkpoint directory")
        p.set_defaults(func=run_ckpt)
    export = sub.add_parser("export", help="write model.safetensors (+ config.json) for Hugging Face")
    export.add_argument("dir", help="a level root or one checkpoint directory")
    export.add_argument("--to", required=True, help="output directory")
    export.add_argument("--prefix", default="model/", help="tensor name prefix to export and strip (default model/)")
    export.add_argument(
        "--dtype", choices=sorted(EXPORT_DTYPES), default=None, help="convert the weights (default: as stored, fp32)"
    )
    export.add_argument(
        "--tokenizer-from",
        metavar="DIR",
        default=None,
        help="copy the tokenizer files from DIR (default: the run's model.init directory, if it had one)",
    )
    export.set_defaults(func=run_ckpt)
    gc = sub.add_parser("gc", help="list and remove memory (L0) checkpoints of runs that have ended")
    gc.add_argument("root", nargs="?", help="L0 root (default: checkpoint.l0_dir of --config, or /dev/shm/ecpt)")
    gc.add_argument("--config", help="TOML config whose checkpoint.l0_dir and l0_stale_after_s to use")
    gc.add_argument(
        "--stale-after",
        type=float,
        metavar="SECONDS",
        help="age after which memory whose owner cannot be checked is stale (default: checkpoint.l0_stale_after_s)",
    )
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(func=run_gc)


def run_gc(args: argparse.Namespace) -> int:
    """Exit code 0 (also when nothing was stale), 2 on a bad config or an unreadable owner record."""
    from elastic.memory_levels import MemoryLevelError, reap_stale

    try:
        c = load_config(args.config, []).checkpoint
        stale_after = c.l0_stale_after_s if args.stale_after is None else args.stale_after
        if not stale_after > 0:
            raise ConfigError(f"--stale-after must be > 0 seconds, got {stale_after}")
        root = Path(args.root or c.l0_dir)
        found = reap_stale(root, stale_after, dry_run=args.dry_run)
    except (ConfigError, MemoryLevelError) as e:
        print(f"ecpt ckpt gc: {e}", file=sys.stderr)
        return 2
    for entry, reason in found:
        print(f"{'stale' if args.dry_run else 'removed'}  {entry.nbytes / 1e6:>10.1f} MB  {entry.path}  ({reason})")
    total = sum(e.nbytes for e, _ in found) / 1e6
    verb = "would free" if args.dry_run else "freed"
    print(
        f"{root}: {verb} {total:.1f} MB in {len(found)} stale memory checkpoint entr{'y' if len(found) == 1 else 'ies'}"
    )
    return 0


def _is_checkpoint(path: Path) -> bool:
    from checkpointing import MANIFEST_NAME

    return (path / MANIFEST_NAME).is_file()


def _resolve(path: Path) -> Path:
    """One checkpoint directory: DIR itself, or the newest committed checkpoint under a level root."""
    from checkpointing import CheckpointError, list_checkpoints

    if _is_checkpoint(path):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no committed checkpoint (no step-XXXXXXXX directory with manifest.json)")
    return Path(found[-1].path)


def run_ckpt(args: argparse.Namespace) -> int:
    """Exit code 0 on success, 1 if verify found problems, 2 if the directory is not a checkpoint."""
    from checkpointing import CheckpointError, inspect, verify

    scheme, sep, _ = args.dir.partition("://")
    if sep:  # Path() would fold "s3://b/p" into the local path "s3:/b/p" and report no checkpoint there
        if scheme == "s3" and args.ckpt_command in ("list", "verify"):
            return _object_command(args)
        print(
            f"ecpt ckpt: {args.dir}: {scheme}:// URLs are not supported by `ecpt ckpt {args.ckpt_command}`; "
            f"list and verify take s3://bucket/prefix, everything else a checkpoint directory or level root on a "
            f"file system",
            file=sys.stderr,
        )
        return 2
    path = Path(args.dir)
    try:
        if args.ckpt_command == "list":
            return _list(path)
        target = _resolve(path)
        if args.ckpt_command == "verify":
            problems = verify(target)
            for p in problems:
                print(f"PROBLEM {p}")
            print(f"{target}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
        if args.ckpt_command == "inspect":
            print(json.dumps(inspect(target), indent=1))
            return 0
        return _export(target, args)
    except CheckpointError as e:
        print(f"ecpt ckpt: {e}", file=sys.stderr)
        return 2


def export_checkpoint(
    target: Path, to: Path, dtype: str | None = None, tokenizer_from: str | None = None, prefix: str = "model/"
) -> tuple[Path, int, list[str], str | None]:
    """Weights and config.json of one checkpoint directory (checkpointing.export_safetensors), then the tokenizer
    files of the run's model.init directory (or ``tokenizer_from``), so AutoModelForCausalLM and AutoTokenizer both
    load ``to``. ``dtype``: a key of EXPORT_DTYPES or None (as stored). Returns (weights file, step, tokenizer files
    copied, their source directory); a tokenizer directory that does not exist is a CheckpointError."""
    import shutil

    import torch

    from checkpointing import CheckpointError, export_safetensors
    from checkpointing.manifest import read_manifest
    from elastic.hf_checkpoint import HF_PREFIX, TOKENIZER_FILES

    manifest = read_manifest(target)
    source = tokenizer_from
    init = manifest.extra.get("hf_init", "")
    if source is None and init:
        source = init[len(HF_PREFIX) :]
    if source is not None and not Path(source).expanduser().is_dir():
        raise CheckpointError(
            f"tokenizer directory {source} does not exist"
            + (f" (the run's model.init was {init})" if init and not tokenizer_from else "")
            + "; pass --tokenizer-from DIR with the tokenizer files"
        )
    torch_dtype = getattr(torch, EXPORT_DTYPES[dtype]) if dtype else None
    rename = manifest.extra.get("hf_file_names") or None  # the init file's own keys, e.g. GPT-NeoX's embed_out
    out = export_safetensors(target, to, prefix=prefix, dtype=torch_dtype, rename=rename)
    copied = []
    if source is not None:
        for name in TOKENIZER_FILES:
            file = Path(source).expanduser() / name
            if file.is_file():
                shutil.copyfile(file, Path(to) / name)
                copied.append(name)
    return out, manifest.step, copied, source


def _export(target: Path, args: argparse.Namespace) -> int:
    out, step, copied, source = export_checkpoint(
        target, Path(args.to), args.dtype, args.tokenizer_from, prefix=args.prefix
    )
    print(
        f"exported step {step} from {target} to {out}"
        + (f" ({args.dtype})" if args.dtype else "")
        + (f"; copied {', '.join(copied)} from {source}" if copied else "; no tokenizer files copied")
    )
    return 0


def _object_command(args: argparse.Namespace) -> int:
    """list / verify of an s3:// level root or step (endpoint and key from the AWS_* variables and files)."""
    from checkpointing import CheckpointError, list_checkpoints, verify

    url = args.dir.rstrip("/")
    try:
        if args.ckpt_command == "list":
            return _print_infos(url, list_checkpoints(url))
        if not url.rpartition("/")[2].startswith("step-"):
            found = list_checkpoints(url)
            if not found:
                raise CheckpointError(f"{url}: no committed checkpoint (no step-XXXXXXXX/manifest.json)")
            url = found[-1].path
        problems = verify(url)
    except (CheckpointError, OSError) as e:
        print(f"ecpt ckpt: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"{url}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _list(path: Path) -> int:
    from checkpointing import list_checkpoints

    return _print_infos(path, list_checkpoints(path.parent if _is_checkpoint(path) else path))


def _print_infos(path, infos) -> int:
    if not infos:
        print(f"ecpt ckpt: {path}: no committed checkpoint", file=sys.stderr)
        return 2
    print(f"{'step':>10}  {'level':<6}{'MB':>10}  {'complete':<9}{'node':<10}{'created':<20}path")
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_unix)) if i.created_unix else "?"
        print(
            f"{i.step:>10}  {i.level:<6}{i.nbytes / 1e6:>10.1f}  {str(i.complete):<9}{i.node_id or '-':<10}"
            f"{created:<20}{i.path}"
        )
    return 0
