"""`ecpt launch slurm|mpi` render what a Slurm/MPI user expects, from the same config and torchrun command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from elastic.config import ConfigError, config_from_json
from launch.cluster_commands import add_launch_parser
from launch.local import torchrun_command
from launch.mpi import MpiOptions, mpi_flavour, mpiexec_command, worker_command
from launch.slurm import parse_slurm_time
from launch.spec import LaunchSpec
from support.configs import write_toml


def launch(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `ecpt launch ...` in-process the way launch.cli.main does (config errors exit 2)."""
    parser = argparse.ArgumentParser(prog="ecpt")
    add_launch_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["launch", *argv])
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"ecpt: config error: {exc}", file=sys.stderr)
        code = 2
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def config_file(tiny_raw, tmp_path) -> Path:
    return write_toml(tiny_raw, tmp_path / "tiny.toml")


def slurm(config_file, tmp_path, capsys, *extra: str) -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    code, out, err = launch(
        ["slurm", "--config", str(config_file), "--run-dir", str(run_dir), "--time", "30", *extra], capsys
    )
    assert code == 0, err
    return out, run_dir


def directives(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def agent_words(script: str) -> list[str]:
    """The command srun runs on every node, after the `trap '' USR1; exec` wrapper, as shell words."""
    text = script[script.index("ecpt-agent \\") + len("ecpt-agent") :]
    text = text[: text.index(" &\n")].replace("\\\n", " ")
    return shlex.split(text)


def test_cpu_script_runs_one_torchrun_agent_per_node_with_c10d_on_the_first_node(config_file, tmp_path, capsys):
    script, run_dir = slurm(config_file, tmp_path, capsys, "--nodes", "2", "--gpus-per-node", "0", "--print")
    d = directives(script)
    for expected in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--time=30",
        "--signal=B:USR1@120",
        "--requeue",
        "--open-mode=append",
        f"--output={run_dir / 'slurm-%j.out'}",
        "--exclusive",
    ):
        assert expected in d, (expected, d)
    assert "gpu" not in script.lower(), "CPU-only nodes must not request GPUs"
    assert 'rdzv_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert re.search(r"^srun .*--ntasks-per-node=1", script, re.M)
    assert "trap forward_usr1 USR1" in script and 'kill -USR1 "$agents"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script

    # The resolved config was written on preparation and carries the job shape.
    cfg = config_from_json(run_dir / "config.json")
    assert cfg.launch.nnodes == "1:2" and cfg.train.run_dir == str(run_dir)
    assert (run_dir / "ecpt-tiny.sbatch").read_text() == script

    # Same torchrun command line as `ecpt train`, rendezvous and run id left to the shell.
    assert agent_words(script) == torchrun_command(
        cfg, run_dir / "config.json", "${rdzv_host}:${rdzv_port}", run_id="${SLURM_JOB_ID}"
    )
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_gpu_script_requests_gpus_and_runs_one_worker_per_gpu(config_file, tmp_path, capsys, tiny_raw):
    tiny_raw["train"]["global_batch"] = 16
    write_toml(tiny_raw, config_file)
    script, run_dir = slurm(
        config_file,
        tmp_path,
        capsys,
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu",
        "--account",
        "proj1",
    )
    d = directives(script)
    assert {"--gpus-per-node=4", "--partition=gpu", "--account=proj1"} <= set(d)
    assert "--nproc-per-node=4" in agent_words(script)
    assert re.search(r"^srun .*--gpus-per-node=4", script, re.M)
    assert "nccl" in script.splitlines()[2]
    assert config_from_json(run_dir / "config.json").launch.nproc_per_node == 4


def test_elastic_range_survives_node_loss(config_file, tmp_path, capsys, tiny_raw):
    tiny_raw["train"]["global_batch"] = 8
    write_toml(tiny_raw, config_file)
    script, _ = slurm(config_file, tmp_path, capsys, "--nodes", "4", "--min-nodes", "2", "--gpus-per-node", "0")
    assert "--nnodes=2:4" in agent_words(script)
    assert "--no-kill" in directives(script)  # a dead node must not end the allocation
    assert re.search(r"^srun .*--no-kill", script, re.M)


def test_signal_lead_time_and_requeue_are_configurable(config_file, tmp_path, capsys):
    script, _ = slurm(
        config_file,
        tmp_path,
        capsys,
        "--nodes",
        "1",
        "--gpus-per-node",
        "0",
        "--signal-seconds",
        "300",
        "--no-requeue",
        "--cpus-per-node",
        "16",
        "--sbatch=--qos=high",
    )
    d = directives(script)
    assert {"--signal=B:USR1@300", "--cpus-per-task=16", "--qos=high"} <= set(d)
    assert "--exclusive" not in d and "scontrol requeue" not in script


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--nodes", "1", "--gpus-per-node", "0", "--signal-seconds", "120", "--time", "1"], "--signal-seconds"),
        (["--nodes", "1", "--gpus-per-node", "0", "--time", "soon"], "--time"),
        (["--nodes", "2", "--min-nodes", "3", "--gpus-per-node", "0", "--time", "30"], "--min-nodes"),
        (["--nodes", "1", "--gpus-per-node", "-1", "--time", "30"], "--gpus-per-node"),
        (["--nodes", "8", "--gpus-per-node", "0", "--time", "30"], "train.global_batch"),
        (["--nodes", "1", "--gpus-per-node", "0", "--time", "30", "--job-name", "Bad_Name"], "--job-name"),
    ],
)
def test_bad_flags_name_the_flag(config_file, tmp_path, capsys, argv, message):
    code, _, err = launch(["slurm", "--config", str(config_file), "--run-dir", str(tmp_path / "r"), *argv], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "r" / "config.json").exists(), "nothing is written for an invalid job"


@pytest.mark.parametrize(
    "text,seconds",
    [("30", 1800), ("5:30", 330), ("4:00:00", 14400), ("1-12", 129600), ("2-00:30", 174600), ("1-00:00:10", 86410)],
)
def test_parse_slurm_time(text, seconds):
    assert parse_slurm_time(text) == seconds


# ---------------------------------------------------------------------------------------------------------------
# MPI


def mpi_spec(cfg_path: Path) -> LaunchSpec:
    from elastic.config import load_config

    cfg = load_config(cfg_path)
    return LaunchSpec(cfg=cfg, config_json="/runs/x/config.json", job_name="ecpt-x")


def test_mpich_command_runs_the_worker_module_one_rank_each(config_file, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("n1:2\nn2:2\n")
    cmd = mpiexec_command(mpi_spec(config_file), MpiOptions(nprocs=4, hostfile=str(hosts)), "/x/mpiexec", "mpich")
    assert cmd[:5] == ["/x/mpiexec", "-n", "4", "-f", str(hosts)]
    assert "--allow-run-as-root" not in cmd
    # What torchrun runs per rank, minus the agent.
    tail = torchrun_command(mpi_spec(config_file).cfg, Path("/runs/x/config.json"), "h:1")
    assert cmd[-5:] == worker_command(mpi_spec(config_file)) == [sys.executable, *tail[-4:]]


def test_openmpi_command_passes_env_and_allows_root(config_file):
    cmd = mpiexec_command(mpi_spec(config_file), MpiOptions(nprocs=2), "mpirun", "openmpi", is_root=True)
    assert {"--allow-run-as-root", "--oversubscribe"} <= set(cmd)
    assert cmd[cmd.index("-x") + 1] == "OMP_NUM_THREADS"
    assert "--allow-run-as-root" not in mpiexec_command(
        mpi_spec(config_file), MpiOptions(nprocs=2), "mpirun", "openmpi", is_root=False
    )


@pytest.mark.parametrize(
    "banner,flavour",
    [
        ("mpiexec (OpenRTE) 4.1.5\nReport bugs to http://www.open-mpi.org/", "openmpi"),
        ("HYDRA build details:\n    Version: 5.0.2", "mpich"),
        ("Intel(R) MPI Library for Linux* OS, Version 2021.9", "intel"),
    ],
)
def test_mpi_flavour_from_version_banner(tmp_path, banner, flavour):
    fake = tmp_path / "mpiexec"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{banner}\nEOF\n")
    fake.chmod(0o755)
    assert mpi_flavour(str(fake)) == flavour


def test_mpi_print_prepares_the_run_and_shows_the_command(config_file, tmp_path, capsys):
    run_dir = tmp_path / "mpi-run"
    code, out, err = launch(
        ["mpi", "--config", str(config_file), "-n", "2", "--run-dir", str(run_dir), "--print"], capsys
    )
    assert code == 0, err
    cmd = shlex.split(out.strip().splitlines()[-1])
    assert os.path.basename(cmd[0]).startswith("mpiexec") and cmd[1:3] == ["-n", "2"]
    assert cmd[-4:] == ["-m", "elastic.worker", "--config-json", str(run_dir / "config.json")]
    assert json.loads((run_dir / "config.json").read_text())["launch"]["nproc_per_node"] == 2


def test_mpi_hostfile_must_exist(config_file, tmp_path, capsys):
    code, _, err = launch(
        ["mpi", "--config", str(config_file), "-n", "2", "--hostfile", str(tmp_path / "nope")], capsys
    )
    assert code == 2 and "--hostfile" in err


def test_replicas_mode_script_starts_the_coordinator_then_each_nodes_replica_groups(config_file, tmp_path, capsys):
    """Replicas mode: the batch shell starts `ecpt lighthouse` on the first node and waits until it listens; srun
    runs launch.replicas_node on every node (node rank from SLURM_NODEID) pointed at it; a lost node never ends the
    allocation (--no-kill), whatever the node range."""
    script, run_dir = slurm(
        config_file,
        tmp_path,
        capsys,
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--set",
        'launch.fault_tolerance="replicas"',
    )
    assert "2 replica groups of one worker per node (replicas mode)" in script.splitlines()[1]
    assert re.search(r"-m launch.lighthouse lighthouse --host=0.0.0.0 \\\n\s+--port=\"\$lighthouse_port\"", script)
    assert 'if [ ! -s "$lighthouse_file" ]; then' in script  # srun starts only once the coordinator listens
    assert script.index("lighthouse=$!") < script.index("\nsrun ")
    words = agent_words(script)
    assert words[1:] == [
        "-m",
        "launch.replicas_node",
        f"--config={run_dir / 'config.json'}",
        "--lighthouse=http://${rdzv_host}:${lighthouse_port}",
    ]
    assert "--no-kill" in directives(script) and re.search(r"^srun .*--no-kill", script, re.M)
    cfg = config_from_json(run_dir / "config.json")
    assert cfg.launch.fault_tolerance == "replicas" and cfg.launch.replica_groups_per_node == 2
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_mpi_refuses_replicas_mode_with_the_reason(config_file, tmp_path, capsys):
    code, _, err = launch(
        ["mpi", "--config", str(config_file), "-n", "2", "--print", "--set", 'launch.fault_tolerance="replicas"'],
        capsys,
    )
    assert code == 2 and "not supported by `ecpt launch mpi`" in err and "ecpt launch slurm" in err, err
