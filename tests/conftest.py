"""Shared fixtures: a tiny config on a small private corpus, and real multi-process gloo ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import tiny_config_dict, write_text_corpus  # noqa: E402


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> dict[str, Path]:
    """Three small text domains (prose, python, c) made from this machine's Python, written once per session."""
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny_raw(text_corpus, tmp_path) -> dict:
    """A raw config dict for a tiny model on the small corpus; tests tweak it before building a Config."""
    return tiny_config_dict(text_corpus, tmp_path)


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
