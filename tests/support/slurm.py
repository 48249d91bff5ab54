"""A private single-node Slurm cluster for the integration tests (slurmctld + slurmd + a private munged, all on 127.0.0.1).

Private to the test session: its own munge key and socket, its own ports, its own state directories, SLURM_CONF
passed explicitly to every client call; its daemons are stopped through their pid files."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from elastic.world import free_port
from support.packages import SBIN_PATH, which
from support.processes import pid_alive
from support.waiting import wait_for

SLURM_POLL = 0.2
"""Seconds between checks that run a Slurm client command: poll the daemons gently."""
CLIENT_TIMEOUT = 20
"""SlurmCluster.run's default: a dead slurmctld must not hang a client call."""
CLUSTER_START_BUDGET = 30 + 30 + 15 + 30 + 30 + 30
"""The longest start_slurm_cluster can take: mungekey, munged, its socket, slurmctld, slurmd, the node idle."""
CLUSTER_STOP_BUDGET = 10 + 30 + 3 * (15 + 10)
"""The longest stop_slurm_cluster can take: scancel, the queue draining, each daemon's SIGTERM then SIGKILL."""


def stop_by_pid_file(pid_file: Path, timeout: float = 15) -> None:
    """SIGTERM the daemon named by ``pid_file``, wait for it to exit, SIGKILL if it does not."""
    if not pid_file.is_file():
        return
    text = pid_file.read_text().strip()
    if not text.isdigit():
        return
    pid = int(text)
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not pid_alive(pid), timeout, f"pid {pid} ({pid_file.name}) to exit on SIGTERM", interval=0.1)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 10, f"pid {pid} ({pid_file.name}) to die after SIGKILL")


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    host: str
    pid_files: list[Path] = field(default_factory=list)

    @property
    def env_vars(self) -> dict[str, str]:
        """What every client call needs: this cluster's slurm.conf and the sbin directories."""
        return {"SLURM_CONF": str(self.conf), "PATH": SBIN_PATH}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.env_vars}

    def run(
        self, *args: str, timeout: float = CLIENT_TIMEOUT, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster; ``timeout`` guards against a dead slurmctld."""
        proc = subprocess.run(
            list(args), capture_output=True, text=True, env={**(env or os.environ), **self.env_vars}, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}\n{self.daemon_logs()}"
            )
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def daemon_logs(self, tail: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            for path in self.root.rglob(name):
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path} ---\n" + "\n".join(lines))
        return "\n".join(parts)


def _chown(path: Path, user: str, mode: int) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    path.chmod(mode)


def _start_munge(root: Path) -> tuple[Path, Path]:
    """munged as the munge user with its own key and socket; returns (socket, pid file)."""
    key_dir, run_dir, log_dir = root / "munge-key", root / "munge-run", root / "munge-log"
    for d, mode in ((key_dir, 0o700), (run_dir, 0o755), (log_dir, 0o700)):
        d.mkdir()
        _chown(d, "munge", mode)
    key = key_dir / "munge.key"
    subprocess.run(
        ["mungekey", "--create", f"--keyfile={key}"],
        check=True,
        capture_output=True,
        timeout=30,
        env={**os.environ, "PATH": SBIN_PATH},
    )
    _chown(key, "munge", 0o600)
    sock, pid_file = run_dir / "munge.sock", run_dir / "munged.pid"
    cmd = (
        f"{which('munged')} --socket={sock} --key-file={key} --pid-file={pid_file} "
        f"--log-file={log_dir / 'munged.log'} --seed-file={log_dir / 'munged.seed'}"
    )
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", cmd], check=True, capture_output=True, timeout=30)
    wait_for(lambda: sock.exists() and pid_file.exists(), 15, "munged's socket and pid file", interval=SLURM_POLL)
    return sock, pid_file


def _real_memory_mb() -> int:
    """Half of the machine's memory: slurmd drains a node that reports less than RealMemory."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 // 2
    return 1024


def _slurm_conf(root: Path, host: str, munge_sock: Path) -> str:
    cpus = os.cpu_count() or 1
    return f"""ClusterName=ecpttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_sock},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MpiDefault=none
SchedulerParameters=sched_interval=2,bf_interval=1
MinJobAge=600
KillWait=5
MailProg=/bin/true
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start_slurm_cluster() -> SlurmCluster:
    root = Path(tempfile.mkdtemp(prefix="ecpt-slurm-"))
    root.chmod(0o755)  # munged (as user munge) must reach its folders inside
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    munge_sock, munge_pid = _start_munge(root)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, munge_sock))
    cluster = SlurmCluster(root=root, conf=conf, host=host, pid_files=[munge_pid])
    for daemon, pid_name in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
        cluster.pid_files.append(root / "run" / pid_name)
        subprocess.run([which(daemon), "-f", str(conf)], check=True, capture_output=True, timeout=30, env=cluster.env)

    def idle():
        proc = subprocess.run(
            ["timeout", "10", "sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=cluster.env
        )
        return proc.stdout.strip() == "idle"

    try:
        wait_for(idle, 30, "the Slurm node to become idle", interval=SLURM_POLL)
    except AssertionError as exc:
        logs = cluster.daemon_logs()
        stop_slurm_cluster(cluster)
        raise AssertionError(f"{exc}\n{logs}") from exc
    return cluster


def stop_slurm_cluster(cluster: SlurmCluster) -> None:
    """Cancel what is left of the jobs, then stop slurmd, slurmctld and munged through their pid files."""
    ctld = cluster.root / "run" / "slurmctld.pid"
    if ctld.exists() and pid_alive(int(ctld.read_text().strip() or 0)):
        subprocess.run(["timeout", "10", "scancel", "--user=root"], capture_output=True, env=cluster.env)

        def drained():
            proc = subprocess.run(["timeout", "10", "squeue", "-h"], capture_output=True, text=True, env=cluster.env)
            return proc.returncode == 0 and not proc.stdout.strip()

        try:
            wait_for(drained, 30, "the Slurm queue to drain", interval=SLURM_POLL)
        except AssertionError:
            pass  # the daemons are stopped below either way; their pid files are the authority
    for pid_file in reversed(cluster.pid_files):
        stop_by_pid_file(pid_file)
    shutil.rmtree(cluster.root, ignore_errors=True)
