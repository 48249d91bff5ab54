import copy

import numpy as np
import pytest

from elastic.batch import rank_batch
from elastic.config import ConfigError, config_from_dict
from elastic.data import Corpus, build_corpus, phase_plan


@pytest.fixture
def corpus(tiny_raw):
    return Corpus(config_from_dict(tiny_raw))


def test_phase_plan_turns_token_budgets_into_steps(tiny_raw):
    plan = phase_plan(config_from_dict(tiny_raw))
    assert plan.starts == (0, 4, 8) and plan.total_steps == 12
    assert [plan.phase_of(s) for s in (0, 3, 4, 11)] == [0, 0, 1, 2]


def test_sample_depends_only_on_its_index(corpus):
    a, da = corpus.sample(17)
    b, db = corpus.sample(17)
    assert np.array_equal(a, b) and da == db
    assert a.shape == (33,)
    assert not np.array_equal(corpus.sample(18)[0], a)


@pytest.mark.parametrize("world_size", [2, 3])
def test_consumed_samples_are_identical_for_every_world_size(corpus, world_size):
    """The multiset of training windows over N steps is the same for W=1, 2, 3; nothing skipped or repeated."""
    g = corpus.cfg.train.global_batch

    def consumed(w):
        ids, windows = [], []
        for step in range(corpus.plan.total_steps):
            for rank in range(w):
                share = rank_batch(step, g, 2, rank, w)
                for first, size in share.micro_batches:
                    ids += range(first, first + size)
                    windows.append(corpus.batch(first, size)[0])
        return ids, np.concatenate(windows)

    ids1, win1 = consumed(1)
    idsw, winw = consumed(world_size)
    assert ids1 == idsw == list(range(corpus.plan.total_steps * g))
    assert np.array_equal(win1, winw)


def test_phases_follow_their_mixture(corpus):
    g = corpus.cfg.train.global_batch
    phase0 = {corpus.sample(i)[1] for i in range(0, 4 * g)}
    assert phase0 == {"prose"}
    phase1 = [corpus.sample(i)[1] for i in range(4 * g, 8 * g)]
    assert set(phase1) <= {"python", "prose"} and phase1.count("python") > len(phase1) / 2


def test_validation_windows_are_fixed(corpus):
    a = corpus.validation_windows("c", 4)
    assert a.shape == (4, 33) and np.array_equal(a, corpus.validation_windows("c", 4))


def test_pretokenized_npy_source(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    tokens = (np.arange(20_000) % 251).astype(np.uint16)
    np.save(tmp_path / "tok.npy", tokens)
    raw["data"]["sources"]["c"] = [str(tmp_path / "tok.npy")]
    corpus = Corpus(config_from_dict(raw))
    assert corpus.train["c"].dtype == np.uint16 and len(corpus.train["c"]) == 16_000
    assert np.array_equal(corpus.val["c"], tokens[16_000:])


def test_missing_source_names_the_domain(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    raw["data"]["sources"]["c"] = [str(tmp_path / "absent" / "*.txt")]
    with pytest.raises(ConfigError, match="data.sources.c"):
        build_corpus(config_from_dict(raw))


def test_token_ids_beyond_vocab_are_rejected(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    np.save(tmp_path / "big.npy", np.full(5000, 300, dtype=np.uint16))
    raw["data"]["sources"]["c"] = [str(tmp_path / "big.npy")]
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_corpus(config_from_dict(raw))
