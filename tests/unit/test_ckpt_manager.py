"""Single-process behaviour of CheckpointManager: round trip, lazy staging, buffers, levels, commit, corruption."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from prometheus_client import CollectorRegistry

from checkpointing import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    LevelSpec,
    Shard,
    export_safetensors,
    inspect,
    list_checkpoints,
    read_tensor,
    committed_steps,
    step_dir_name,
    verify,
)
from checkpointing.manifest import MANIFEST_NAME
from support.ckpt_state import SPECS, full_tensor, make_state, matches
from support.waiting import wait_for


def levels(tmp: Path, *specs: tuple) -> list[LevelSpec]:
    """specs: (name, interval, keep_last) -> node-local levels under tmp."""
    return [LevelSpec(name, str(tmp / name), interval, keep, node_local=True) for name, interval, keep in specs]


def save_steps(mgr: CheckpointManager, steps, layout="replica") -> None:
    for step in steps:
        mgr.save(step, make_state(0, layout, step), {"step": step})
        mgr.wait_staged()
    mgr.wait_durable()


@pytest.fixture
def mgr(tmp_path):
    m = CheckpointManager(levels(tmp_path, ("L1", 1, 3)), chunk_bytes=256)
    yield m
    m.close()


def test_round_trip_dtypes_and_extra(mgr):
    extra = {"lr": 3e-4, "cursor": 12800, "rng": [1, 2, 3], "nested": {"phase": "b"}}
    mgr.save(7, make_state(0, "replica", 7), extra)
    mgr.wait_staged()
    assert mgr.wait_durable() == ["L1"]
    target = make_state(0, "replica", 0, zero=True)
    res = mgr.load(target)
    assert (res.step, res.level, res.extra, res.fallbacks) == (7, "L1", extra, [])
    assert matches(target, 7) == []
    assert target["model/model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert res.bytes_read > 0


def test_values_are_those_at_save_time(mgr):
    w = torch.zeros(64, 8)
    mgr.save(1, {"w": w})
    mgr.wait_staged()
    w.add_(5.0)  # the optimizer step, right after wait_staged()
    mgr.wait_durable()
    out = torch.full((64, 8), -1.0)
    mgr.load({"w": out})
    assert torch.equal(out, torch.zeros(64, 8))


def test_staging_buffers_are_reused_and_memory_stays_flat(tmp_path):
    mgr = CheckpointManager(levels(tmp_path, ("L0", 1, 1)), chunk_bytes=1 << 20, staging_buffers=2)
    state = {"w": torch.randn(1024, 1024), "b": torch.randn(4096)}  # 4 MB
    held = []
    rss = []
    for step in range(1, 21):
        mgr.save(step, state)
        mgr.wait_staged()
        mgr.wait_durable()
        stats = mgr.staging_stats()
        held.append((stats.host_buffers, stats.host_buffer_bytes, stats.host_buffer_allocations))
        rss.append(_rss_bytes())
    mgr.close()
    assert len(set(held[2:])) == 1, f"staging buffers were reallocated across saves: {held}"
    assert rss[-1] - rss[4] < 4 << 20, f"RSS grew by {(rss[-1] - rss[4]) / 1e6:.1f} MB over 15 saves"


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def test_levels_intervals_retention_and_latest(tmp_path):
    mgr = CheckpointManager(levels(tmp_path, ("L0", 1, 2), ("L1", 3, 2), ("L2", 6, 1)), chunk_bytes=256)
    for step in range(1, 13):  # each save durable before the next: a promotion still queued when a newer one
        save_steps(mgr, [step])  # arrives gives way to it by design (Promoter.replace_queued), skipping L1's step 9
    steps = {lv: [i.step for i in mgr.list() if i.level == lv] for lv in ("L0", "L1", "L2")}
    assert steps == {"L0": [11, 12], "L1": [9, 12], "L2": [12]}
    assert mgr.latest().step == 12 and mgr.latest().level == "L0"
    assert json.loads((tmp_path / "L1" / "latest").read_text()) == {"step": 12, "dir": "step-00000012"}
    mgr.close()


def test_latest_over_levels_and_load_from_slower_level(tmp_path):
    mgr = CheckpointManager(levels(tmp_path, ("L0", 1, 1), ("L1", 2, 2)), chunk_bytes=256)
    save_steps(mgr, [1, 2, 3])
    import shutil

    shutil.rmtree(tmp_path / "L0")  # node memory lost (node reboot): L1 still has step 2
    target = make_state(0, "replica", 0, zero=True)
    res = mgr.load(target)
    assert (res.step, res.level) == (2, "L1") and matches(target, 2) == []
    mgr.close()


def test_directory_without_manifest_is_ignored(mgr, tmp_path):
    save_steps(mgr, [1])
    fake = tmp_path / "L1" / "step-00000009"
    fake.mkdir()
    (fake / "zarr.json").write_text("{}")
    partial = tmp_path / "L1" / "step-00000010.partial-abc"
    partial.mkdir()
    assert [i.step for i in mgr.list()] == [1]
    res = mgr.load(make_state(0, "replica", 0, zero=True))
    assert res.step == 1
    save_steps(mgr, [2])  # the next commit cleans abandoned partial directories
    assert not partial.exists()


def _chunk_file(ckpt: Path, name: str) -> Path:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    return ckpt / manifest["tensors"][name]["chunks"]["0"]["file"]


@pytest.mark.parametrize("damage", ["corrupt", "missing", "truncated"])
def test_damaged_chunk_is_named_and_older_checkpoint_loads(mgr, tmp_path, damage, caplog):
    save_steps(mgr, [1, 2])
    chunk = _chunk_file(tmp_path / "L1" / "step-00000002", "model/model.embed_tokens.weight")
    if damage == "corrupt":
        data = bytearray(chunk.read_bytes())
        data[5] ^= 0xFF
        chunk.write_bytes(bytes(data))
    elif damage == "missing":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:10])
    target = make_state(0, "replica", 0, zero=True)
    res = mgr.load(target)
    assert res.step == 1 and matches(target, 1) == []
    assert len(res.fallbacks) == 1 and str(chunk) in res.fallbacks[0]
    assert {"corrupt": "crc32c", "missing": "missing", "truncated": "truncated"}[damage] in res.fallbacks[0]
    assert any(str(chunk) in r.message for r in caplog.records if r.levelname == "WARNING")
    problems = verify(tmp_path / "L1" / "step-00000002")
    assert len(problems) == 1 and str(chunk) in problems[0]
    with pytest.raises(CheckpointCorruptError, match=str(chunk)):
        read_tensor(tmp_path / "L1" / "step-00000002", "model/model.embed_tokens.weight")


def test_nothing_valid_raises_clear_error(mgr, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        mgr.load(make_state(0, "replica", 0, zero=True))
    save_steps(mgr, [1])
    wrong = {"model/model.embed_tokens.weight": torch.zeros(5, 5)}
    with pytest.raises(CheckpointError, match=r"shape \[37, 16\].*\[5, 5\]"):
        mgr.load(wrong)


def test_zarr_reads_every_array(mgr, tmp_path):
    save_steps(mgr, [4])
    group = zarr.open_group(str(tmp_path / "L1" / "step-00000004"), mode="r")
    for name, (shape, dtype) in SPECS.items():
        arr = group[name]
        want = full_tensor(name, shape, dtype, 4)
        assert arr.shape == shape and arr.attrs["torch_dtype"] == dtype
        got = torch.from_numpy(np.asarray(arr[...]))
        if dtype == "bfloat16":
            got = got.view(torch.bfloat16)
        assert torch.equal(got, want), name


def test_shards_round_trip_and_reshard_to_replica(tmp_path):
    """One process saving two Shards of the same tensor is not possible; Shards covering everything are."""
    mgr = CheckpointManager(levels(tmp_path, ("L1", 1, 1)), chunk_bytes=100)
    full = torch.arange(300, dtype=torch.float32).reshape(30, 10)
    mgr.save(1, {"w": Shard(full.reshape(-1).clone(), (30, 10), (0, 300))})
    mgr.wait_durable()
    out = torch.zeros(30, 10)
    mgr.load({"w": out})
    assert torch.equal(out, full)
    part = Shard(torch.zeros(77), (30, 10), (101, 178))  # any flat range, crossing rows and chunks
    mgr.load({"w": part})
    assert torch.equal(part.local, full.reshape(-1)[101:178])
    mgr.close()


def test_metrics_and_skip_policy(tmp_path):
    reg = CollectorRegistry()
    mgr = CheckpointManager(
        levels(tmp_path, ("L1", 1, 2)), chunk_bytes=256, registry=reg, on_busy="skip", staging_buffers=1
    )
    state = make_state(0, "replica", 1)
    first = mgr.save(1, state)
    second = mgr.save(2, state)  # the only buffer set is still busy with step 1
    assert first is not None and second is None
    mgr.wait_staged()
    mgr.wait_durable()
    get = reg.get_sample_value
    assert get("ecpt_checkpoint_skipped_total", {"level": "L1"}) == 1
    assert get("ecpt_checkpoint_durable_seconds_count", {"level": "L1"}) == 1
    assert get("ecpt_checkpoint_blocked_seconds_count", {"level": "L1"}) == 1
    assert get("ecpt_checkpoint_bytes_total", {"level": "L1"}) > 0
    assert mgr.stats.skips == 1
    mgr.close()


def test_on_busy_wait_counts_waits(tmp_path):
    mgr = CheckpointManager(levels(tmp_path, ("L1", 1, 2)), chunk_bytes=256, staging_buffers=1)
    state = make_state(0, "replica", 1)
    assert mgr.save(1, state) is not None and mgr.save(2, state) is not None
    mgr.wait_staged()
    assert mgr.wait_durable() == ["L1", "L1"] and mgr.stats.waits == 1
    mgr.close()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a real ENOSPC. Needs root (mount); skipped otherwise."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_is_a_clear_error_and_older_checkpoints_survive(tiny_tmpfs):
    mgr = CheckpointManager([LevelSpec("L1", str(tiny_tmpfs / "ckpt"), 1, 5, node_local=True)], chunk_bytes=64 << 10)
    small = {"w": torch.randn(32, 1024)}  # 128 KB
    mgr.save(1, small, {"step": 1})
    mgr.wait_durable()
    mgr.save(2, {"w": torch.randn(32, 1024), "big": torch.randn(512, 1024)}, {"step": 2})  # 2 MB > 1 MiB
    with pytest.raises(CheckpointError) as info:
        mgr.wait_durable()
    msg = str(info.value)
    assert "No space left on device" in msg and "L1" in msg and str(tiny_tmpfs / "ckpt") in msg
    assert not list((tiny_tmpfs / "ckpt").glob("*.partial-*")), "the failed save's files were not cleaned up"
    out = {"w": torch.zeros(32, 1024)}
    assert mgr.load(out).step == 1 and torch.equal(out["w"], small["w"])
    mgr.save(3, small, {"step": 3})  # training continues and saving works again
    assert mgr.wait_durable() == ["L1"]
    mgr.close()


def test_offline_list_inspect_and_export(mgr, tmp_path):
    hf_config = {"model_type": "llama", "hidden_size": 16}
    mgr.save(5, make_state(0, "replica", 5), {"hf_config": hf_config})
    mgr.wait_durable()
    ckpt = tmp_path / "L1" / "step-00000005"
    assert [i.step for i in list_checkpoints(tmp_path / "L1")] == [5]
    info = inspect(ckpt)
    assert info["step"] == 5 and info["tensors"]["optim/step"]["shape"] == []
    from safetensors.torch import load_file

    out = export_safetensors(ckpt, tmp_path / "hf", prefix="model/")
    loaded = load_file(str(out))
    assert sorted(loaded) == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(
        loaded["model.layers.0.mlp.up_proj.weight"],
        full_tensor("model/model.layers.0.mlp.up_proj.weight", (29, 24), "bfloat16", 5),
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == hf_config


def test_static_extra_is_in_every_manifest_under_the_save_extra(tmp_path):
    """static_extra (config, HF config) is given once and lands in each save's manifest extra, merged under the
    per-save extra, so load() and export see what they saw when the trainer sent it with every save."""
    static = {"config": {"train": {"global_batch": 8}}, "hf_config": {"model_type": "llama"}}
    mgr = CheckpointManager(levels(tmp_path, ("L1", 1, 3)), chunk_bytes=256, static_extra=static)
    save_steps(mgr, [1, 2])
    for step in (1, 2):
        doc = json.loads((tmp_path / "L1" / f"step-{step:08d}" / "manifest.json").read_text())
        assert doc["extra"] == {**static, "step": step}
    assert mgr.load(make_state(0, "replica", 0, zero=True)).extra == {**static, "step": 2}
    mgr.close()
    with pytest.raises(CheckpointError, match="static_extra is not JSON-serialisable"):
        CheckpointManager(levels(tmp_path, ("L1", 1, 3)), static_extra={"rng": torch.zeros(2)})


def test_save_with_named_levels_writes_a_step_no_interval_is_due_at(tmp_path):
    """A stop signal after step 7 with saves due every 5 (L0) and 100 (L2): step 7 itself must survive."""
    mgr = CheckpointManager(levels(tmp_path, ("L0", 5, 2), ("L2", 100, 1)), chunk_bytes=256)
    save_steps(mgr, [5, 6, 7])
    assert [i.step for i in mgr.list()] == [5]
    assert mgr.save(7, make_state(0, "replica", 7), {"step": 7}, levels=["L0"]) is not None
    assert mgr.emergency_save() == ["L2"]
    assert sorted((i.level, i.step) for i in mgr.list()) == [("L0", 5), ("L0", 7), ("L2", 7)]
    target = make_state(0, "replica", 0, zero=True)
    assert mgr.load(target, step=7).extra["step"] == 7 and matches(target, 7) == []
    with pytest.raises(CheckpointError, match=r"no level named \['L9'\]"):
        mgr.save(8, make_state(0, "replica", 8), {"step": 8}, levels=["L9"])
    mgr.close()


def test_emergency_save_writes_newest_staged_step_to_most_durable_level(tmp_path):
    mgr = CheckpointManager(levels(tmp_path, ("L0", 1, 2), ("L2", 100, 1)), chunk_bytes=256)
    save_steps(mgr, [1, 2, 3])
    assert [i.step for i in mgr.list() if i.level == "L2"] == []
    assert mgr.emergency_save() == ["L2"]
    assert [i.step for i in mgr.list() if i.level == "L2"] == [3]
    assert mgr.emergency_save() == []  # already durable: nothing to do
    target = make_state(0, "replica", 0, zero=True)
    import shutil

    shutil.rmtree(tmp_path / "L0")
    assert mgr.load(target).level == "L2" and matches(target, 3) == []
    mgr.close()


def test_invalid_inputs_name_the_problem(mgr):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        mgr.save(1, {"w": torch.zeros(2)}, {"bad": object()})
    with pytest.raises(CheckpointError, match="flat_range"):
        mgr.save(1, {"w": Shard(torch.zeros(3), (2, 2), (2, 6))})
    with pytest.raises(CheckpointError, match="not a valid checkpoint path"):
        mgr.save(1, {"../w": torch.zeros(2)})
    assert mgr.save(1, {}) is not None
    mgr.wait_durable()


def test_retiring_a_step_whose_earlier_copy_still_waits_in_trash(tmp_path):
    """Step 15 saved, retired, saved again after a restart and retired again under the same nonce while the janitor
    has not deleted the first copy: the rename must not hit the non-empty trash directory (ENOTEMPTY)."""
    from checkpointing.tiers import MANIFEST_NAME, committed_steps, retain

    pending = tmp_path / ".trash-n1-step-00000015"
    (pending / "model").mkdir(parents=True)
    (pending / "model" / "c0").write_bytes(b"first copy")
    for step in (15, 16, 17):
        d = tmp_path / f"step-{step:08d}"
        d.mkdir()
        (d / MANIFEST_NAME).write_text("{}")
    retained = retain(tmp_path, keep_last=2, current_nonce="n1", others=False)
    assert [p.name for p in retained] == ["step-00000015"]
    assert [s for s, _ in committed_steps(tmp_path)] == [16, 17]
    assert (pending / "model" / "c0").read_bytes() == b"first copy"  # the janitor's pending copy is left alone


def test_discard_after_retires_the_abandoned_trajectory_so_new_saves_of_those_steps_survive(tmp_path):
    """Resumed at step 3 while steps 4-6 of an abandoned trajectory remain: without discard_after, L0 retention
    (keep 2) would keep the stale 5 and 6 and retire the fresh step 4 as soon as it commits."""
    mgr = CheckpointManager(levels(tmp_path, ("L0", 1, 2), ("L1", 3, 3)), chunk_bytes=256)
    save_steps(mgr, [1, 2, 3, 4, 5, 6])
    target = make_state(0, "replica", 0, zero=True)
    assert mgr.load(target, step=3).step == 3
    retired = mgr.discard_after(3)
    assert sorted(Path(p).name for p in retired) == ["step-00000005", "step-00000006", "step-00000006"]
    assert [(i.level, i.step) for i in mgr.list() if i.step > 3] == []
    save_steps(mgr, [4])
    assert sorted((i.level, i.step) for i in mgr.list()) == [("L0", 4), ("L1", 3)]  # L0 kept 5, 6 before: not 3
    assert mgr.load(target).step == 4 and matches(target, 4) == []
    mgr.close()


def test_a_slow_level_gets_the_newest_step_instead_of_stalling_saves(tmp_path, monkeypatch):
    """Promotion never stalls training: while the promotion of step 1 to L1 hangs (a slow disk or object store),
    the queued promotion gives way to each newer step's, so saves keep committing on L0; when L1 is free again it
    gets the newest step, and the steps in between count as skipped on L1."""
    import threading

    import checkpointing.promote as promote

    release, entered = threading.Event(), threading.Event()
    real_write_chunks = promote.write_chunks

    def hanging_first_copy(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            release.wait()
        return real_write_chunks(*args, **kwargs)

    monkeypatch.setattr(promote, "write_chunks", hanging_first_copy)
    reg = CollectorRegistry()
    mgr = CheckpointManager(levels(tmp_path, ("L0", 1, 2), ("L1", 1, 3)), chunk_bytes=256, registry=reg)
    handles = {}

    def train() -> None:
        for step in range(1, 7):
            handles[step] = mgr.save(step, make_state(0, "replica", step), {"step": step})
            mgr.wait_staged()

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        trainer.join(timeout=60)
        assert not trainer.is_alive(), "saves stalled behind the hanging promotion"
        wait_for(
            lambda: (tmp_path / "L0" / step_dir_name(6) / MANIFEST_NAME).exists(),
            60,
            "step 6 committed on L0 while the promotion to L1 hangs",
        )
        assert entered.is_set() and not release.is_set()
    finally:
        release.set()  # unblock whatever happened, so a failing run does not hang
        trainer.join()
    mgr.wait_durable()
    assert [s for s, _ in committed_steps(tmp_path / "L1")] == [1, 6]
    assert [handles[s].durable.result() for s in range(1, 7)] == [["L0", "L1"]] + [["L0"]] * 4 + [["L0", "L1"]]
    assert reg.get_sample_value("ecpt_checkpoint_skipped_total", {"level": "L1"}) == 4
    mgr.close()


@pytest.mark.parametrize("on_busy", ["skip", "wait"])
def test_skip_keeps_one_save_in_flight_even_with_a_free_second_buffer(tmp_path, on_busy):
    """on_busy="skip" means one staging copy of the state at most: a save due while the previous one is still being
    written is skipped although a second buffer set is free; "wait" stages it into that second set."""
    import threading

    writing, release = threading.Event(), threading.Event()

    def hang_first_save(step: int, chunks_written: int) -> None:
        if step == 1:
            writing.set()
            release.wait()

    mgr = CheckpointManager(
        levels(tmp_path, ("L1", 1, 3)), chunk_bytes=256, on_busy=on_busy, staging_buffers=2, after_chunk=hang_first_save
    )
    state = make_state(0, "replica", 1)
    try:
        assert mgr.save(1, state) is not None
        mgr.wait_staged()
        assert writing.wait(60), "the first save never started writing"
        second = mgr.save(2, state)
        assert (second is None) == (on_busy == "skip")
        mgr.wait_staged()  # the second save (if taken) is staged while the first still hangs
        held = mgr.staging_stats().host_buffers
    finally:
        release.set()
    mgr.wait_staged()
    assert mgr.wait_durable() == (["L1"] if on_busy == "skip" else ["L1", "L1"])
    assert mgr.stats.skips == (1 if on_busy == "skip" else 0)
    if on_busy == "skip":
        assert held == len(state), "skip held more than one staging copy of the state"
    assert mgr.save(3, state) is not None  # nothing in flight any more: accepted
    mgr.wait_staged()
    mgr.wait_durable()
    mgr.close()
