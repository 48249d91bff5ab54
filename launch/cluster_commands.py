"""``ecpt launch slurm|mpi|k8s``: the same config on a Slurm cluster, under mpiexec, or as a Kubeflow PyTorchJob.

Every backend loads the config with the job shape folded in (``launch.spec``), validates everything before
anything is submitted, and (for Slurm and MPI) prepares the run directory exactly like ``ecpt train``: corpus built,
resolved config written to ``<run_dir>/config.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from elastic.config import Config, ConfigError
from launch.args import add_config_args
from launch.spec import DEFAULT_METRICS_PORT, JobShape, LaunchSpec, check_job_name, default_job_name, load_with_shape
from launch.train_commands import prepare_run

if TYPE_CHECKING:  # the backends import torch (through launch.local); `ecpt --help` should not
    from launch.k8s import K8sOptions
    from launch.slurm import SlurmOptions


def _prepare_quietly(cfg: Config) -> Path:
    """prepare_run logs corpus progress on stdout; keep stdout for the rendered script."""
    with contextlib.redirect_stdout(sys.stderr):
        return prepare_run(cfg)


def _job_name(args: argparse.Namespace) -> str:
    return check_job_name(args.job_name or default_job_name(args.config))


# ---------------------------------------------------------------------------------------------------------------
# slurm


def slurm_spec(args: argparse.Namespace) -> tuple[LaunchSpec, SlurmOptions]:
    from launch.slurm import SlurmOptions

    opts = SlurmOptions(
        time=args.time,
        partition=args.partition or "",
        account=args.account or "",
        signal_seconds=args.signal_seconds,
        cpus_per_node=args.cpus_per_node,
        requeue_on_signal=not args.no_requeue,
        extra_sbatch=list(args.sbatch),
    )
    opts.validate()
    shape = JobShape(
        max_nodes=args.nodes,
        min_nodes=args.min_nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        run_dir=args.run_dir or "",
        metrics_host="0.0.0.0" if args.nodes > 1 else "",
    )
    cfg = load_with_shape(args.config, args.overrides, shape, "slurm")
    cfg.train.run_dir = str(Path(cfg.train.run_dir).resolve())
    spec = LaunchSpec(
        cfg=cfg,
        config_json=str(Path(cfg.train.run_dir) / "config.json"),
        job_name=_job_name(args),
        gpus_per_node=args.gpus_per_node,
    )
    return spec, opts


def cmd_slurm(args: argparse.Namespace) -> int:
    from launch.slurm import render_sbatch, submit

    spec, opts = slurm_spec(args)
    script = render_sbatch(spec, opts)
    config_json = _prepare_quietly(spec.cfg)
    path = spec.run_dir / f"{spec.job_name}.sbatch"
    path.write_text(script)
    if not args.submit:
        print(script, end="")
        print(f"ecpt: wrote {path} and {config_json}; submit with: sbatch {path}", file=sys.stderr)
        return 0
    if not shutil.which("sbatch"):
        raise ConfigError(
            "sbatch is not on PATH: run `ecpt launch slurm --submit` on a Slurm login node, or use "
            "--print and submit the script there"
        )
    try:
        job_id = submit(path)
    except RuntimeError as exc:
        print(f"ecpt: {exc}", file=sys.stderr)
        return 1
    print(f"submitted batch job {job_id}: {path}; output {spec.run_dir / f'slurm-{job_id}.out'}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# mpi


def cmd_mpi(args: argparse.Namespace) -> int:
    from launch.local import run_agent
    from launch.mpi import MpiOptions, find_mpiexec, mpi_flavour, mpiexec_command, threads_per_rank

    opts = MpiOptions(
        nprocs=args.n, hostfile=args.hostfile or "", mpiexec=args.mpiexec or "", extra_args=list(args.mpi_arg)
    )
    opts.validate()
    shape = JobShape(
        max_nodes=1,
        min_nodes=1,
        nproc_per_node=args.n,
        run_dir=args.run_dir or "",
        metrics_host="0.0.0.0" if args.hostfile else "",
    )
    cfg = load_with_shape(args.config, args.overrides, shape, "mpi")
    mpiexec = find_mpiexec(opts.mpiexec)
    flavour = mpi_flavour(mpiexec)
    config_json = prepare_run(cfg)
    spec = LaunchSpec(cfg=cfg, config_json=str(config_json), job_name=_job_name(args))
    cmd = mpiexec_command(spec, opts, mpiexec, flavour)
    print(
        f"run dir {cfg.train.run_dir}; {flavour} mpiexec: {args.n} ranks"
        f"{f' over {opts.hostfile}' if opts.hostfile else ' on this machine'}",
        flush=True,
    )
    if args.print:
        print(shlex.join(cmd))
        return 0
    code = run_agent(cmd, threads_per_worker=threads_per_rank(spec, opts))
    print(
        f"training {'finished' if code == 0 else f'failed with exit code {code}'}; "
        f"metrics log: {Path(cfg.train.run_dir) / 'metrics.jsonl'}",
        flush=True,
    )
    return code


# ---------------------------------------------------------------------------------------------------------------
# k8s


def k8s_spec(args: argparse.Namespace) -> tuple[LaunchSpec, K8sOptions]:
    from launch.k8s import K8sOptions

    opts = K8sOptions(
        image=args.image,
        namespace=args.namespace or "",
        cpus_per_node=args.cpus_per_node or "",
        memory_per_node=args.memory_per_node or "",
        shm_size=args.shm_size,
        storage=args.storage,
        storage_class=args.storage_class or "",
        existing_claim=args.pvc or "",
        metrics_port=args.metrics_port,
    )
    opts.validate()
    shape = JobShape(
        max_nodes=args.max_nodes,
        min_nodes=args.min_nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        metrics_host="0.0.0.0",
        metrics_port=args.metrics_port,
    )
    cfg = load_with_shape(args.config, args.overrides, shape, "k8s")
    spec = LaunchSpec(
        cfg=cfg, config_json="/etc/ecpt/config.json", job_name=_job_name(args), gpus_per_node=args.gpus_per_node
    )
    return spec, opts


def cmd_k8s(args: argparse.Namespace) -> int:
    from launch.k8s import manifests, to_yaml

    spec, opts = k8s_spec(args)
    text = to_yaml(manifests(spec, opts))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; apply with: kubectl apply -f {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# parsers


def _common(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--job-name", help="job name (default: ecpt-<config file name>)")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help="workers per node (default: one per GPU, or the config's launch.nproc_per_node on CPU nodes)",
    )


def _slurm_parser(sub) -> None:
    p = sub.add_parser("slurm", help="render (and submit) an sbatch script: one torchrun agent per node")
    _common(p)
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate (torchrun's MAX)")
    p.add_argument(
        "--min-nodes",
        type=int,
        default=None,
        help="fewest nodes training continues with (default: the config's launch.nnodes MIN, else 1)",
    )
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node; 0 = CPU nodes (gloo)")
    p.add_argument("--time", required=True, help="wall-time limit, e.g. 30, 4:00:00, 1-12:00:00")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--run-dir", help="run directory on storage every node sees (default: the config's)")
    p.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="USR1 (checkpoint and requeue) this many seconds before the time limit (default 120)",
    )
    p.add_argument("--cpus-per-node", type=int, default=0, help="CPUs per node (default: --exclusive)")
    p.add_argument("--no-requeue", action="store_true", help="stop after USR1 instead of requeueing the job")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option, repeatable, e.g. --sbatch=--qos=high",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--submit", action="store_true", help="submit with sbatch")
    mode.add_argument("--print", action="store_true", help="print the script (default)")
    p.set_defaults(func=cmd_slurm)


def _mpi_parser(sub) -> None:
    p = sub.add_parser("mpi", help="run the workers under mpiexec (one rank per worker)")
    _common(p)
    p.add_argument("-n", type=int, required=True, help="number of ranks")
    p.add_argument("--hostfile", help="hosts file (default: all ranks on this machine)")
    p.add_argument("--run-dir", help="run directory (default: the config's)")
    p.add_argument("--mpiexec", help="mpiexec to use (default: the venv's, else the first on PATH)")
    p.add_argument(
        "--mpi-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra mpiexec flag, repeatable, e.g. --mpi-arg=--bind-to --mpi-arg=none",
    )
    p.add_argument("--print", action="store_true", help="prepare the run and print the mpiexec command only")
    p.set_defaults(func=cmd_mpi)


def _k8s_parser(sub) -> None:
    p = sub.add_parser("k8s", help="render a Kubeflow PyTorchJob with elasticPolicy (kubectl apply -f)")
    _common(p)
    p.add_argument("--image", required=True, help="container image with ecpt installed")
    p.add_argument("--min-nodes", type=int, required=True, help="elasticPolicy.minReplicas")
    p.add_argument("--max-nodes", type=int, required=True, help="elasticPolicy.maxReplicas (and replicas)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="nvidia.com/gpu per pod; 0 = CPU pods (gloo)")
    p.add_argument("--namespace", help="namespace (default: kubectl's current)")
    p.add_argument("--cpus-per-node", help="CPU request/limit per pod (default: 2 per CPU worker, 8 per GPU)")
    p.add_argument("--memory-per-node", help="memory request/limit per pod (default: 4Gi per CPU worker, 32Gi per GPU)")
    p.add_argument("--shm-size", default="8Gi", help="/dev/shm size per pod (L0 checkpoints; default 8Gi)")
    p.add_argument("--storage", default="100Gi", help="size of the shared ReadWriteMany volume (default 100Gi)")
    p.add_argument("--storage-class", help="StorageClass of the shared volume (default: the cluster's)")
    p.add_argument("--pvc", help="use this existing PersistentVolumeClaim instead of creating one")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"base metrics port; local rank r serves port + r (default {DEFAULT_METRICS_PORT})",
    )
    p.add_argument("--output", "-o", help="write the manifests here instead of stdout")
    p.set_defaults(func=cmd_k8s)


def add_launch_parser(subparsers) -> None:
    """``ecpt launch slurm|mpi|k8s``."""
    launch = subparsers.add_parser("launch", help="launch on a cluster: slurm, mpi or k8s")
    sub = launch.add_subparsers(dest="backend", required=True, metavar="{slurm,mpi,k8s}")
    _slurm_parser(sub)
    _mpi_parser(sub)
    _k8s_parser(sub)
