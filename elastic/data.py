"""Data phases and the sample-exact cursor over the cached corpus.

The corpus is tokenized once into flat token arrays (elastic/corpus_build.py, from the sources in
elastic/data_sources.py, with the tokenizer of elastic/text_tokenizer.py). Training samples are fixed windows of
``seq_len + 1`` tokens taken without replacement (elastic/sampler.py): sample ``i`` of phase ``p`` depends on
``(seed, phase, global sample index)`` and the config only, never on the world size or on which rank draws it.
Validation uses fixed windows spread evenly over each domain's held-out documents.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastic.config import Config
from elastic.corpus_build import build_corpus, corpus_dir, load_meta
from elastic.data_sources import BUILTIN_DOMAINS
from elastic.sampler import WindowSampler

__all__ = ["BUILTIN_DOMAINS", "Corpus", "PhasePlan", "build_corpus", "corpus_dir", "phase_plan"]


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

    def __init__(self, cfg: Config, root: Path | None = None, log=None):
        """``log``: called with a line when a domain runs out of windows and starts a new epoch."""
        self.cfg = cfg
        self.root = root or build_corpus(cfg)
        meta = load_meta(self.root)["domains"]
        self.domains = list(cfg.data.sources)

        def load(domain: str, split: str) -> np.ndarray:
            m = meta[domain]
            return np.memmap(
                self.root / f"{domain}.{split}.bin", dtype=m["dtype"], mode="r", shape=(m[f"{split}_tokens"],)
            )

        self.train = {d: load(d, "train") for d in self.domains}
        self.val = {d: load(d, "val") for d in self.domains}
        self.plan = phase_plan(cfg)
        self.seq_len = cfg.model.seq_len
        self.window = self.seq_len + 1
        g = cfg.train.global_batch
        phases = [(ph.mixture, (self.plan.end_of(p) - self.plan.starts[p]) * g) for p, ph in enumerate(cfg.data.phases)]
        self.sampler = WindowSampler(
            {d: len(self.train[d]) // self.window for d in self.domains}, phases, cfg.data.seed
        )
        self.log = log

    def describe(self) -> list[str]:
        """One line per domain: its windows and how many epochs the whole run takes from it."""
        lines = []
        for d, n in zip(self.sampler.names, self.sampler.windows):
            drawn = self.sampler.drawn[d]
            lines.append(
                f"data: {d}: {n:,} windows of {self.window} tokens; the run draws {drawn:,} ({drawn / n:.2f} epochs)"
            )
        return lines

    def sample(self, index: int) -> tuple[np.ndarray, str]:
        """Tokens (seq_len + 1) and domain of global sample ``index``; a pure function of (seed, phase, index)."""
        step = index // self.cfg.train.global_batch
        phase = self.plan.phase_of(step)
        within = index - self.plan.starts[phase] * self.cfg.train.global_batch
        where = self.sampler.locate(phase, within)
        if where.position == 0 and where.epoch > 0 and self.log:
            self.log(
                f"data: domain {where.domain} ran out of windows: epoch {where.epoch + 1} starts with a new "
                f"permutation at global sample {index} (phase {self.plan.names[phase]})"
            )
        first = where.window * self.window
        return np.asarray(self.train[where.domain][first : first + self.window], dtype=np.int64), where.domain

    def batch(self, first: int, count: int) -> tuple[np.ndarray, list[str]]:
        rows = [self.sample(i) for i in range(first, first + count)]
        return np.stack([r[0] for r in rows]), [r[1] for r in rows]

    def validation_windows(self, domain: str, count: int) -> np.ndarray:
        """``count`` fixed windows spread evenly over a domain's validation tokens (same on every run)."""
        tokens = self.val[domain]
        span = len(tokens) - self.seq_len - 1
        offsets = np.linspace(0, span, num=count).astype(np.int64)
        return np.stack([np.asarray(tokens[o : o + self.seq_len + 1], dtype=np.int64) for o in offsets])
