"""A number on the command line that cannot work is refused like the same number in the config (exit 2, naming it),
never silently replaced by the config's value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.configs import write_toml
from launch.cli import main


@pytest.fixture
def config_file(tiny_raw, tmp_path):
    return write_toml(tiny_raw, tmp_path / "tiny.toml")


def _ecpt(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2"])
def test_train_nproc_per_node_that_cannot_work_is_a_config_error(config_file, tmp_path, capsys, value):
    code, err = _ecpt(
        ["train", "--config", str(config_file), "--run-dir", str(tmp_path / "run"), "--nproc-per-node", value], capsys
    )
    assert code == 2
    assert f"launch.nproc_per_node must be >= 1, got {value}" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory or any process was made


def test_train_nnodes_zero_is_a_config_error(config_file, tmp_path, capsys):
    code, err = _ecpt(
        ["train", "--config", str(config_file), "--run-dir", str(tmp_path / "run"), "--nnodes", "0"], capsys
    )
    assert code == 2 and "launch.nnodes must be N or MIN:MAX" in err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1, got 0"),
        (["--min-nodes", "0"], "--min-nodes must be in [1, 2]"),
    ],
)
def test_slurm_numbers_that_cannot_work_name_the_flag(config_file, tmp_path, capsys, flags, message):
    code, err = _ecpt(
        [
            "launch",
            "slurm",
            "--config",
            str(config_file),
            "--run-dir",
            str(tmp_path / "run"),
            "--nodes",
            "2",
            "--gpus-per-node",
            "0",
            "--time",
            "30",
            *flags,
        ],
        capsys,
    )
    assert code == 2 and message in err, err


def test_k8s_nproc_per_node_zero_names_the_flag(config_file, capsys):
    code, err = _ecpt(
        [
            "launch",
            "k8s",
            "--config",
            str(config_file),
            "--image",
            "x",
            "--min-nodes",
            "1",
            "--max-nodes",
            "2",
            "--nproc-per-node",
            "0",
        ],
        capsys,
    )
    assert code == 2 and "--nproc-per-node must be >= 1, got 0" in err, err


def test_ecpt_help_does_not_import_torch():
    """Every `ecpt` start pays for what the parser modules import: `ecpt --help` and the argument checks above must
    not wait 1-3 s for torch (the training, checkpoint and launch backends import it when they run)."""
    code = (
        "import sys\nfrom launch.cli import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'checkpointing') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", f"importing the ecpt parser loaded {out.stdout.strip()}"
