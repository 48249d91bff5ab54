"""Helpers shared by tests: tiny configs, a small corpus, and launching real ranks as processes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from elastic.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent


def write_text_corpus(root: Path) -> dict[str, Path]:
    """Small prose/python/c text domains (a few hundred KB) so tests build their corpus in well under a second."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    import pydoc_data.topics as topics

    sources = {
        "prose": "\n\n".join(topics.topics[k] for k in sorted(topics.topics)[:60]),
        "python": "\n\n".join((stdlib / f).read_text() for f in ("argparse.py", "json/decoder.py", "textwrap.py")),
        "c": "\n\n".join((Path(sysconfig.get_paths()["include"]) / f).read_text()
                         for f in ("object.h", "listobject.h", "dictobject.h", "pyport.h")),
    }
    paths = {}
    for domain, text in sources.items():
        d = root / domain
        d.mkdir(parents=True, exist_ok=True)
        # Several documents per domain, so the hash-based validation split has something to hold out.
        chunk = max(len(text) // 8, 1)
        for i in range(8):
            (d / f"doc{i}.txt").write_text(text[i * chunk:(i + 1) * chunk])
        paths[domain] = d
    return paths


def tiny_config_dict(corpus: dict[str, Path], tmp_path: Path, steps_per_phase: int = 4) -> dict:
    global_batch, seq_len = 6, 32
    tokens = steps_per_phase * global_batch * seq_len
    return {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "seq_len": seq_len, "vocab_size": 256},
        "data": {
            "sources": {d: [str(p / "*.txt")] for d, p in corpus.items()},
            "cache_dir": str(tmp_path / "cache"),
            "val_fraction": 0.2,
            "phases": [
                {"name": "prose", "tokens": tokens, "mixture": {"prose": 1.0}},
                {"name": "python", "tokens": tokens, "mixture": {"python": 0.9, "prose": 0.1}},
                {"name": "c", "tokens": tokens, "mixture": {"c": 0.9, "python": 0.05, "prose": 0.05}},
            ],
        },
        "schedule": {"kind": "cosine", "lr_max": 3e-3, "lr_min": 3e-4, "warmup_steps": 2},
        "train": {"global_batch": global_batch, "micro_batch": 2, "eval_interval": 0, "eval_batches": 1,
                  "run_dir": str(tmp_path / "run"), "progress": False, "threads_per_worker": 1},
        "checkpoint": {"interval": 0, "l0_interval": 0},
        "launch": {"nproc_per_node": 2},
    }


def write_toml(raw: dict, path: Path) -> Path:
    """A minimal TOML writer for test configs (tables, arrays of tables, inline tables of scalars)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(v)

    lines = []
    for section, body in raw.items():
        scalars = {k: v for k, v in body.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))
                   and not isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in scalars.items()]
        for k, v in body.items():
            if isinstance(v, dict):
                lines.append(f"[{section}.{k}]")
                lines += [f"{json.dumps(kk)} = {value(vv)}" for kk, vv in v.items()]
        for k, v in body.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"[[{section}.{k}]]")
                    lines += [f"{kk} = {value(vv)}" for kk, vv in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(script: Path, world_size: int, args: list[str], timeout: float = 120,
                extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``script`` as ``world_size`` real processes joined by env:// gloo rendezvous on 127.0.0.1.

    Waits for all of them with a deadline; on timeout kills the rest and fails with their output.
    """
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"ranks of {script.name} did not finish within {timeout} s")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} of {script.name} failed ({r.returncode}):\n{r.stdout[-4000:]}"
    return results


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy, with a deadline; fail early if ``proc`` exits.

    This waits on an observable condition (a file, a metric, a process), never on elapsed time alone.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ecpt_command(args: list[str]) -> list[str]:
    """The `ecpt` command line run by this interpreter (the venv's), e.g. ecpt_command(["train", "--config", ...])."""
    return [sys.executable, "-m", "launch.cli", *args]


def start_node(config: Path, run: Path, node: str, endpoint: str, log: Path, faults: list[str]) -> subprocess.Popen:
    """One simulated node: its own `ecpt train` agent with one worker, joining the job at the external store
    ``endpoint``, with the fault plan ``faults`` (every node gets the same plan; each fault fires once per run)."""
    return subprocess.Popen(ecpt_command(["train", "--config", str(config), "--run-dir", str(run), "--nnodes", "1:2",
                                          "--nproc-per-node", "1", "--rdzv-endpoint", endpoint,
                                          "--rdzv-store", "external", "--node-id", node,
                                          *(arg for f in faults for arg in ("--fault", f))]),
                            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def lose_and_rejoin_node(config: Path, run: Path, logs: Path, kill_step: int, extra_faults: tuple[str, ...] = (),
                         timeout: float = 120) -> None:
    """The node-loss scenario: a standalone rendezvous store and two simulated nodes n0, n1 (one worker each);
    n1 is killed at ``kill_step``, the job must shrink to world 1, n1's command is started again, the job must grow
    back to world 2 and both agents must finish with exit code 0. ``extra_faults`` join the plan of every node.
    Agent logs go to ``logs/<node>.log``."""
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    store = subprocess.Popen(ecpt_command(["rdzv-store", "--port", str(port)]), cwd=REPO, stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    nodes = []
    try:
        assert "listening" in store.stdout.readline()
        faults = [f"kill node n1 at step {kill_step}", *extra_faults]
        nodes = [start_node(config, run, n, endpoint, logs / f"{n}.log", faults) for n in ("n0", "n1")]
        steps = lambda: read_jsonl(run / "metrics.jsonl", "step") if (run / "metrics.jsonl").exists() else []
        assert nodes[1].wait(timeout=timeout) != 0  # node n1's agent was killed at kill_step
        killed = time.time()
        # after the kill: a late first join can also give world-1 steps at the start (see node_resizes)
        wait_for(lambda: any(r["world_size"] == 1 and r["time"] > killed for r in steps()), timeout,
                 "the job to shrink to 1 node", nodes[0])
        nodes[1] = start_node(config, run, "n1", endpoint, logs / "n1-again.log", faults)
        wait_for(lambda: [r for r in steps() if r["world_size"] == 2 and r["step"] > kill_step], timeout,
                 "the job to grow back to 2 nodes", nodes[0])
        assert nodes[0].wait(timeout=2 * timeout) == 0, (logs / "n0.log").read_text()[-3000:]
        assert nodes[1].wait(timeout=timeout / 2) == 0, (logs / "n1-again.log").read_text()[-3000:]
    finally:
        for p in [*nodes, store]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def node_resizes(run: Path) -> list[int]:
    """World sizes of the step rows with repeats collapsed, e.g. [2, 1, 2] for 2 nodes -> n1 lost -> n1 back.

    A node whose agent reaches the first rendezvous after the 1 s last call (agent start-up on a loaded machine)
    misses the first round: the job starts on the other node alone and grows when it arrives. That leading
    [1] is the launcher behaving as designed, not part of the scenario, so it is dropped here."""
    worlds = [w for w, _ in itertools.groupby(r["world_size"] for r in read_jsonl(run / "metrics.jsonl", "step"))]
    return worlds[1:] if worlds[:2] == [1, 2] else worlds
