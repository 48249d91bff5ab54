"""``ecpt lighthouse``: torchft's quorum coordinator (the Lighthouse, Rust, shipped in the torchft wheel).

Replicas-mode jobs ask it for a quorum at every step. ``ecpt train`` starts one for a local run
(``launch.replicas_node``); on a cluster run it on a host that outlives the training nodes and point
``launch.lighthouse`` (or TORCHFT_LIGHTHOUSE) at it. Losing it stops the job with a clear error (README,
"Replicas mode"); the replicas' checkpoints are unaffected and a restart resumes from them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path


def serve_lighthouse(
    host: str,
    port: int,
    min_replicas: int,
    heartbeat_timeout_ms: int,
    join_timeout_ms: int,
    quorum_tick_ms: int = 50,
    address_file: str | None = None,
) -> None:
    """Run the Lighthouse until SIGINT/SIGTERM; print its address (and write it to ``address_file``)."""
    # torchft's Rust side logs every quorum request at INFO (several lines per replica per step): warnings only,
    # unless the user set RUST_LOG. Read when the extension is imported, so set before.
    os.environ.setdefault("RUST_LOG", "warn")
    from torchft._torchft import LighthouseServer  # imports the Rust extension only when serving

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # sigwait receives them below
    server = LighthouseServer(
        bind=f"{host}:{port}",
        min_replicas=min_replicas,
        join_timeout_ms=join_timeout_ms,
        quorum_tick_ms=quorum_tick_ms,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
    )
    address = f"http://{host if host not in ('0.0.0.0', '[::]') else os.uname().nodename}:{port}"
    if address_file:
        tmp = Path(f"{address_file}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"address": address, "pid": os.getpid()}))
        os.replace(tmp, address_file)
    print(
        f"lighthouse listening on {address} (min_replicas {min_replicas}, heartbeat timeout "
        f"{heartbeat_timeout_ms} ms, join timeout {join_timeout_ms} ms); stop it with Ctrl-C",
        flush=True,
    )
    stop = signal.sigwait({signal.SIGINT, signal.SIGTERM})
    print(f"lighthouse stopping on signal {stop}", flush=True)
    server.shutdown()


def cmd_lighthouse(args: argparse.Namespace) -> int:
    serve_lighthouse(
        args.host,
        args.port,
        args.min_replicas,
        args.heartbeat_timeout_ms,
        args.join_timeout_ms,
        args.quorum_tick_ms,
        args.address_file,
    )
    return 0


def add_lighthouse_parser(sub) -> None:
    p = sub.add_parser("lighthouse", help="run torchft's quorum coordinator for launch.fault_tolerance=replicas")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    p.add_argument("--port", type=int, default=29510)
    p.add_argument("--min-replicas", type=int, default=1, help="fewest replicas a quorum may have")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=500, help="a replica silent this long is dropped")
    p.add_argument("--join-timeout-ms", type=int, default=1000, help="wait this long for heartbeating stragglers")
    p.add_argument("--quorum-tick-ms", type=int, default=50, help="how often a pending quorum is re-evaluated")
    p.add_argument("--address-file", help="write {address, pid} as JSON here once listening")
    p.set_defaults(func=cmd_lighthouse)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m launch.lighthouse")
    add_lighthouse_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(sys.argv[1:])
    sys.exit(parsed.func(parsed))
