"""Debian packages the integration tests need (Slurm, munge, Prometheus), installed with apt-get when missing.

Packages come from apt when missing (root only); a test is skipped, with the reason, only when apt cannot deliver
them."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin"
APT_UPDATE_TIMEOUT, APT_INSTALL_TIMEOUT = 300, 600
INSTALL_BUDGET = APT_UPDATE_TIMEOUT + APT_INSTALL_TIMEOUT
"""The longest ensure_debian_packages can take: what the first test that needs a missing package adds to its time."""
_apt_updated = False


def which(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories, where Debian puts the daemons."""
    return shutil.which(name, path=SBIN_PATH)


def _apt(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", "-o", "DPkg::Lock::Timeout=180", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def ensure_debian_packages(binaries: list[str], packages: list[str]) -> dict[str, str]:
    """Paths of ``binaries``, installing ``packages`` with apt-get first if any is missing; skip if impossible."""
    global _apt_updated
    missing = [b for b in binaries if not which(b)]
    if missing:
        if os.geteuid() != 0 or not which("apt-get"):
            pytest.skip(f"{missing} not installed and apt-get is unavailable (or not root) to install {packages}")
        if not _apt_updated:
            _apt(["update", "-qq"], timeout=APT_UPDATE_TIMEOUT)
            _apt_updated = True
        proc = _apt(["install", "-y", "-qq", "--no-install-recommends", *packages], timeout=APT_INSTALL_TIMEOUT)
        if proc.returncode != 0:
            pytest.skip(f"apt-get could not install {packages}: {proc.stderr.strip()[-500:]}")
    paths = {b: which(b) for b in binaries}
    still = [b for b, p in paths.items() if not p]
    if still:
        pytest.skip(f"{still} still missing after installing {packages}")
    return paths
