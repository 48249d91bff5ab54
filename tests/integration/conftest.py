"""Real components for integration tests: Debian packages installed on demand, a private single-node Slurm cluster,
and Prometheus servers on 127.0.0.1.

Packages come from apt when missing (root only); a test is skipped, with the reason, only when apt cannot deliver
them. The Slurm cluster is private to the test session (own munge key and socket, own ports, own state directories,
SLURM_CONF passed explicitly to every client call) and its daemons are stopped through their pid files.
Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from helpers import wait_for

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin"
_apt_updated = False


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    return wait_for(check, timeout, what, interval=interval)


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    """``wait_until(check, timeout, what)`` for test modules (a conftest is not importable by name)."""
    return wait_until


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# Debian packages on demand.


def _apt(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=180", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def ensure_debian_packages(binaries: list[str], packages: list[str]) -> dict[str, str]:
    """Paths of ``binaries``, installing ``packages`` with apt-get first if any is missing; skip if impossible."""
    global _apt_updated
    missing = [b for b in binaries if not which(b)]
    if missing:
        if os.geteuid() != 0 or not which("apt-get"):
            pytest.skip(f"{missing} not installed and apt-get is unavailable (or not root) to install {packages}")
        if not _apt_updated:
            _apt(["update", "-qq"], timeout=300)
            _apt_updated = True
        proc = _apt(["install", "-y", "-qq", "--no-install-recommends", *packages], timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"apt-get could not install {packages}: {proc.stderr.strip()[-500:]}")
    paths = {b: which(b) for b in binaries}
    still = [b for b, p in paths.items() if not p]
    if still:
        pytest.skip(f"{still} still missing after installing {packages}")
    return paths


# ---------------------------------------------------------------------------------------------------------------
# A private single-node Slurm cluster (shared/NOTES.md recipe).


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stop_by_pid_file(pid_file: Path, timeout: float = 15) -> None:
    """SIGTERM the daemon named by ``pid_file``, wait for it to exit, SIGKILL if it does not."""
    if not pid_file.is_file():
        return
    text = pid_file.read_text().strip()
    if not text.isdigit():
        return
    pid = int(text)
    if not _pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _pid_alive(pid), 10, f"pid {pid} ({pid_file.name}) to die after SIGKILL")


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

    def run(self, *args: str, timeout: float = 20, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster; ``timeout`` guards against a dead slurmctld."""
        proc = subprocess.run(list(args), capture_output=True, text=True, env={**(env or os.environ), **self.env_vars},
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}\n"
                                 f"{self.daemon_logs()}")
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
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30,
                   env={**os.environ, "PATH": SBIN_PATH})
    _chown(key, "munge", 0o600)
    sock, pid_file = run_dir / "munge.sock", run_dir / "munged.pid"
    cmd = (f"{which('munged')} --socket={sock} --key-file={key} --pid-file={pid_file} "
           f"--log-file={log_dir / 'munged.log'} --seed-file={log_dir / 'munged.seed'}")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", cmd], check=True, capture_output=True, timeout=30)
    wait_until(lambda: sock.exists() and pid_file.exists(), 15, "munged's socket and pid file")
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
        subprocess.run([which(daemon), "-f", str(conf)], check=True, capture_output=True, timeout=30,
                       env=cluster.env)

    def idle():
        proc = subprocess.run(["timeout", "10", "sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              env=cluster.env)
        return proc.stdout.strip() == "idle"

    try:
        wait_until(idle, 30, "the Slurm node to become idle")
    except AssertionError as exc:
        logs = cluster.daemon_logs()
        stop_slurm_cluster(cluster)
        raise AssertionError(f"{exc}\n{logs}") from exc
    return cluster


def stop_slurm_cluster(cluster: SlurmCluster) -> None:
    """Cancel what is left of the jobs, then stop slurmd, slurmctld and munged through their pid files."""
    ctld = cluster.root / "run" / "slurmctld.pid"
    if ctld.exists() and _pid_alive(int(ctld.read_text().strip() or 0)):
        subprocess.run(["timeout", "10", "scancel", "--user=root"], capture_output=True, env=cluster.env)

        def drained():
            proc = subprocess.run(["timeout", "10", "squeue", "-h"], capture_output=True, text=True,
                                  env=cluster.env)
            return proc.returncode == 0 and not proc.stdout.strip()

        try:
            wait_until(drained, 30, "the Slurm queue to drain")
        except AssertionError:
            pass  # the daemons are stopped below either way; their pid files are the authority
    for pid_file in reversed(cluster.pid_files):
        stop_by_pid_file(pid_file)
    shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private single-node Slurm cluster (slurmctld + slurmd + munged on 127.0.0.1) for the whole session."""
    ensure_debian_packages(["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged", "mungekey"],
                           ["slurm-wlm", "munge"])
    if os.geteuid() != 0:
        pytest.skip("a private Slurm cluster needs root (slurmd runs jobs as their users)")
    cluster = start_slurm_cluster()
    try:
        yield cluster
    finally:
        stop_slurm_cluster(cluster)


# ---------------------------------------------------------------------------------------------------------------
# Prometheus.


@pytest.fixture(scope="session")
def promtool() -> str:
    return ensure_debian_packages(["promtool", "prometheus"], ["prometheus"])["promtool"]


@dataclass
class PrometheusServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def query(self, promql: str) -> list[dict]:
        """Instant query through the HTTP API; returns the result vector."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def targets(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as resp:
            return json.load(resp)["data"]["activeTargets"]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def prometheus_server(promtool, tmp_path):
    """Factory: start a real Prometheus on 127.0.0.1 (free port, temporary storage) with a given config file."""
    started: list[PrometheusServer] = []

    def start(config: Path) -> PrometheusServer:
        port = free_port()
        log = tmp_path / f"prometheus-{port}.log"
        cmd = [which("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / f'tsdb-{port}'}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"]
        proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        server = PrometheusServer(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
        started.append(server)
        wait_until(lambda: _ready(server.url) or proc.poll() is not None, 30, "Prometheus to be ready")
        assert proc.poll() is None, f"prometheus exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        return server

    yield start
    for server in started:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
