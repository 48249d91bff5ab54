"""Real processes for the tests: gloo ranks of a script, and the `ecpt` command, with the environment they import
the repository (and ``tests/support``) from."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from elastic.world import free_port

REPO = Path(__file__).resolve().parents[2]
TRAIN_TIMEOUT = 240
"""Seconds a tiny `ecpt train` run (12 steps, 2 workers) may take on a loaded 2-core machine."""
RANKS_TIMEOUT = 120
"""spawn_ranks' default: seconds a tiny job of a rank script may take."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def subprocess_env(extra: dict | None = None) -> dict[str, str]:
    """This environment plus PYTHONPATH for scripts the tests start: the repository and ``tests`` (where
    ``support`` lives), since a script's own directory is all Python puts on its path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), **(extra or {})}


def spawn_ranks(
    script: Path, world_size: int, args: list[str], timeout: float = RANKS_TIMEOUT, extra_env: dict | None = None
) -> list[subprocess.CompletedProcess]:
    """Run ``script`` as ``world_size`` real processes joined by env:// gloo rendezvous on 127.0.0.1.

    Waits for all of them with a deadline; on timeout kills the rest and fails with their output.
    """
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = subprocess_env(
            {
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                **(extra_env or {}),
            }
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = [
        subprocess.CompletedProcess(p.args, code, out, "")
        for p, (code, out, _) in zip(procs, communicate_all(procs, timeout, f"ranks of {script.name}"))
    ]
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} of {script.name} failed ({r.returncode}):\n{r.stdout[-4000:]}"
    return results


def communicate_all(procs: list[subprocess.Popen], timeout: float, what: str) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of every process, all waited for within one deadline; past it they are all
    killed and the test fails with the tail of each one's output."""
    deadline = time.monotonic() + timeout
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            tails = "".join(
                f"\n--- process {i} ---\n{''.join(o or '' for o in q.communicate())[-2000:]}"
                for i, q in enumerate(procs)
            )
            raise AssertionError(f"{what} did not finish within {timeout} s:{tails}") from None
        done.append((p.returncode, out or "", err or ""))
    return done


def ecpt_command(args: list[str]) -> list[str]:
    """The `ecpt` command line run by this interpreter (the venv's), e.g. ecpt_command(["train", "--config", ...]);
    run it with cwd=REPO."""
    return [sys.executable, "-m", "launch.cli", *args]


def start_ecpt_train(
    config: Path, *extra: str, log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`ecpt train --config config extra...` in the background, in a session of its own (so a test can kill the
    launcher, agent and workers as one group); output goes to ``log``, or nowhere; ``env`` adds variables."""
    return subprocess.Popen(
        ecpt_command(["train", "--config", str(config), *extra]),
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=open(log, "w") if log else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        start_new_session=True,
    )


def run_ecpt(args: list[str], timeout: float = TRAIN_TIMEOUT) -> subprocess.CompletedProcess:
    """`ecpt args` to its end, output captured; one that outlives ``timeout`` fails the test with its output."""
    try:
        return subprocess.run(ecpt_command(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"`ecpt {args[0]}` did not finish within {timeout} s:\n"
            f"{_text(exc.stdout)[-3000:]}{_text(exc.stderr)[-5000:]}"
        ) from exc


def _text(output: bytes | str | None) -> str:
    """A TimeoutExpired's captured output: bytes even for text=True runs, or None when nothing came."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def ecpt_train(config: Path, run: Path, *extra: str, timeout: float = TRAIN_TIMEOUT) -> subprocess.CompletedProcess:
    return run_ecpt(["train", "--config", str(config), "--run-dir", str(run), *extra], timeout)


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
