"""Sampling without replacement: every window once per epoch for any world size, new epochs logged, mixtures exact to
one sample per block, and a resumed cursor (a fresh process, nothing cached) continuing mid-epoch exactly."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

from elastic.batch import rank_batch
from elastic.config import ConfigError, config_from_dict
from elastic.data import Corpus
from elastic.sampler import MIN_BLOCK, WindowSampler

SEQ = 32
WINDOW = SEQ + 1
WINDOWS = 50
"""Windows in the small numbered domain: the run draws about 125 samples from it, two epochs and a half."""


@pytest.fixture
def numbered_raw(tiny_raw, tmp_path) -> dict:
    """Domain 'c' is a pre-tokenized array whose token t is its own position, so a window names itself; it is the
    only domain of phase 0 and shares phases 1 and 2 with prose (replay-like mixtures)."""
    raw = copy.deepcopy(tiny_raw)
    train_tokens = WINDOWS * WINDOW + 7  # a tail shorter than a window, never used
    total = int(np.ceil(train_tokens / (1 - raw["data"]["val_fraction"])))
    np.save(tmp_path / "numbered.npy", np.arange(total, dtype=np.uint32))
    raw["data"]["sources"]["c"] = [str(tmp_path / "numbered.npy")]
    raw["model"]["vocab_size"] = 1 << 16
    phases = raw["data"]["phases"]
    phases[0]["mixture"] = {"c": 1.0}
    phases[1]["mixture"] = {"c": 0.5, "prose": 0.5}
    phases[2]["mixture"] = {"c": 0.25, "prose": 0.5, "python": 0.25}
    for phase in phases:
        phase["tokens"] = 12 * raw["train"]["global_batch"] * SEQ
    return raw


def _consumed(corpus: Corpus, world_size: int) -> list[tuple[int, str, tuple]]:
    """(global index, domain, tokens) of every sample, drawn the way ranks draw them for this world size."""
    g = corpus.cfg.train.global_batch
    out = []
    for step in range(corpus.plan.total_steps):
        for rank in range(world_size):
            for first, size in rank_batch(step, g, 2, rank, world_size).micro_batches:
                windows, domains = corpus.batch(first, size)
                out += [(first + i, d, tuple(w)) for i, (w, d) in enumerate(zip(windows, domains))]
    return sorted(out)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_is_used_once_per_epoch(numbered_raw, world_size):
    lines: list[str] = []
    corpus = Corpus(config_from_dict(numbered_raw), log=lines.append)
    assert len(corpus.train["c"]) // WINDOW == WINDOWS
    consumed = _consumed(corpus, world_size)
    assert [i for i, _, _ in consumed] == list(range(corpus.plan.total_steps * corpus.cfg.train.global_batch))
    windows = []
    for _, domain, tokens in consumed:
        if domain == "c":
            first = tokens[0]
            assert first % WINDOW == 0 and tokens == tuple(range(first, first + WINDOW))  # a whole, aligned window
            windows.append(first // WINDOW)
    assert len(windows) > 2 * WINDOWS  # 72 + ~36 + ~18 samples of c: two whole epochs and part of a third
    for epoch in range(len(windows) // WINDOWS):
        assert sorted(windows[epoch * WINDOWS : (epoch + 1) * WINDOWS]) == list(range(WINDOWS)), f"epoch {epoch}"
    rest = windows[(len(windows) // WINDOWS) * WINDOWS :]
    assert len(set(rest)) == len(rest)  # the unfinished epoch repeats nothing either
    assert windows[:WINDOWS] != windows[WINDOWS : 2 * WINDOWS]  # each epoch has its own permutation
    epochs = [line for line in lines if "domain c ran out of windows" in line]
    assert len(epochs) == len(windows) // WINDOWS - (len(windows) % WINDOWS == 0)
    assert "epoch 2 starts with a new permutation" in epochs[0]


def test_world_sizes_consume_identical_samples(numbered_raw):
    corpus = Corpus(config_from_dict(numbered_raw))
    assert _consumed(corpus, 1) == _consumed(corpus, 2) == _consumed(corpus, 3)


def test_resume_mid_epoch_continues_exactly(numbered_raw):
    """A restarted worker has a fresh Corpus (no cached permutation or block order); from a cursor in the middle of
    an epoch it must draw what the uninterrupted run drew."""
    cfg = config_from_dict(numbered_raw)
    straight = Corpus(cfg)
    total = straight.plan.total_steps * cfg.train.global_batch
    reference = straight.batch(0, total)
    for cursor in (WINDOWS + 17, 5 * cfg.train.global_batch + 1, total - 3):  # mid-epoch, mid-step, near the end
        resumed = Corpus(cfg)
        windows, domains = resumed.batch(cursor, total - cursor)
        assert np.array_equal(windows, reference[0][cursor:]) and domains == reference[1][cursor:]


def test_mixture_counts_follow_the_weights_within_one_sample():
    sampler = WindowSampler({"a": 1000, "b": 1000, "c": 1000}, [({"a": 0.7, "b": 0.2, "c": 0.1}, 5 * MIN_BLOCK)], 7)
    counts = Counter(sampler.locate(0, i).domain for i in range(5 * MIN_BLOCK))
    for name, weight in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        assert abs(counts[name] - weight * 5 * MIN_BLOCK) <= 1
    first_block = [sampler.locate(0, i).domain for i in range(MIN_BLOCK)]
    assert first_block[:20] != sorted(first_block[:20])  # shuffled inside a block, not runs of one domain
    assert sampler.drawn == dict(counts)


def test_a_rare_domain_still_gets_its_share():
    weights = {"main": 0.999, "rare": 0.001}  # needs a block of 2000 samples for 2 rare ones
    sampler = WindowSampler({"main": 10_000, "rare": 10}, [(weights, 6000)], 0)
    counts = Counter(sampler.locate(0, i).domain for i in range(6000))
    assert counts["rare"] == 6


def test_different_seeds_give_different_orders(numbered_raw):
    a = Corpus(config_from_dict(numbered_raw)).batch(0, 30)[0]
    numbered_raw["data"]["seed"] = 99
    b = Corpus(config_from_dict(numbered_raw)).batch(0, 30)[0]
    assert not np.array_equal(a, b) and sorted(map(tuple, a)) != sorted(map(tuple, b))


def test_a_vanishing_mixture_weight_is_rejected():
    with pytest.raises(ConfigError, match=r"data.phases\[0\].mixture: a mixture weight of 1e-07"):
        WindowSampler({"a": 10, "b": 10}, [({"a": 1.0, "b": 1e-7}, 100)], 0)
