import pytest

from elastic.batch import rank_batch, split_evenly


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
