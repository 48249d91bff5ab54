"""Prometheus servers for the integration tests: real ones on 127.0.0.1, each with a free port and its own
temporary storage."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from elastic.world import free_port
from support.packages import which
from support.waiting import wait_for

READY_TIMEOUT = 30
QUERY_POLL = 0.2
"""Seconds between checks that query the server: poll it gently."""


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

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_prometheus(config: Path, workdir: Path) -> PrometheusServer:
    """A Prometheus with ``config``, its log and storage in ``workdir``, once it answers /-/ready; the caller stops
    it (one that never gets ready is stopped here, and the failure shows its log)."""
    port = free_port()
    log = workdir / f"prometheus-{port}.log"
    cmd = [
        which("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / f'tsdb-{port}'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=info",
    ]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    server = PrometheusServer(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
    try:
        wait_for(
            lambda: _ready(server.url) or proc.poll() is not None,
            READY_TIMEOUT,
            "Prometheus to be ready",
            interval=QUERY_POLL,
        )
        assert proc.poll() is None, f"prometheus exited ({proc.returncode})"
    except AssertionError as exc:
        server.stop()
        raise AssertionError(f"{exc}:\n{log.read_text()[-3000:]}") from exc
    return server
