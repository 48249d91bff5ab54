"""Chunk ownership: every chunk written exactly once, boundary chunks assembled from pieces, balanced replicas."""

from __future__ import annotations

import pytest

from checkpointing.plan import global_layouts, plan_for_rank


def infos(ranges_by_rank: list[tuple[int, int]], shape=(10, 10), layout="shard") -> list[dict]:
    return [{"tensors": {"w": [list(shape), "float32", layout, a, b]}} for a, b in ranges_by_rank]


def plans(info, chunk_bytes, nodes=None):
    layouts = global_layouts(info, chunk_bytes)
    return layouts, [plan_for_rank(layouts, r, nodes) for r in range(len(info))]


def test_every_chunk_written_once_and_pieces_cover_it():
    # 100 elements, 4-byte floats, chunk_bytes 80 -> 2 rows (20 elements) per chunk; cuts at 13 and 71
    layouts, ps = plans(infos([(0, 13), (13, 71), (71, 100)]), 80)
    grid = layouts["w"].grid
    written = sorted((t.chunk, r) for r, p in enumerate(ps) for t in p.writes)
    assert [c for c, _ in written] == list(range(grid.n_chunks))
    for r, p in enumerate(ps):
        for task in p.writes:
            cs, ce = grid.chunk_range(task.chunk)
            pos = cs
            for src, a, b, _ in task.pieces:
                assert a == pos
                pos = b
            assert pos == ce
    sends = {(tag) for p in ps for *_, tag in p.sends}
    recvs = {tag for p in ps for t in p.writes for src, *_, tag in t.pieces if tag >= 0}
    assert sends == recvs and len(sends) == 2  # one foreign piece per boundary chunk


def test_replica_chunks_are_balanced_over_writers():
    _, ps = plans(infos([(0, 100)] * 3, layout="replica"), 40)  # 10 chunks over 3 ranks
    counts = sorted(len(p.writes) for p in ps)
    assert counts == [3, 3, 4]
    _, local = plans(infos([(0, 100)] * 3, layout="replica"), 40, nodes=["a", "b", "b"])
    assert [len(p.writes) for p in local] == [10, 5, 5]  # every node writes a whole copy


def test_node_local_copies_write_boundary_chunks_on_every_node_holding_a_piece():
    layouts, ps = plans(infos([(0, 13), (13, 71), (71, 100)]), 80, nodes=["a", "b", "c"])
    grid = layouts["w"].grid
    for r, (a, b) in enumerate([(0, 13), (13, 71), (71, 100)]):
        assert sorted(t.chunk for t in ps[r].writes) == list(grid.chunks_overlapping(a, b))


def test_gap_in_shard_ranges_is_an_error_naming_the_tensor():
    with pytest.raises(ValueError, match=r"tensor w: .*held by no rank"):
        plans(infos([(0, 40), (50, 100)]), 80)


def test_ranks_disagreeing_on_shape_is_an_error():
    bad = infos([(0, 100), (0, 100)], layout="replica")
    bad[1]["tensors"]["w"][0] = [5, 20]
    with pytest.raises(ValueError, match=r"tensor w: rank 1 has replica float32\[5, 20\]"):
        global_layouts(bad, 80)
