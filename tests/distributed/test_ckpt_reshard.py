"""Real gloo processes: save at one world size and layout, load at another; node-local levels; gathered errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.ckpt_workers import WORKER_TIMEOUT, run_workers

pytestmark = pytest.mark.slow

UNEVEN3 = [0, 0.17, 0.71, 1.0]  # three Shards of very different sizes, cutting rows and chunks
UNEVEN2 = [0, 0.62, 1.0]


def shared(tmp: Path, name="L2", interval=1, keep=2) -> dict:
    return {"name": name, "root": str(tmp / name), "interval": interval, "keep_last": keep, "node_local": False}


def one_level(tmp: Path, ops: list[dict]):
    return lambda rank: {"levels": [shared(tmp)], "ops": ops}


def assert_loaded(results: list[dict], step: int) -> None:
    for rank, res in enumerate(results):
        assert res[-1]["error"] is None, f"rank {rank}: {res[-1]['error']}"
        assert res[-1]["step"] == step and res[-1]["mismatched"] == [], f"rank {rank}: {res[-1]}"


@pytest.mark.timeout(5 * WORKER_TIMEOUT + 60)  # one save and four loads, each within its own deadline
def test_replicas_saved_by_two_load_at_one_and_three_in_any_layout(tmp_path):
    saved = run_workers(tmp_path, 2, one_level(tmp_path, [{"op": "save", "steps": [3, 4], "layout": "replica"}]))
    assert all(r[0]["committed"] == ["L2", "L2"] for r in saved)
    ckpt = tmp_path / "L2" / "step-00000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["complete"] and manifest["world_size"] == 2
    for layout, world in [("replica", 1), ("replica", 3), (UNEVEN3, 3), ([0, 1.0], 1)]:
        out = tmp_path / f"load-{world}-{layout if isinstance(layout, str) else len(layout)}"
        out.mkdir()
        results = run_workers(out, world, one_level(tmp_path, [{"op": "load", "layout": layout}]))
        assert_loaded(results, 4)
        assert results[0][-1]["extra"] == {"step": 4, "rank": 0}
        total = sum(c["nbytes"] for t in manifest["tensors"].values() for c in t["chunks"].values())
        if layout == UNEVEN3:  # each rank reads only the chunks overlapping its range, not the whole tensor
            assert results[0][-1]["bytes_read"] < 0.4 * total
            assert sum(r[-1]["bytes_read"] for r in results) < 1.3 * total
        else:
            assert all(r[-1]["bytes_read"] == total for r in results)


def test_shards_saved_by_three_load_as_replicas_at_two(tmp_path):
    saved = run_workers(tmp_path, 3, one_level(tmp_path, [{"op": "save", "steps": [5], "layout": UNEVEN3}]))
    assert all(r[0]["error"] is None for r in saved)
    manifest = json.loads((tmp_path / "L2" / "step-00000005" / "manifest.json").read_text())
    assert manifest["complete"], "boundary chunks must be written (once) by gathering their pieces"
    assert manifest["rank_extra"] == {"1": {"step": 5, "rank": 1}, "2": {"step": 5, "rank": 2}}
    out = tmp_path / "load"
    out.mkdir()
    results = run_workers(out, 2, one_level(tmp_path, [{"op": "load", "layout": "replica"}]))
    assert_loaded(results, 5)
    assert results[1][-1]["rank_extra"] == {"step": 5, "rank": 1}
    out2 = tmp_path / "load2"
    out2.mkdir()
    assert_loaded(run_workers(out2, 2, one_level(tmp_path, [{"op": "load", "layout": UNEVEN2}])), 5)


def test_node_local_levels_two_nodes_and_load_agreement(tmp_path):
    """2 simulated nodes of 1 rank: each L0 holds a full replica copy, but after a Shard save each L0 holds only its
    own rank's chunks; a load whose new layout needs chunks a node does not have must agree on the shared level."""

    def cfg(ops):
        return lambda rank: {
            "node_id": f"node-{rank}",
            "local_world_size": 1,
            "local_rank": 0,
            "ops": ops,
            "levels": [
                {
                    "name": "L0",
                    "root": str(tmp_path / f"shm-node{rank}"),
                    "interval": 1,
                    "keep_last": 3,
                    "node_local": True,
                },
                shared(tmp_path, "L2", interval=2, keep=2),
            ],
        }

    saved = run_workers(
        tmp_path,
        2,
        cfg([{"op": "save", "steps": [2], "layout": "replica"}, {"op": "save", "steps": [3, 4], "layout": UNEVEN2}]),
    )
    assert saved[0][0]["committed"] == ["L0", "L2"] and saved[0][1]["committed"] == ["L0", "L0", "L2"]
    for rank in range(2):
        m = json.loads((tmp_path / f"shm-node{rank}" / "step-00000002" / "manifest.json").read_text())
        assert m["complete"] and m["node_id"] == f"node-{rank}"
        m4 = json.loads((tmp_path / f"shm-node{rank}" / "step-00000004" / "manifest.json").read_text())
        assert not m4["complete"]
    # same layout: each node's L0 has what its rank needs -> step 4 from L0 on both
    same = tmp_path / "same"
    same.mkdir()
    res = run_workers(same, 2, cfg([{"op": "load", "layout": UNEVEN2}]))
    assert_loaded(res, 4)
    assert [r[-1]["level"] for r in res] == ["L0", "L0"]
    # swapped ranges: node-local L0 copies cannot serve step 4 -> both agree on step 4 from the shared L2
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    res = run_workers(swapped, 2, cfg([{"op": "load", "layout": "replica"}]))
    assert_loaded(res, 4)
    assert [r[-1]["level"] for r in res] == ["L2", "L2"]
    # node 1 lost its memory and L2 is gone too: only step 2 (full replicas in node 0's L0)... is not on node 1
    import shutil

    shutil.rmtree(tmp_path / "shm-node1")
    shutil.rmtree(tmp_path / "L2" / "step-00000004")
    lost = tmp_path / "lost"
    lost.mkdir()
    res = run_workers(lost, 2, cfg([{"op": "load", "layout": "replica"}]))
    assert_loaded(res, 2)
    assert [r[-1]["level"] for r in res] == ["L0", "L2"]


def test_errors_from_two_ranks_are_gathered_into_one_exception(tmp_path):
    def cfg(rank):
        bad = tmp_path / f"not-a-dir-{rank}"
        bad.write_text("a file where the level root should be")
        return {
            "node_id": f"node-{rank}",
            "local_world_size": 1,
            "local_rank": 0,
            "levels": [{"name": "L1", "root": str(bad / "ckpt"), "interval": 1, "keep_last": 1, "node_local": True}],
            "ops": [{"op": "save", "steps": [1], "layout": "replica"}],
        }

    results = run_workers(tmp_path, 2, cfg)
    for res in results:
        err = res[0]["error"]
        assert err is not None and "rank 0 (node-0) L1" in err and "rank 1 (node-1) L1" in err
        assert "not-a-dir-0" in err and "not-a-dir-1" in err
