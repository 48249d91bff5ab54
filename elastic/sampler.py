"""Sampling without replacement: which window of which domain global sample ``i`` of phase ``p`` is.

Each domain's training tokens are cut into fixed windows of ``seq_len + 1`` tokens (the tail shorter than a window is
not used). A domain's windows are consumed in epochs: epoch ``e`` is the permutation seeded by
``(seed, domain name, e)``, and the ``k``-th sample the run takes from a domain is window ``perm_e[k mod n]`` of
epoch ``e = k div n``; so every window is used exactly once per epoch, and a domain that runs out starts a new epoch
with a new permutation. Phases continue a domain's current epoch (a replayed or revisited domain does not repeat
windows before its epoch ends).

The mixture decides the domain of each sample, and ``k`` must follow from the global index without a scan. A phase
is cut into blocks of ``B`` samples (``B >= 1024`` and large enough that every mixture weight gets at least two
samples per block). Through ``b`` whole blocks the counts are fixed: with the domains' cumulative weights ``C_j``,
domains ``1..j`` have had ``round(C_j * b * B)`` samples, so a domain's share never drifts from its weight by more
than one sample. Inside block ``b`` its samples are in the order of a permutation seeded by ``(seed, p, b)``. So
"the k-th sample of domain d" is O(1) arithmetic plus one block permutation (cached); the counts of earlier phases
are computed once at start. Everything is a pure function of (seed, config, phase, global sample index): the world
size, the rank that draws a sample and any restart in between cannot change it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from elastic.errors import ConfigError

MIN_BLOCK = 1024
"""Smallest block of the domain assignment: small enough to permute in microseconds, large enough to mix well."""
MAX_BLOCK = 1 << 22
"""A mixture weight that needs a larger block (below ~5e-7 of the total) is an error rather than a memory cliff."""
CACHED = 4
"""Block orders and epoch permutations kept per process (a batch touches one or two of each)."""


@dataclass(frozen=True)
class Location:
    domain: str
    """Domain of the sample."""
    epoch: int
    """Epoch of that domain the sample belongs to (0 = its first pass)."""
    position: int
    """Position within that epoch's permutation (0 = the first sample of the epoch)."""
    window: int
    """Window index into the domain's training tokens: tokens [window * (seq_len + 1), (window + 1) * (seq_len + 1))."""


def _domain_seed(name: str) -> int:
    return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16)


class _Phase:
    """The domain assignment of one phase: cumulative counts per block and the order inside a block."""

    def __init__(self, index: int, domains: list[int], weights: np.ndarray, samples: int, seed: int, where: str):
        self.index, self.domains, self.samples, self.seed = index, domains, samples, seed
        w = weights / weights.sum()
        need = 2 * math.ceil(1 / float(w.min()))
        if need > MAX_BLOCK:
            raise ConfigError(f"{where}: a mixture weight of {w.min():.2g} of the total is too small; use >= 5e-7")
        self.block = max(MIN_BLOCK, need)
        self.cdf = np.cumsum(w)
        self.cdf[-1] = 1.0
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def counts_through(self, blocks: int) -> np.ndarray:
        """Samples of each of this phase's domains in its first ``blocks`` whole blocks."""
        upto = np.floor(self.cdf * (blocks * self.block) + 0.5).astype(np.int64)
        return np.diff(upto, prepend=0)

    def order(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain slot of every sample in the block, how many samples of the same domain precede it there)."""
        if block not in self._orders:
            counts = self.counts_through(block + 1) - self.counts_through(block)
            assert (counts >= 0).all(), "block counts cannot be negative when every weight fills two samples"
            slots = np.random.default_rng((self.seed, 0, self.index, block)).permutation(
                np.repeat(np.arange(len(counts)), counts)
            )
            first_of_slot = np.concatenate([[0], np.cumsum(counts)[:-1]])
            rank = np.empty(self.block, dtype=np.int64)
            rank[np.argsort(slots, kind="stable")] = np.arange(self.block) - np.repeat(first_of_slot, counts)
            if len(self._orders) >= CACHED:
                self._orders.pop(next(iter(self._orders)))
            self._orders[block] = (slots, rank)
        return self._orders[block]

    def locate(self, within: int) -> tuple[int, int]:
        """(domain, how many samples of that domain this phase drew before ``within``)."""
        block, offset = divmod(within, self.block)
        slots, rank = self.order(block)
        slot = int(slots[offset])
        return self.domains[slot], int(self.counts_through(block)[slot] + rank[offset])

    def totals(self) -> dict[int, int]:
        """Samples this phase draws from each of its domains."""
        block, rest = divmod(self.samples, self.block)
        counts = self.counts_through(block)
        if rest:
            counts = counts + np.bincount(self.order(block)[0][:rest], minlength=len(counts))
        return {d: int(c) for d, c in zip(self.domains, counts)}


class WindowSampler:
    """Global sample -> (domain, epoch, window) without replacement; see the module docstring."""

    def __init__(self, windows: dict[str, int], phases: list[tuple[dict[str, float], int]], seed: int):
        """``windows``: domain -> number of training windows; ``phases``: (mixture, samples in the phase)."""
        self.names = list(windows)
        self.windows = [windows[d] for d in self.names]
        self.seed = seed
        self._phases: list[_Phase] = []
        self._before: list[list[int]] = []  # samples of each domain drawn by all earlier phases
        drawn = [0] * len(self.names)
        for p, (mixture, samples) in enumerate(phases):
            used = [i for i, d in enumerate(self.names) if mixture.get(d, 0) > 0]
            weights = np.array([mixture[self.names[i]] for i in used], dtype=np.float64)
            phase = _Phase(p, used, weights, samples, seed, f"data.phases[{p}].mixture")
            self._phases.append(phase)
            self._before.append(list(drawn))
            for d, count in phase.totals().items():
                drawn[d] += count
        self.drawn = dict(zip(self.names, drawn))
        """Samples the whole run draws from each domain."""
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._perms:
            rng = np.random.default_rng((self.seed, 1, _domain_seed(self.names[domain]), epoch))
            perm = rng.permutation(self.windows[domain])
            if len(self._perms) >= CACHED:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm.astype(np.uint32 if self.windows[domain] < 1 << 32 else np.int64)
        return self._perms[key]

    def locate(self, phase: int, within: int) -> Location:
        """Where sample ``within`` (counted from the phase's first sample) of ``phase`` comes from."""
        domain, drawn_here = self._phases[phase].locate(within)
        epoch, position = divmod(self._before[phase][domain] + drawn_here, self.windows[domain])
        window = int(self._permutation(domain, epoch)[position])
        return Location(self.names[domain], epoch, position, window)
