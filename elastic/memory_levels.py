"""Node memory belongs to the user, not to a run: who owns an L0 (memory) checkpoint, when a run may restore from
it, and when it is freed.

Layout under ``checkpoint.l0_dir`` (default /dev/shm/ecpt), one entry per run identity:

    <run key>-<run id>/                   run key: hash of the run directory's path; run id: random, see rule 1
        owner-<node id>.json              who uses this entry on that node (rule 2)
        <node id>/step-XXXXXXXX/...       that node's L0 level root

Rules:

1. Identity. A run's identity is a random id written to ``<run dir>/run-id`` the first time any process of the
   run needs it, by exclusive create (hard link of a complete temporary file), so agents and ranks that start at
   once agree on one. Its L0 entry carries the id in its name, so a run never even sees another identity's memory
   checkpoints: deleting the run directory and training again starts from step 0 (the memory of the earlier run
   with that directory is ignored, with one log line, and reaped under rule 4). A restart of the same run (worker
   restart, elastic resize, ``ecpt train`` again on the same run directory) reads the same id, so the same entry.
   A run directory that is not shared between nodes gets one id per node; L0 is node-local, so that is enough.
2. Ownership. At every start, each node's first worker records in ``owner-<node id>.json`` the process that
   keeps the run alive on this node (the elastic agent; the worker itself when nothing restarts it), with that
   process's start time from ``/proc/<pid>/stat``, the host and the pid namespace. The owner is alive when a
   process with that pid exists, is not a zombie and started at the recorded time (so a reused pid is not taken
   for the owner). On another host or in another pid namespace its liveness is unknown.
3. Release. When a run finishes or stops on a signal and the newest step in a node's L0 is committed on a slower
   level (L1/L2), that node's L0 directory and owner record are removed (the entry too once no node is left in
   it). If that step exists only in memory (no slower level, or its save failed) the memory is kept and the reason
   logged: it is the run's newest state. A crash releases nothing: the restart restores from memory.
4. Staleness. An entry is stale when none of its owners is alive (a crashed or finished run), or when no owner's
   liveness can be known and nothing in it changed for ``checkpoint.l0_stale_after_s``. An entry with a live
   owner is never stale: deleting it would fail that run's saves and lose its fastest restart. Every run start
   reaps the stale entries of other runs (never its own: a restart of a crashed run must find its memory), and
   ``ecpt ckpt gc`` lists or removes them; another user's entries are never removed. An unreadable owner record
   makes liveness unknown, like entries of the layout before identities (``<run key>/<node id>/step-*``, no owner
   record): only age makes those stale. Removal first renames an entry to ``.reaping-*`` (atomic, so one of
   several concurrent reapers wins) and then deletes it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from checkpointing import list_checkpoints

RUN_ID_FILE = "run-id"
"""The run's identity, in its run directory."""
OWNER_PREFIX = "owner-"
REAPING_PREFIX = ".reaping-"
_RUN_ID = re.compile(r"^[0-9a-f]{12}$")
_ENTRY = re.compile(r"^(?P<key>[0-9a-f]{12})(?:-(?P<id>[0-9a-f]{12}))?$")


class MemoryLevelError(RuntimeError):
    """A run identity or owner record that cannot be read as written."""


# ------------------------------------------------------------------------------------------------ rule 1: identity


def run_identity(run_dir: str | Path, create: bool = True) -> str | None:
    """This run's id from ``<run_dir>/run-id``, created (exclusively, complete or not at all) if absent, or None
    if absent and not ``create``."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_ID_FILE
    if not path.exists() and not create:
        return None
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{RUN_ID_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(secrets.token_hex(6) + "\n")
        try:
            os.link(tmp, path)  # fails if another process created it first: then theirs is the identity
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    run_id = path.read_text().strip()
    if not _RUN_ID.match(run_id):
        raise MemoryLevelError(
            f"{path} holds {run_id!r}, not a run id (12 hex digits); it identifies this run's "
            f"memory checkpoints: restore it, or delete it to start the run over"
        )
    return run_id


def entry_name(run_key: str, run_id: str) -> str:
    return f"{run_key}-{run_id}"


# ------------------------------------------------------------------------------------------------ rule 2: owners


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), or None if no such live process
    (absent or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may contain spaces
    if fields[0] == "Z":
        return None
    return int(fields[19])


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Owner:
    """Who keeps a run alive on one node: the contents of ``owner-<node id>.json``."""

    run_dir: str
    run_id: str
    node: str
    host: str
    pid_namespace: str
    pid: int
    pid_started: int
    claimed_unix: float

    def alive(self) -> bool | None:
        """True/False when this host and pid namespace can tell, None when they cannot."""
        if self.host != os.uname().nodename or self.pid_namespace != pid_namespace():
            return None
        return process_start_ticks(self.pid) == self.pid_started


def owner_process(agent_pid: str | None, launcher: str) -> int:
    """The process whose life is the run's life on this node: the ecpt agent (``ECPT_AGENT_PID``), else plain
    torchrun's agent (the worker's parent), else the worker itself (srun, mpiexec: nothing restarts it)."""
    if agent_pid:
        return int(agent_pid)
    return os.getppid() if launcher == "torchrun" else os.getpid()


def claim(entry: Path, node: str, run_dir: str | Path, run_id: str, pid: int) -> Owner:
    """Record ``pid`` (now running) as the owner of ``entry`` on ``node``; replaces an earlier start's record."""
    started = process_start_ticks(pid)
    if started is None:
        raise MemoryLevelError(f"cannot claim {entry} for process {pid}: no such live process")
    owner = Owner(
        run_dir=str(run_dir),
        run_id=run_id,
        node=node,
        host=os.uname().nodename,
        pid_namespace=pid_namespace(),
        pid=pid,
        pid_started=started,
        claimed_unix=time.time(),
    )
    entry.mkdir(parents=True, exist_ok=True)
    for leftover in entry.glob(f"{REAPING_PREFIX}*"):  # a release of this node that a crash interrupted
        remove_entry(leftover)
    path = entry / f"{OWNER_PREFIX}{node}.json"
    tmp = entry / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.write_text(json.dumps(asdict(owner)))
    os.replace(tmp, path)
    return owner


def read_owners(entry: Path) -> tuple[list[Owner], list[Path]]:
    """The owner records of ``entry``, and the files that are not owner records (edited by hand, another
    version): those make the entry's liveness unknown rather than stopping every run's start."""
    owners, unreadable = [], []
    for path in sorted(entry.glob(f"{OWNER_PREFIX}*.json")):
        try:
            owners.append(Owner(**json.loads(path.read_text())))
        except FileNotFoundError:
            continue  # released by its node meanwhile
        except (ValueError, TypeError):
            unreadable.append(path)
    return owners, unreadable


# --------------------------------------------------------------------------------------------- rule 4: staleness


@dataclass(frozen=True)
class MemoryEntry:
    """One run identity's memory checkpoints under an L0 root (or a half-removed ``.reaping-*`` leftover)."""

    path: Path
    run_key: str
    run_id: str | None
    """None: the layout before run identities, or a leftover of an interrupted removal."""
    owners: list[Owner]
    unreadable_owners: list[Path]
    last_change_unix: float
    nbytes: int
    uid: int
    """The entry directory's owning user: only the user's own entries are ever removed."""


def _last_change(entry: Path) -> float:
    """Newest modification of the entry, its owner records and node directories (a commit renames a step
    directory into its node directory, so this moves with every save)."""
    times = [entry.stat().st_mtime]
    for child in entry.iterdir():
        try:
            times.append(child.stat().st_mtime)
        except FileNotFoundError:
            continue
    return max(times)


def _nbytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _is_legacy_entry(path: Path) -> bool:
    """``<run key>/<node id>/step-*``: an L0 entry written before run identities."""
    return any(node.is_dir() and any(node.glob("step-*")) for node in path.iterdir())


def scan(l0_root: str | Path) -> list[MemoryEntry]:
    """The ecpt memory entries under ``l0_root``; anything else there is not ours and never listed."""
    root = Path(l0_root)
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        try:
            if not path.is_dir():
                continue
            if path.name.startswith(REAPING_PREFIX):
                entries.append(
                    MemoryEntry(path, "", None, [], [], _last_change(path), _nbytes(path), path.stat().st_uid)
                )
                continue
            match = _ENTRY.match(path.name)
            if not match or (match["id"] is None and not _is_legacy_entry(path)):
                continue
            owners, unreadable = read_owners(path)
            entries.append(
                MemoryEntry(
                    path,
                    match["key"],
                    match["id"],
                    owners,
                    unreadable,
                    _last_change(path),
                    _nbytes(path),
                    path.stat().st_uid,
                )
            )
        except FileNotFoundError:
            continue  # removed by a concurrent reaper or release
    return entries


def stale_reason(entry: MemoryEntry, stale_after_s: float, now: float | None = None) -> str | None:
    """Why ``entry`` may be deleted (rule 4), or None if it must be kept."""
    if entry.uid != os.getuid():
        return None  # another user's: their processes may be hidden from us, and the memory is theirs to free
    if entry.path.name.startswith(REAPING_PREFIX):
        return "left over from an interrupted removal"
    known = [(o, o.alive()) for o in entry.owners]
    live = [o for o, alive in known if alive]
    if live:
        return None
    if known and all(alive is False for _o, alive in known) and not entry.unreadable_owners:
        return "no live owner: " + ", ".join(f"process {o.pid} on node {o.node} has ended" for o, _ in known)
    age = (time.time() if now is None else now) - entry.last_change_unix
    if age > stale_after_s:
        why = (
            "unreadable owner records"
            if entry.unreadable_owners
            else "no owner record"
            if not known
            else "owners on another host or pid namespace"
        )
        return f"{why} and unchanged for {age:.0f} s (> checkpoint.l0_stale_after_s = {stale_after_s:g})"
    return None


def remove_entry(path: Path) -> bool:
    """Rename ``path`` aside (atomic: one concurrent remover wins), then delete it. False if someone else won."""
    target = (
        path
        if path.name.startswith(REAPING_PREFIX)
        else path.with_name(f"{REAPING_PREFIX}{path.name}-{secrets.token_hex(4)}")
    )
    if target != path:
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return False
    shutil.rmtree(target, onerror=_ignore_vanished)
    return True


def _ignore_vanished(_function, _path, exc_info) -> None:
    """A concurrent remover of a ``.reaping-*`` leftover deleted it first; anything else is a real error."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def reap_stale(
    l0_root: str | Path, stale_after_s: float, spare: Path | None = None, dry_run: bool = False, log=None
) -> list[tuple[MemoryEntry, str]]:
    """Remove (or with ``dry_run`` only list) the stale entries under ``l0_root``, except ``spare`` (the caller's
    own entry). Returns (entry, reason) for each."""
    found = []
    for entry in scan(l0_root):
        if spare is not None and entry.path == spare:
            continue
        reason = stale_reason(entry, stale_after_s)
        if reason is None:
            continue
        if dry_run or remove_entry(entry.path):
            found.append((entry, reason))
            if log is not None and not dry_run:
                log.info(f"freed {entry.nbytes / 1e6:.1f} MB of stale memory checkpoints {entry.path}: {reason}")
    return found


def foreign_entries(l0_root: str | Path, run_key: str, run_id: str) -> list[MemoryEntry]:
    """Entries of earlier runs in the same run directory (same key, other identity, or the old layout)."""
    return [e for e in scan(l0_root) if e.run_key == run_key and e.run_id != run_id]


# ------------------------------------------------------------------------------------------------ rule 3: release


def release(entry: Path, node: str, slower_roots: list[str | Path], log) -> bool:
    """Free ``node``'s memory in ``entry`` if its newest step is committed on a slower level; True if freed."""
    node_dir, owner = entry / node, entry / f"{OWNER_PREFIX}{node}.json"
    if not node_dir.exists() and not owner.exists():
        return False  # this node never held memory checkpoints of the run
    in_memory = [c.step for c in list_checkpoints(node_dir) if c.complete] if node_dir.is_dir() else []
    durable = {c.step for root in slower_roots for c in list_checkpoints(root) if c.complete}
    if in_memory and in_memory[-1] not in durable:
        where = (
            "no slower level is configured"
            if not slower_roots
            else f"the slower levels' newest is {max(durable) if durable else 'nothing'}"
        )
        log.warning(
            f"keeping memory checkpoints {node_dir}: their newest step {in_memory[-1]} is only in memory "
            f"({where}); they are freed by the next run on this node once this run's owner has ended, or "
            f"by `ecpt ckpt gc`"
        )
        return False
    if node_dir.exists():
        remove_entry(node_dir)
    owner.unlink(missing_ok=True)
    try:
        entry.rmdir()  # the last node of this run on this machine removes the entry itself
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # else another node of this run still has memory here
            raise
    log.info(
        f"freed memory checkpoints {node_dir}"
        + (f": step {in_memory[-1]} is durable on a slower level" if in_memory else "")
    )
    return True
