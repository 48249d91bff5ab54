"""Real gloo processes saving to memory levels: zero-copy staging (each rank stages only the chunks it writes, the
staging files become the checkpoint), boundary pieces of Shards exchanged into them, node-local copies, and loads
at other world sizes and layouts."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from checkpointing import verify
from checkpointing.zarr_store import is_memory_fs
from support.ckpt_workers import run_workers

pytestmark = pytest.mark.slow

UNEVEN3 = [0, 0.17, 0.71, 1.0]
UNEVEN2 = [0, 0.62, 1.0]


@pytest.fixture
def shm():
    if not is_memory_fs("/dev/shm"):
        pytest.skip("/dev/shm is not a tmpfs here")
    root = Path("/dev/shm") / f"ecpt-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def level(root: Path, name: str, interval=1, keep=2, node_local=True, **kw) -> dict:
    return {
        "name": name,
        "root": str(root / name),
        "interval": interval,
        "keep_last": keep,
        "node_local": node_local,
        **kw,
    }


def assert_loaded(results: list[dict], step: int, level_name: str | None = None) -> None:
    for rank, res in enumerate(results):
        assert res[-1]["error"] is None, f"rank {rank}: {res[-1]['error']}"
        assert res[-1]["step"] == step and res[-1]["mismatched"] == [], f"rank {rank}: {res[-1]}"
        assert level_name is None or res[-1]["level"] == level_name


def chunk_links(ckpt: Path) -> list[int]:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    return [(ckpt / c["file"]).stat().st_nlink for t in manifest["tensors"].values() for c in t["chunks"].values()]


def test_two_ranks_stage_their_own_chunks_and_any_world_loads_them(shm, tmp_path):
    levels = [level(shm, "L0"), level(tmp_path, "L1", interval=3, node_local=False)]
    saved = run_workers(
        tmp_path,
        2,
        lambda r: {
            "levels": levels,
            "chunk_bytes": 128,
            "ops": [{"op": "save", "steps": list(range(1, 8)), "layout": "replica"}],
        },
    )
    assert saved[0][0]["committed"] == ["L0", "L0", "L0", "L1", "L0", "L0", "L0", "L1", "L0"]
    newest = shm / "L0" / "step-00000007"
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["complete"] and manifest["world_size"] == 2
    assert verify(newest) == [] and verify(shm / "L0" / "step-00000006") == []
    assert verify(tmp_path / "L1" / "step-00000006") == []
    # the workers exited: their staging names are gone, the checkpoint files remain (one link each)
    assert set(chunk_links(newest)) == {1}
    for layout, world in [("replica", 2), ("replica", 1), (UNEVEN3, 3)]:
        out = tmp_path / f"load-{world}-{len(layout)}"
        out.mkdir()
        res = run_workers(
            out, world, lambda r: {"levels": levels, "chunk_bytes": 128, "ops": [{"op": "load", "layout": layout}]}
        )
        assert_loaded(res, 7, "L0")
        assert res[0][-1]["extra"] == {"step": 7, "rank": 0}


def test_shards_with_boundary_pieces_on_a_memory_level(shm, tmp_path):
    levels = [level(shm, "L0", keep=3, node_local=False)]
    saved = run_workers(
        tmp_path,
        3,
        lambda r: {
            "levels": levels,
            "chunk_bytes": 100,
            "ops": [{"op": "save", "steps": [5, 6, 7, 8], "layout": UNEVEN3}],
        },
    )
    assert all(r[0]["error"] is None and r[0]["committed"] == ["L0"] * 4 for r in saved)
    for step in (6, 7, 8):
        ckpt = shm / "L0" / f"step-{step:08d}"
        assert json.loads((ckpt / "manifest.json").read_text())["complete"]
        assert verify(ckpt) == []
    out = tmp_path / "load"
    out.mkdir()
    res = run_workers(
        out,
        2,
        lambda r: {
            "levels": levels,
            "chunk_bytes": 100,
            "ops": [{"op": "load", "layout": "replica"}, {"op": "load", "layout": UNEVEN2, "step": 7}],
        },
    )
    assert_loaded([[r[0]] for r in res], 8)
    assert_loaded(res, 7)


def test_two_nodes_memory_levels_then_node_loss(shm, tmp_path):
    def cfg(ops):
        return lambda rank: {
            "node_id": f"node-{rank}",
            "local_world_size": 1,
            "local_rank": 0,
            "ops": ops,
            "levels": [level(shm / f"node{rank}", "L0", keep=3), level(tmp_path, "L2", interval=2, node_local=False)],
        }

    saved = run_workers(
        tmp_path,
        2,
        cfg(
            [
                {"op": "save", "steps": [1, 2], "layout": "replica"},
                {"op": "save", "steps": [3, 4, 5], "layout": UNEVEN2},
            ]
        ),
    )
    assert saved[0][0]["committed"] == ["L0", "L0", "L2"] and saved[0][1]["committed"] == ["L0", "L0", "L2", "L0"]
    for rank in range(2):
        m5 = json.loads((shm / f"node{rank}" / "L0" / "step-00000005" / "manifest.json").read_text())
        assert not m5["complete"] and m5["node_id"] == f"node-{rank}"  # each node holds its own rank's chunks
        assert verify(shm / f"node{rank}" / "L0" / "step-00000005") == []
    same = tmp_path / "same"
    same.mkdir()
    assert_loaded(run_workers(same, 2, cfg([{"op": "load", "layout": UNEVEN2}])), 5, "L0")
    shutil.rmtree(shm / "node1")  # node 1 lost its memory: both agree on step 4 from L2
    lost = tmp_path / "lost"
    lost.mkdir()
    res = run_workers(lost, 2, cfg([{"op": "load", "layout": "replica"}]))
    assert_loaded(res, 4, "L2")


def test_promotions_overlap_fast_saves_without_losing_anything(shm, tmp_path):
    """Disk promotions run on the promoter thread while every step commits to memory: nothing may be read after
    it was retired, every checkpoint stays verifiable, and the disk level ends with the newest step. When the disk
    falls behind, a queued promotion gives way to a newer step's (Promoter.replace_queued), so fewer than the 8 due
    steps may reach L1, the same ones on both ranks."""
    levels = [level(shm, "L0", keep=2), level(tmp_path, "L1", interval=3, keep=3, node_local=False)]
    steps = list(range(1, 25))
    saved = run_workers(
        tmp_path,
        2,
        lambda r: {"levels": levels, "chunk_bytes": 128, "ops": [{"op": "save", "steps": steps, "layout": "replica"}]},
    )
    for res in saved:
        assert res[0]["error"] is None, res[0]["error"]
        assert res[0]["committed"].count("L0") == 24 and 1 <= res[0]["committed"].count("L1") <= 8
    assert saved[0][0]["committed"] == saved[1][0]["committed"]
    on_l1 = sorted(p.name for p in (tmp_path / "L1").iterdir() if p.name.startswith("step-"))
    assert on_l1[-1] == "step-00000024" and len(on_l1) == min(3, saved[0][0]["committed"].count("L1"))
    assert all(int(name[len("step-") :]) % 3 == 0 for name in on_l1), on_l1
    assert sorted(p.name for p in (shm / "L0").iterdir() if p.name.startswith("step-")) == [
        "step-00000023",
        "step-00000024",
    ]
    for ckpt in [*(tmp_path / "L1").glob("step-*"), *(shm / "L0").glob("step-*")]:
        assert verify(ckpt) == [], ckpt
    shutil.rmtree(shm / "L0")
    out = tmp_path / "load"
    out.mkdir()
    res = run_workers(
        out, 2, lambda r: {"levels": levels, "chunk_bytes": 128, "ops": [{"op": "load", "layout": "replica"}]}
    )
    assert_loaded(res, 24, "L1")


@pytest.mark.parametrize("memory", [True, False])
def test_prepare_agrees_on_shards_before_the_first_save(shm, tmp_path, memory):
    """Two ranks with uneven Shards call prepare(): the plan (with the boundary pieces each rank sends) is agreed
    in prepare's gather, so every save, the first included, stages into slots and no rank allocates host buffers."""
    levels = [level(shm if memory else tmp_path, "L", keep=2, node_local=False, memory=memory)]
    ops = [
        {"op": "prepare", "layout": UNEVEN2},
        {"op": "save", "steps": [1, 2, 3], "layout": UNEVEN2},
        {"op": "staging_stats"},
        {"op": "load", "layout": "replica"},
    ]
    res = run_workers(tmp_path, 2, lambda r: {"levels": levels, "chunk_bytes": 100, "ops": ops})
    for rank, (prepared, saved, stats, loaded) in enumerate(res):
        assert prepared == {"ready": True}, f"rank {rank}: {prepared}"
        assert saved == {"committed": ["L"] * 3, "error": None}, f"rank {rank}: {saved}"
        assert stats["host_buffer_allocations"] == 0, f"rank {rank} staged into host buffers: {stats}"
        assert loaded["error"] is None and loaded["step"] == 3 and loaded["mismatched"] == [], f"rank {rank}: {loaded}"
