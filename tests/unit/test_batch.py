import itertools

import pytest

from elastic.batch import (
    SampleShare,
    covered_after,
    merge_ranges,
    orphan_shares,
    rank_batch,
    rank_ranges,
    split_evenly,
)


@pytest.mark.parametrize(
    "total,parts,expected", [(10, 3, [4, 3, 3]), (16, 2, [8, 8]), (7, 4, [2, 2, 2, 1]), (5, 1, [5])]
)
def test_split_evenly(total, parts, expected):
    assert split_evenly(total, parts) == expected


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("global_batch,micro", [(16, 8), (10, 3), (7, 2)])
def test_ranks_cover_each_step_exactly_once(world_size, global_batch, micro):
    for step in range(4):
        ids = []
        for rank in range(world_size):
            share = rank_batch(step, global_batch, micro, rank, world_size)
            assert all(size <= micro for _, size in share.micro_batches)
            assert sum(size for _, size in share.micro_batches) == share.count
            ids += list(share.sample_ids)
        assert ids == list(range(step * global_batch, (step + 1) * global_batch))


# --- replicas mode: a retried step reuses the survivors' own parts and splits the departed members' parts ---


@pytest.mark.parametrize(
    "global_batch,old,new,expected",
    [
        # 6 over a, b, c: a 0-1, b 2-3, c 4-5; b leaves: its 2 samples go one to a, one to c
        (6, "abc", "ac", [((2, 1),), ((3, 1),)]),
        # 8 over a, b, c, d (2 each); b and c leave: their 4 samples, in order, 2 to a and 2 to d
        (8, "abcd", "ad", [((2, 2),), ((4, 2),)]),
        # one survivor of two computes the other's whole share
        (6, "ab", "b", [((0, 3),)]),
        (6, "ab", "a", [((3, 3),)]),
        # nobody left (the same members again, e.g. a transient error): nothing to compute
        (6, "ab", "ab", [(), ()]),
        # 7 over a, b, c: 3, 2, 2; a leaves: 3 samples over b and c, the larger piece first
        (7, "abc", "bc", [((0, 2),), ((2, 1),)]),
        # two departed pieces that are not adjacent, split across them: a (0-1) and c (4-5) leave, b and d stay
        (8, "abcd", "bd", [((0, 2),), ((4, 2),)]),
        # 10 over 5 (2 each); b, c, d leave: 6 samples over a and e (adjacent pieces merged: 2-4 and 5-7)
        (10, "abcde", "ae", [((2, 3),), ((5, 3),)]),
        # 9 over a, b, c, d (3, 2, 2, 2); a and c leave: 0-2 and 5-6 over b and d, b's 3 are a's whole piece
        (9, "abcd", "bd", [((0, 3),), ((5, 2),)]),
        # 7 over a, b, c (3, 2, 2); b and c leave: the survivor computes 3-6 in one piece
        (7, "abc", "a", [((3, 4),)]),
    ],
)
def test_orphan_shares_table(global_batch, old, new, expected):
    shares = orphan_shares(0, global_batch, 8, list(old), list(new))
    assert [s.ranges for s in shares] == expected


def _assert_each_sample_once(step, global_batch, parts):
    ids = sorted(i for ranges in parts for start, count in ranges for i in range(start, start + count))
    assert ids == list(range(step * global_batch, (step + 1) * global_batch))


MEMBERSHIPS = [
    (old, new)
    for size in range(1, 6)
    for old in [[f"replica-{i:04d}" for i in range(size)]]
    for k in range(1, size + 1)
    for new in itertools.combinations(old, k)
]


@pytest.mark.parametrize("old,new", MEMBERSHIPS, ids=lambda m: "".join(x[-1] for x in m))
@pytest.mark.parametrize("global_batch,micro", [(16, 8), (10, 3), (7, 2), (5, 1)])
def test_every_sample_once_after_any_departure(old, new, global_batch, micro):
    """For every old membership of 1-5 and every subset that stays: the survivors' kept parts plus the orphan
    shares are the step's global batch, each sample once; orphan shares differ by at most one sample."""
    step = 3
    kept = rank_ranges(step, global_batch, len(old))
    shares = orphan_shares(step, global_batch, micro, old, list(new))
    assert len(shares) == len(new)
    survivors_kept = [kept[old.index(m)] for m in new]
    _assert_each_sample_once(step, global_batch, survivors_kept + [s.ranges for s in shares])
    assert max(s.count for s in shares) - min(s.count for s in shares) <= 1
    for share in shares:
        assert all(size <= micro for _, size in share.micro_batches)
        assert [i for first, size in share.micro_batches for i in range(first, first + size)] == share.sample_ids
    # a second departure during the retry: the coverage after the retry is again a partition, and so is the
    # next retry's split of it (chained retries stay exact)
    covered = covered_after(old, list(new), kept, shares)
    _assert_each_sample_once(step, global_batch, covered)
    again = list(new)[::2]
    second = orphan_shares(step, global_batch, micro, list(new), again, covered)
    _assert_each_sample_once(
        step, global_batch, [covered[list(new).index(m)] for m in again] + [s.ranges for s in second]
    )


@pytest.mark.parametrize(
    "old,new",
    [("ab", "c"), ("ab", ""), ("aab", "a"), ("ab", "aa")],
)
def test_orphan_shares_refuse_memberships_that_are_not_a_subset(old, new):
    with pytest.raises(ValueError, match="members"):
        orphan_shares(0, 6, 2, list(old), list(new))


def test_sample_share_cuts_each_piece_into_micro_batches():
    share = SampleShare(ranges=((10, 3), (20, 2)), micro_batch=2)
    assert share.micro_batches == ((10, 2), (12, 1), (20, 2))
    assert share.count == 5 and share.sample_ids == [10, 11, 12, 20, 21]
    assert merge_ranges([(20, 2), (10, 3), (13, 0), (13, 2)]) == ((10, 5), (20, 2))
