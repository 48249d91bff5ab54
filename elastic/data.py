"""Corpus, data phases and the sample-exact cursor.

The embedded corpus is built at first run from text every Python installation carries: English prose (the language
reference topics shipped in ``pydoc_data``, standard-library docstrings, licence texts), Python source (the standard
library) and C (Python's C headers). Text is tokenized as bytes (vocabulary 256) and cached as flat ``.npy`` token
arrays per domain and split; a document goes to validation by a hash of its name, so the split is the same on every
machine with the same Python.

Sample ``i`` of phase ``p`` is a window drawn by ``numpy.random.default_rng((seed, p, i))``: its domain follows the
phase's mixture weights and its offset is uniform in that domain's training tokens. Data order therefore depends on
``(seed, phase, global sample index)`` only, never on the world size or on which rank draws it.
"""

from __future__ import annotations

import ast
import fcntl
import glob
import hashlib
import itertools
import json
import math
import os
import sys
import sysconfig
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastic.config import Config, ConfigError

BUILTIN_DOMAINS = ("prose", "python", "c")
BUILTIN_MAX_BYTES = 3_000_000
"""Cap per builtin domain: a few MB is far more than a CPU run consumes, and keeps the first build to seconds."""
CORPUS_VERSION = 1
"""Bump when the builtin extraction changes, so stale caches are rebuilt."""


# ---------------------------------------------------------------------------------------------------------------
# Documents of the builtin domains: (name, bytes), in a deterministic order.


def _stdlib_py_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "dist-packages"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    # A hash order spreads the capped subset over the whole library instead of the first letters of the alphabet.
    return sorted(files, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())


def _take_until(docs, cap: int) -> list[tuple[str, bytes]]:
    taken, size = [], 0
    for name, data in docs:
        if not data:
            continue
        taken.append((name, data))
        size += len(data)
        if size >= cap:
            break
    return taken


def _python_docs():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_py_files():
        yield str(path.relative_to(root)), path.read_bytes()


def _docstrings(source: bytes) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    texts = [ast.get_docstring(n, clean=True) for n in nodes]
    return "\n\n".join(t for t in texts if t and len(t) > 40)


def _prose_docs():
    import pydoc_data.topics  # the language reference and library topics as plain English text

    for key in sorted(pydoc_data.topics.topics):
        yield f"pydoc_topics/{key}", pydoc_data.topics.topics[key].encode()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for lic in sorted(stdlib.glob("LICENSE*")):
        yield f"license/{lic.name}", lic.read_bytes()
    for name, source in _python_docs():
        yield f"docstrings/{name}", _docstrings(source).encode()


def _c_docs():
    root = Path(sysconfig.get_paths()["include"])
    if not any(root.rglob("*.h")):  # Python's headers are not installed: system headers (machine-dependent)
        root = Path("/usr/include")
    for path in sorted(root.rglob("*.h")):
        yield str(path.relative_to(root)), path.read_bytes()


BUILTIN_SOURCES = {"prose": _prose_docs, "python": _python_docs, "c": _c_docs}


# ---------------------------------------------------------------------------------------------------------------
# Building and caching.


def _is_validation(name: str, val_fraction: float) -> bool:
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < val_fraction * 10_000


def _docs_to_splits(docs: list[tuple[str, bytes]], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    train = [d for n, d in docs if not _is_validation(n, val_fraction)]
    val = [d for n, d in docs if _is_validation(n, val_fraction)]
    if not val:  # tiny sources: hold out the last document so every domain can be evaluated
        val, train = train[-1:], train[:-1]
    sep = b"\n\n"
    to_tokens = lambda parts: np.frombuffer(sep.join(parts), dtype=np.uint8).copy()  # noqa: E731
    return to_tokens(train), to_tokens(val)


def _token_array_splits(path: Path, val_fraction: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A pre-tokenized array: the last val_fraction of its tokens is the validation split."""
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        import zarr

        tokens = zarr.open_array(str(path), mode="r")[:]
    if tokens.ndim != 1 or tokens.dtype not in (np.uint8, np.uint16, np.uint32):
        raise ConfigError(
            f"{where}: {path} must be a 1-D uint8/uint16/uint32 token array, "
            f"got shape {tokens.shape} dtype {tokens.dtype}"
        )
    cut = int(len(tokens) * (1 - val_fraction))
    return np.asarray(tokens[:cut]), np.asarray(tokens[cut:])


def _expand(pattern: str, where: str) -> list[Path]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
        raise ConfigError(f"{where}: {pattern!r} matches no file; fix the path or glob in data.sources")
    return [Path(m) for m in matches]


def _glob_base(pattern: str) -> Path:
    """The directory part of a pattern before its first wildcard: document names are taken relative to it, so
    the validation split does not depend on where the data lives."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = [p for p in itertools.takewhile(lambda p: not any(c in p for c in "*?["), parts)]
    base = Path(*fixed) if fixed else Path(".")
    return base.parent if base.is_file() else base


def _domain_splits(domain: str, sources: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    where = f"data.sources.{domain}"
    text_docs: list[tuple[str, bytes]] = []
    arrays: list[tuple[np.ndarray, np.ndarray]] = []
    for src in sources:
        if src.startswith("builtin:"):
            name = src.removeprefix("builtin:")
            if name not in BUILTIN_SOURCES:
                raise ConfigError(
                    f"{where}: unknown builtin {src!r}; use one of {['builtin:' + b for b in BUILTIN_DOMAINS]}"
                )
            text_docs += _take_until(BUILTIN_SOURCES[name](), BUILTIN_MAX_BYTES)
            continue
        for path in _expand(src, where):
            if path.suffix == ".npy" or path.suffix == ".zarr":
                arrays.append(_token_array_splits(path, val_fraction, where))
            elif path.is_file():
                text_docs.append((str(path.relative_to(_glob_base(src))) or path.name, path.read_bytes()))
    if text_docs:
        arrays.append(_docs_to_splits(text_docs, val_fraction))
    dtype = np.result_type(*[a.dtype for pair in arrays for a in pair])
    return tuple(np.concatenate([pair[i].astype(dtype, copy=False) for pair in arrays]) for i in (0, 1))


def _cache_key(cfg: Config) -> str:
    stamp = {
        "version": CORPUS_VERSION,
        "python": sys.version,
        "val_fraction": cfg.data.val_fraction,
        "cap": BUILTIN_MAX_BYTES,
        "sources": {},
    }
    for domain, sources in sorted(cfg.data.sources.items()):
        entries = []
        for src in sources:
            if src.startswith("builtin:"):
                entries.append(src)
                continue
            for path in sorted(glob.glob(os.path.expanduser(src), recursive=True)):
                st = os.stat(path)
                entries.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        stamp["sources"][domain] = entries
    return hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def corpus_dir(cfg: Config) -> Path:
    return Path(os.path.expanduser(cfg.data.cache_dir)) / f"corpus-{_cache_key(cfg)}"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def build_corpus(cfg: Config, log=print) -> Path:
    """Tokenize every domain into ``<cache>/corpus-<key>/<domain>.{train,val}.npy`` unless already cached.

    A file lock makes concurrent builders (several launchers, several workers) wait for one build.
    """
    out = corpus_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "DONE").exists():
            return out
        for domain, sources in cfg.data.sources.items():
            train, val = _domain_splits(domain, sources, cfg.data.val_fraction)
            if len(val) <= cfg.model.seq_len + 1 or len(train) <= cfg.model.seq_len + 1:
                raise ConfigError(
                    f"data.sources.{domain}: only {len(train)} train / {len(val)} validation tokens, "
                    f"fewer than model.seq_len + 2 = {cfg.model.seq_len + 2}; add more text"
                )
            if int(train.max(initial=0)) >= cfg.model.vocab_size or int(val.max(initial=0)) >= cfg.model.vocab_size:
                raise ConfigError(
                    f"data.sources.{domain}: token ids reach {max(train.max(), val.max())} but "
                    f"model.vocab_size is {cfg.model.vocab_size}; raise model.vocab_size"
                )
            _atomic_save(out / f"{domain}.train.npy", train)
            _atomic_save(out / f"{domain}.val.npy", val)
            log(f"corpus: {domain}: {len(train):,} train + {len(val):,} validation tokens -> {out}")
        (out / "DONE").write_text(json.dumps({"domains": list(cfg.data.sources)}))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Phases and the sample-exact cursor.


@dataclass(frozen=True)
class PhasePlan:
    """Step boundaries of the data phases: phase p covers steps [starts[p], starts[p + 1])."""

    starts: tuple[int, ...]
    total_steps: int
    names: tuple[str, ...]

    def phase_of(self, step: int) -> int:
        return bisect_right(self.starts, step) - 1

    def end_of(self, phase: int) -> int:
        return self.starts[phase + 1] if phase + 1 < len(self.starts) else self.total_steps


def phase_plan(cfg: Config) -> PhasePlan:
    tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
    starts, step = [], 0
    for phase in cfg.data.phases:
        starts.append(step)
        step += math.ceil(phase.tokens / tokens_per_step)
    return PhasePlan(starts=tuple(starts), total_steps=step, names=tuple(p.name for p in cfg.data.phases))


class Corpus:
    """Memory-mapped token arrays plus the deterministic sample -> window mapping."""

    def __init__(self, cfg: Config, root: Path | None = None):
        self.cfg = cfg
        self.root = root or build_corpus(cfg)
        self.domains = list(cfg.data.sources)
        load = lambda d, split: np.load(self.root / f"{d}.{split}.npy", mmap_mode="r")  # noqa: E731
        self.train = {d: load(d, "train") for d in self.domains}
        self.val = {d: load(d, "val") for d in self.domains}
        self.plan = phase_plan(cfg)
        self.seq_len = cfg.model.seq_len
        self._mixtures = []
        for phase in cfg.data.phases:
            names = [d for d in self.domains if phase.mixture.get(d, 0) > 0]
            weights = np.array([phase.mixture[d] for d in names], dtype=np.float64)
            self._mixtures.append((names, np.cumsum(weights / weights.sum())))

    def sample(self, index: int) -> tuple[np.ndarray, str]:
        """Tokens (seq_len + 1) and domain of global sample ``index``; a pure function of (seed, phase, index)."""
        step = index // self.cfg.train.global_batch
        phase = self.plan.phase_of(step)
        within = index - self.plan.starts[phase] * self.cfg.train.global_batch
        rng = np.random.default_rng((self.cfg.data.seed, phase, within))
        names, cdf = self._mixtures[phase]
        domain = names[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(names) - 1)]
        tokens = self.train[domain]
        offset = int(rng.integers(0, len(tokens) - self.seq_len - 1))
        return np.asarray(tokens[offset : offset + self.seq_len + 1], dtype=np.int64), domain

    def batch(self, first: int, count: int) -> tuple[np.ndarray, list[str]]:
        rows = [self.sample(i) for i in range(first, first + count)]
        return np.stack([r[0] for r in rows]), [r[1] for r in rows]

    def validation_windows(self, domain: str, count: int) -> np.ndarray:
        """``count`` fixed windows spread evenly over a domain's validation tokens (same on every run)."""
        tokens = self.val[domain]
        span = len(tokens) - self.seq_len - 1
        offsets = np.linspace(0, span, num=count).astype(np.int64)
        return np.stack([np.asarray(tokens[o : o + self.seq_len + 1], dtype=np.int64) for o in offsets])
