"""Fault injection by plan: one mechanism for tests, ``ecpt train --fault`` and the chaos benchmark.

The plan's sentences are parsed by ``elastic.fault_plan``; this module carries them out inside every worker, each
once per run at the start of its step (before the forward pass).

"Once per run" is recorded by creating ``<run_dir>/faults/fired-<i>`` (``elastic.fault_plan.fired_marker``) exclusively, so a restarted worker that
replays step s does not fire the same fault again.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from checkpointing import MANIFEST_NAME, chunk_files, newest_committed, step_dir_name
from elastic.errors import ConfigError
from elastic.fault_plan import FIRED_DIR, Fault, fired_marker, released_marker
from elastic.process_env import AGENT_PID_ENV, COORDINATOR_FILE

FILL_DISK_MAX_BYTES = 2 << 30
"""fill_disk refuses file systems with more free space than this: it is for test file systems, not real disks."""


def agent_pid() -> int:
    """This worker's elastic agent: named by ``launch.agent``, else the parent process (plain torchrun)."""
    return int(os.environ.get(AGENT_PID_ENV) or os.getppid())


class FaultInjector:
    """Runs inside every worker; ``at_step(step)`` fires the faults that target this rank at the start of this
    step, ``mid_step(step)`` those that fire during it ("kill rank R during step S")."""

    def __init__(
        self,
        faults: list[Fault],
        run_dir: Path,
        rank: int,
        local_rank: int,
        node_id: str,
        checkpoint_levels: list[tuple[Path, int]],
        log,
        freeze_stalls: bool = False,
    ):
        self.freeze_stalls = freeze_stalls
        """replicas mode: a stall freezes the whole process (SIGSTOP), so its heartbeats to the coordinator stop
        too; a sleeping Python thread would leave torchft's heartbeat thread running and the replica 'healthy'."""
        self.faults, self.rank, self.local_rank, self.node_id = faults, rank, local_rank, node_id
        self.run_dir = run_dir
        (run_dir / FIRED_DIR).mkdir(parents=True, exist_ok=True)
        self.levels, self.log = checkpoint_levels, log
        self.roots = [root for root, _interval in checkpoint_levels]
        self.released: set[int] = set()
        """Indexes of the 'until' faults whose replacement this process has released."""

    def _targets_me(self, f: Fault) -> bool:
        if f.kind in ("kill", "kill_mid_step", "stall"):
            return f.rank == self.rank
        if f.kind == "kill_node":
            return f.node == self.node_id and self.local_rank == 0
        if f.kind == "sigterm":
            return self.local_rank == 0  # one signal per node's agent
        return self.rank == 0  # corrupt, fill_disk, kill_coordinator: done once, by rank 0

    def _claim(self, f: Fault) -> bool:
        """Exclusive create: True for exactly one process over the whole run (per node for node-wide faults)."""
        try:
            fd = os.open(fired_marker(self.run_dir, f, self.node_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(
            fd,
            json.dumps(
                {
                    "fault": f.describe(),
                    "index": f.index,
                    "kind": f.kind,
                    "step": f.step,
                    "rank": self.rank,
                    "node": self.node_id,
                    "time": time.time(),
                }
            ).encode(),
        )
        os.close(fd)
        return True

    def at_step(self, step: int) -> None:
        self._release_replacements(step)
        self._fire(step, mid_step=False)

    def hold_if_replacement(self) -> None:
        """Before this worker joins the job: if it replaces a rank killed by a 'kill ... until step T' fault, wait
        until a survivor has started step T (``released_marker``), or raise after HOLD_TIMEOUT_SECONDS."""
        for f in self.faults:
            if f.until is None or not self._targets_me(f) or not fired_marker(self.run_dir, f, self.node_id).exists():
                continue
            released = released_marker(self.run_dir, f)
            if not released.exists():
                self.log.warning(f"fault plan: this replacement waits for the survivors to start step {f.until}")
                wait_for_file(released, HOLD_TIMEOUT_SECONDS, f"a survivor to start step {f.until} ({f.describe()!r})")

    def finish(self) -> None:
        """The run ended here: release every held replacement, even one whose 'until' step lies past the end."""
        self._release_replacements(step=None)

    def _release_replacements(self, step: int | None) -> None:
        for f in self.faults:
            if f.until is None or f.index in self.released or self._targets_me(f):
                continue
            if (step is None or step >= f.until) and fired_marker(self.run_dir, f, self.node_id).exists():
                released_marker(self.run_dir, f).touch()
                self.released.add(f.index)

    def mid_step(self, step: int) -> None:
        """After this rank's forward/backward of ``step``, before the step's gradient exchange."""
        self._fire(step, mid_step=True)

    def _fire(self, step: int, mid_step: bool) -> None:
        for f in self.faults:
            if (f.kind == "kill_mid_step") != mid_step:
                continue
            if f.step == step and self._targets_me(f) and self._claim(f):
                self.log.warning(f"fault injected: {f.describe()}")
                getattr(self, f"_do_{f.kind}")(f)

    def _do_kill(self, f: Fault) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    _do_kill_mid_step = _do_kill

    def _do_kill_node(self, f: Fault) -> None:
        os.kill(agent_pid(), signal.SIGKILL)  # its workers follow through PR_SET_PDEATHSIG

    def _do_sigterm(self, f: Fault) -> None:
        os.kill(agent_pid(), signal.SIGTERM)

    def _do_stall(self, f: Fault) -> None:
        if self.freeze_stalls:
            # a detached helper resumes us: nothing in this process runs while it is stopped
            subprocess.Popen(["sh", "-c", f"sleep {f.seconds}; kill -CONT {os.getpid()}"], start_new_session=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        time.sleep(f.seconds)  # the simulated hang itself: this rank makes no progress for f.seconds

    def _do_kill_coordinator(self, f: Fault) -> None:
        path = self.run_dir / COORDINATOR_FILE
        if not path.exists():
            raise ConfigError(
                f"fault {f.describe()!r}: {path} does not exist; only a coordinator that `ecpt train` started "
                f'(launch.fault_tolerance = "replicas", launch.lighthouse empty) can be killed by plan'
            )
        os.kill(json.loads(path.read_text())["pid"], signal.SIGKILL)

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
HOLD_TIMEOUT_SECONDS = 600.0
"""How long a held replacement waits for the survivors to reach its fault's 'until' step."""


def _poll(condition, timeout: float):
    """``condition()`` every 50 ms until it returns something truthy (returned), or None after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return None


def wait_for_file(path: Path, timeout: float, what: str) -> None:
    """Block until ``path`` exists, or raise TimeoutError naming ``what`` was awaited."""
    if not _poll(path.exists, timeout):
        raise TimeoutError(f"waited {timeout:g} s for {what}: {path} never appeared")


def wait_for_commit(roots: list[Path], step: int, timeout: float) -> Path:
    """Block until the checkpoint of ``step`` is committed (its manifest exists) under one of ``roots``, or raise."""
    candidates = [root / step_dir_name(step) for root in roots]
    path = _poll(lambda: next((p for p in candidates if (p / MANIFEST_NAME).exists()), None), timeout)
    if path is None:
        raise TimeoutError(f"checkpoint of step {step} did not commit under {[str(r) for r in roots]} in {timeout} s")
    return path


def newest_chunk_files(roots: list[Path]) -> list[Path]:
    """Chunk files of the newest committed checkpoint over the given level roots."""
    newest = newest_committed(roots)
    return chunk_files(newest) if newest is not None else []


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
        raise ConfigError(
            f"fill disk: {directory} has {free / 2**30:.1f} GiB free; this fault only fills small test "
            f"file systems (<= {FILL_DISK_MAX_BYTES >> 30} GiB), e.g. a tmpfs mounted for the test"
        )
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
