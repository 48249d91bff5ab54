"""ecpt built as a wheel and installed (not editable) runs from a directory outside the source tree, finding its
bundled default config through importlib.resources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from elastic.metrics import read_jsonl
from support.processes import REPO

pytestmark = pytest.mark.slow

PACKAGED = ("pyproject.toml", "elastic", "checkpointing", "launch", "configs")
"""What the wheel is built from: a copy, so setuptools' build/ and egg-info never land in the checkout."""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.timeout(600)
def test_installed_wheel_trains_outside_the_source_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in PACKAGED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            str(src),
            "-w",
            str(wheels),
        ],
        timeout=300,
    )
    (wheel,) = wheels.glob("ecpt-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        timeout=300,
    )
    # torch and the other pinned dependencies come from this test's venv, appended after the new venv's own
    # site-packages (so the installed ecpt is found first). Written after the install: pip must not see (and try to
    # replace) this venv's editable ecpt. The editable finder's .pth is not run from a directory added this way.
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "ecpt-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run(
        [
            str(python),
            "-c",
            "import configs, elastic, launch; print(configs.__file__, elastic.__file__, launch.__file__)",
        ],
        cwd=work,
        env=env,
        timeout=60,
    ).stdout.split()
    assert all(Path(f).is_relative_to(site) for f in where), where

    result = subprocess.run(
        [
            str(venv / "bin" / "ecpt"),
            "train",
            "--nproc-per-node",
            "1",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.progress=false",
            "--set",
            "metrics.enabled=false",
            "--set",
            f'checkpoint.l0_dir="{tmp_path / "l0"}"',
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "training finished" in result.stdout
    run_dir = work / "runs" / "tiny-cpu"  # the bundled config's relative train.run_dir, under the working directory
    assert (run_dir / "config.json").is_file()
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl", "step")] == [1, 2]
