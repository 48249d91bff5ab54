"""Test configs: a small text corpus made from this machine's Python, tiny config dicts, and a TOML writer."""

from __future__ import annotations

import copy
import json
import sysconfig
from pathlib import Path


def write_text_corpus(root: Path) -> dict[str, Path]:
    """Small prose/python/c text domains (a few hundred KB) so tests build their corpus in well under a second."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    import pydoc_data.topics as topics

    sources = {
        "prose": "\n\n".join(topics.topics[k] for k in sorted(topics.topics)[:60]),
        "python": "\n\n".join((stdlib / f).read_text() for f in ("argparse.py", "json/decoder.py", "textwrap.py")),
        "c": "\n\n".join(
            (Path(sysconfig.get_paths()["include"]) / f).read_text()
            for f in ("object.h", "listobject.h", "dictobject.h", "pyport.h")
        ),
    }
    paths = {}
    for domain, text in sources.items():
        d = root / domain
        d.mkdir(parents=True, exist_ok=True)
        # Several documents per domain, so the hash-based validation split has something to hold out.
        chunk = max(len(text) // 8, 1)
        for i in range(8):
            (d / f"doc{i}.txt").write_text(text[i * chunk : (i + 1) * chunk])
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
        "train": {
            "global_batch": global_batch,
            "micro_batch": 2,
            "eval_interval": 0,
            "eval_batches": 1,
            "run_dir": str(tmp_path / "run"),
            "progress": False,
            "threads_per_worker": 1,
        },
        "checkpoint": {"interval": 0, "l0_interval": 0},
        "launch": {"nproc_per_node": 2},
    }


def recovery_config(raw: dict, tmp_path: Path, steps_per_phase: int = 4, **checkpoint) -> Path:
    """``raw`` as a TOML file for the fault tests: ``steps_per_phase`` steps per phase, a sample log (to check every
    sample is consumed once), L1 checkpoints every 3 steps and L0 every step (``checkpoint`` overrides), and a fast
    agent monitor. Each call writes a new file in ``tmp_path``."""
    raw = copy.deepcopy(raw)
    for phase in raw["data"]["phases"]:
        phase["tokens"] = steps_per_phase * raw["train"]["global_batch"] * raw["model"]["seq_len"]
    raw["train"]["log_samples"] = True
    raw["checkpoint"] = {"interval": 3, "keep_last": 2, "l0_interval": 1, "l0_dir": str(tmp_path / "shm"), **checkpoint}
    raw["launch"]["monitor_interval"] = 0.2
    return write_toml(raw, tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.toml")


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
        scalars = {
            k: v
            for k, v in body.items()
            if not (isinstance(v, list) and v and isinstance(v[0], dict)) and not isinstance(v, dict)
        }
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
