"""Fault injection by plan: one mechanism for tests, ``ecpt train --fault`` and the chaos benchmark.

A plan is a list of sentences, each firing once per run at the start of a step (before its forward pass):

    kill rank 1 at step 30            SIGKILL that worker (torchrun restarts the worker group)
    kill node n1 at step 50           SIGKILL the agent of node n1 (its workers die with it): the job shrinks
    sigterm all at step 70            SIGTERM every node's agent (preemption): workers save and stop
    stall rank 0 at step 20 for 60s   the rank stops making progress (a hang); the watchdog must catch it
    corrupt newest at step 40         flip bytes in the first chunk of the newest committed checkpoint
    fill disk at step 60              fill the L1 checkpoint file system (only a small one, e.g. a test tmpfs)

"Once per run" is recorded by creating ``<run_dir>/faults/fired-<i>`` exclusively, so a restarted worker that
replays step s does not fire the same fault again.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from elastic.config import ConfigError
from elastic.process_env import AGENT_PID_ENV

KINDS = ("kill", "kill_node", "sigterm", "stall", "corrupt", "fill_disk")
_PATTERNS = [
    ("kill", re.compile(r"^kill rank (?P<rank>\d+) at step (?P<step>\d+)$")),
    ("kill_node", re.compile(r"^kill node (?P<node>\S+) at step (?P<step>\d+)$")),
    ("sigterm", re.compile(r"^sigterm all at step (?P<step>\d+)$")),
    ("stall", re.compile(r"^stall rank (?P<rank>\d+) at step (?P<step>\d+) for (?P<seconds>[\d.]+)s$")),
    ("corrupt", re.compile(r"^corrupt newest at step (?P<step>\d+)$")),
    ("fill_disk", re.compile(r"^fill disk at step (?P<step>\d+)$")),
]
FILL_DISK_MAX_BYTES = 2 << 30
"""fill_disk refuses file systems with more free space than this: it is for test file systems, not real disks."""


@dataclass(frozen=True)
class Fault:
    index: int
    kind: str
    step: int
    rank: int | None = None
    node: str | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        """The fault as a plan sentence (parse_plan(describe()) gives the fault back)."""
        subject = {"kill": f"kill rank {self.rank}", "kill_node": f"kill node {self.node}", "sigterm": "sigterm all",
                   "stall": f"stall rank {self.rank}", "corrupt": "corrupt newest", "fill_disk": "fill disk"}
        return f"{subject[self.kind]} at step {self.step}" + (f" for {self.seconds:g}s" if self.kind == "stall" else "")


def parse_plan(sentences: list[str]) -> list[Fault]:
    faults = []
    for i, text in enumerate(sentences):
        norm = " ".join(text.lower().split())
        for kind, pattern in _PATTERNS:
            m = pattern.match(norm)
            if m:
                g = m.groupdict()
                faults.append(Fault(index=i, kind=kind, step=int(g["step"]),
                                    rank=int(g["rank"]) if g.get("rank") else None, node=g.get("node"),
                                    seconds=float(g.get("seconds") or 0)))
                break
        else:
            raise ConfigError(f"faults.plan[{i}] {text!r} is not a fault; write e.g. 'kill rank 1 at step 30', "
                              f"'kill node n1 at step 50', 'sigterm all at step 70', 'stall rank 0 at step 20 for "
                              f"60s', 'corrupt newest at step 40' or 'fill disk at step 60'")
    return faults


def agent_pid() -> int:
    """This worker's elastic agent: named by ``launch.agent``, else the parent process (plain torchrun)."""
    return int(os.environ.get(AGENT_PID_ENV) or os.getppid())


class FaultInjector:
    """Runs inside every worker; ``at_step(step)`` fires the faults that target this rank at this step."""

    def __init__(self, faults: list[Fault], run_dir: Path, rank: int, local_rank: int, node_id: str,
                 checkpoint_levels: list[tuple[Path, int]], log):
        self.faults, self.rank, self.local_rank, self.node_id = faults, rank, local_rank, node_id
        self.marks = run_dir / "faults"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.levels, self.log = checkpoint_levels, log
        self.roots = [root for root, _interval in checkpoint_levels]

    def _targets_me(self, f: Fault) -> bool:
        if f.kind in ("kill", "stall"):
            return f.rank == self.rank
        if f.kind == "kill_node":
            return f.node == self.node_id and self.local_rank == 0
        if f.kind == "sigterm":
            return self.local_rank == 0  # one signal per node's agent
        return self.rank == 0  # corrupt, fill_disk: done once, by rank 0

    def _claim(self, f: Fault) -> bool:
        """Exclusive create: True for exactly one process over the whole run (per node for node-wide faults)."""
        suffix = f"-{self.node_id}" if f.kind == "sigterm" else ""
        try:
            fd = os.open(self.marks / f"fired-{f.index}{suffix}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, json.dumps({"fault": f.describe(), "index": f.index, "kind": f.kind, "step": f.step,
                                 "rank": self.rank, "node": self.node_id, "time": time.time()}).encode())
        os.close(fd)
        return True

    def at_step(self, step: int) -> None:
        for f in self.faults:
            if f.step == step and self._targets_me(f) and self._claim(f):
                self.log.warning(f"fault injected: {f.describe()}")
                getattr(self, f"_do_{f.kind}")(f)

    def _do_kill(self, f: Fault) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def _do_kill_node(self, f: Fault) -> None:
        os.kill(agent_pid(), signal.SIGKILL)  # its workers follow through PR_SET_PDEATHSIG

    def _do_sigterm(self, f: Fault) -> None:
        os.kill(agent_pid(), signal.SIGTERM)

    def _do_stall(self, f: Fault) -> None:
        time.sleep(f.seconds)  # the simulated hang itself: this rank makes no progress for f.seconds

    def _wait_for_due_checkpoint(self, f: Fault) -> None:
        """Saves persist asynchronously: wait until the newest checkpoint due before this step has committed, so
        a fault on "the newest checkpoint" or "the disk" always meets the same state."""
        due = max((f.step // interval * interval for _root, interval in self.levels), default=0)
        if due:
            wait_for_commit(self.roots, due, timeout=CORRUPT_WAIT_SECONDS)

    def _do_corrupt(self, f: Fault) -> None:
        self._wait_for_due_checkpoint(f)
        path = corrupt_newest_checkpoint(self.roots)
        self.log.warning(f"corrupted {path}")

    def _do_fill_disk(self, f: Fault) -> None:
        self._wait_for_due_checkpoint(f)
        path = fill_file_system(self.roots[-1] if self.roots else Path("."))
        self.log.warning(f"filled the file system of {path}")


CORRUPT_WAIT_SECONDS = 120.0


def wait_for_commit(roots: list[Path], step: int, timeout: float) -> Path:
    """Block until ``step-<step>/manifest.json`` exists under one of ``roots`` (committed), or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for root in roots:
            path = root / f"step-{step:08d}"
            if (path / "manifest.json").exists():
                return path
        time.sleep(0.05)
    raise TimeoutError(f"checkpoint of step {step} did not commit under {[str(r) for r in roots]} in {timeout} s")


def newest_chunk_files(roots: list[Path]) -> list[Path]:
    """Chunk files (zarr v3 'c/...' keys) of the newest committed checkpoint over the given level roots."""
    newest = None
    for root in roots:
        for d in sorted(root.glob("step-*")):
            if (d / "manifest.json").exists() and "." not in d.name and (newest is None or d.name > newest.name):
                newest = d
    if newest is None:
        return []
    return sorted(p for p in newest.rglob("*") if p.is_file() and "c" in p.relative_to(newest).parts)


def corrupt_newest_checkpoint(roots: list[Path]) -> Path:
    chunks = newest_chunk_files(roots)
    if not chunks:
        raise FileNotFoundError(f"no committed checkpoint with chunk files under {[str(r) for r in roots]}")
    target = chunks[0]
    with open(target, "r+b") as fh:
        data = bytearray(fh.read(64))
        fh.seek(0)
        fh.write(bytes(b ^ 0xFF for b in data))
    return target


def fill_file_system(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free > FILL_DISK_MAX_BYTES:
        raise ConfigError(f"fill disk: {directory} has {free / 2**30:.1f} GiB free; this fault only fills small test "
                          f"file systems (<= {FILL_DISK_MAX_BYTES >> 30} GiB), e.g. a tmpfs mounted for the test")
    filler = directory / ".ecpt-fill"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
                fh.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise  # only "no space left" is the expected end of filling
    return filler


class Watchdog:
    """Exits this worker when no step completes within ``timeout`` seconds (a hung rank or a stuck collective).

    The ranks blocked behind a hung peer exit too, so torchrun sees failed workers and restarts the group,
    killing the hung one. A thread, so it runs while the main thread is blocked in C++ (a collective) or asleep.
    """

    EXIT_CODE = 75

    def __init__(self, timeout: float, log):
        self.timeout, self.log = timeout, log
        self.last = time.monotonic()
        self._stop = False
        import threading

        self._thread = threading.Thread(target=self._run, name="ecpt-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.last = time.monotonic()
        if self.timeout > 0:
            self._thread.start()
        return self

    def progress(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop = True

    def _run(self) -> None:
        while not self._stop:
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                self.log.error(f"watchdog: no step completed for {idle:.1f} s (> train.hang_timeout "
                               f"{self.timeout:g} s); exiting so the agent restarts the worker group")
                os._exit(self.EXIT_CODE)
            time.sleep(min(1.0, self.timeout / 4))


def random_plan(seed: int, total_steps: int, count: int, ranks: int) -> list[str]:
    """``count`` worker kills and stalls at distinct random steps, reproducible from ``seed``."""
    import random

    rng = random.Random(seed)
    steps = sorted(rng.sample(range(max(total_steps // 10, 1), max(total_steps - 2, 2)), count))
    plan = []
    for step in steps:
        rank = rng.randrange(ranks)
        plan.append(f"kill rank {rank} at step {step}" if rng.random() < 0.7
                    else f"stall rank {rank} at step {step} for 600s")
    return plan


def fired_faults(run_dir: Path) -> list[dict]:
    """The faults that fired in a run, oldest first (from their once-per-run marker files)."""
    rows = [json.loads(p.read_text()) for p in (run_dir / "faults").glob("fired-*")]
    return sorted(rows, key=lambda r: r["time"])
