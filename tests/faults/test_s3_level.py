"""The object-store level (issue 14) against a real S3 server (SeaweedFS on 127.0.0.1, tests/support/s3.py):
saving through L1 and promoting to s3://, loading from S3 alone at another world size, the server killed in the
middle of an upload, refused credentials and a missing bucket at start-up, and damaged objects on load."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from checkpointing import CheckpointError, CheckpointManager, LevelSpec
from checkpointing.objstore import ObjectStorage
from support.ckpt_state import make_state, matches
from support.ckpt_workers import run_workers
from elastic.metrics import read_jsonl
from support.commit_steps import write_steps
from support.configs import recovery_config, write_toml
from support.processes import check_ok, ecpt_train, run_ecpt
from support.s3 import start_s3_server

pytestmark = pytest.mark.slow

UNEVEN3 = [0, 0.17, 0.71, 1.0]
UNEVEN2 = [0, 0.62, 1.0]


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def l2(server, prefix: str, keep: int = 2) -> dict:
    return {
        "name": "L2",
        "root": server.url(prefix),
        "interval": 1,
        "keep_last": keep,
        "node_local": False,
        "endpoint": server.endpoint,
    }


def keys(server, prefix: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix + "/")
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_saved_by_three_through_l1_loads_from_s3_alone_at_two(s3_env, tmp_path):
    """Three ranks save uneven shards through a local L1 and promote to S3; two ranks load other uneven shards from
    S3 alone, bit-exact; retention kept only the newest step there."""
    l1 = {"name": "L1", "root": str(tmp_path / "L1"), "interval": 1, "keep_last": 2, "node_local": False}
    remote = l2(s3_env, "run", keep=1)
    saved = run_workers(
        tmp_path,
        3,
        lambda rank: {"levels": [l1, remote], "ops": [{"op": "save", "steps": [4, 5], "layout": UNEVEN3}]},
        env=s3_env.env(),
    )
    assert all(r[0]["error"] is None and r[0]["committed"] == ["L1", "L2", "L1", "L2"] for r in saved)
    stored = keys(s3_env, "run")
    assert "run/step-00000005/manifest.json" in stored and not any("step-00000004" in k for k in stored)
    latest = s3_env.client().get_object(Bucket=s3_env.bucket, Key="run/latest")["Body"].read()
    assert json.loads(latest) == {"dir": "step-00000005", "step": 5}
    manifest = json.loads(
        s3_env.client().get_object(Bucket="ckpt", Key="run/step-00000005/manifest.json")["Body"].read()
    )
    assert manifest["complete"] and manifest["world_size"] == 3
    out = tmp_path / "load"  # uneven shards here; ecpt train's resume below loads replicas from S3
    out.mkdir()
    loaded = run_workers(
        out, 2, lambda rank: {"levels": [remote], "ops": [{"op": "load", "layout": UNEVEN2}]}, env=s3_env.env()
    )
    for r in loaded:
        assert r[0]["error"] is None and r[0]["step"] == 5 and r[0]["level"] == "L2"
        assert r[0]["path"] == s3_env.url("run/step-00000005") and r[0]["mismatched"] == []
    assert loaded[1][0]["rank_extra"] == {"step": 5, "rank": 1}


def _manager(levels: list[dict], **kw) -> CheckpointManager:
    return CheckpointManager([LevelSpec(**lv) for lv in levels], chunk_bytes=64 << 10, **kw)


def _save(mgr: CheckpointManager, step: int):
    handle = mgr.save(step, make_state(0, "replica", step), {"step": step})
    mgr.wait_staged()
    return handle


def test_commit_protocol_on_s3_nothing_is_trusted_before_the_manifest(s3_env):
    """commit.py's steps driven one by one with ObjectStorage: after every chunk is uploaded and verified the step
    is not listed (no manifest); publish makes it visible and readable; a failed save is deleted with the older
    step intact; keep_last retention deletes the older step only after the newer one committed."""
    from checkpointing import commit
    from checkpointing.commit import LevelState
    from checkpointing.plan import PlanCache

    storage = ObjectStorage(LevelSpec(**l2(s3_env, "protocol", keep=1)))
    state, plans = LevelState(storage), PlanCache()
    ctx, target, records = write_steps(state, 1, plans)
    assert any("protocol/step-00000001/" in k for k in keys(s3_env, "protocol")), "chunks are uploaded"
    assert storage.committed() == [], "a step is visible before its manifest"
    assert commit.commit(state, ctx, target, records, failed=False).error is None
    assert [s for s, _ in storage.committed()] == [1]
    manifest = storage.read_manifest(target.location)
    record = next(iter(manifest.tensors["counters"].chunks.values()))
    storage.read_chunk(target.location / record.file, record, [memoryview(bytearray(record.nbytes))])

    ctx, target, records = write_steps(state, 2, plans)
    assert commit.commit(state, ctx, target, records, failed=True).error is None  # a rank failed: discarded
    assert not any("step-00000002" in k for k in keys(s3_env, "protocol"))
    assert [s for s, _ in storage.committed()] == [1]
    ctx, target, records = write_steps(state, 3, plans)
    assert commit.commit(state, ctx, target, records, failed=False).error is None
    assert [s for s, _ in storage.committed()] == [3] and not any(
        "step-00000001" in k for k in keys(s3_env, "protocol")
    )
    storage.close()


def test_server_killed_mid_upload_training_continues_and_the_next_promotion_succeeds(s3_env, tmp_path, monkeypatch):
    """SIGKILL of the server after the first chunk of step 2's upload: L1 keeps committing (saves never block),
    step 2 fails on L2 and is counted and logged, step 1 stays intact there, and once the server is back the next
    promotion commits and the abandoned upload of step 2 is cleaned up."""
    l1 = {"name": "L1", "root": str(tmp_path / "L1"), "interval": 1, "keep_last": 3, "node_local": False}
    mgr = _manager([l1, l2(s3_env, "kill", keep=3)])
    log = []
    mgr.log.addHandler(_ListHandler(log))
    _save(mgr, 1)
    assert mgr.wait_durable() == ["L1", "L2"]

    uploads = []
    real_upload = ObjectStorage._upload

    def upload_then_kill(self, key, buf, view):  # the fault: the server dies while step 2's chunks are uploading
        real_upload(self, key, buf, view)
        uploads.append(key)
        if "step-00000002" in key and "/c/" in key and len(uploads) == 1:
            s3_env.kill()

    monkeypatch.setattr(ObjectStorage, "_upload", upload_then_kill)
    _save(mgr, 2)
    with pytest.raises(CheckpointError, match="L2") as err:
        mgr.wait_durable()
    assert "older checkpoints are intact" in str(err.value)
    assert mgr.stats.level_failures == {"L2": 1}
    assert any("step 2 on L2 failed" in line for line in log), log
    _save(mgr, 3)  # the server is still down: L1 commits, L2 fails again, nothing blocks
    with pytest.raises(CheckpointError):
        mgr.wait_durable()
    assert [i.step for i in mgr.list() if i.level == "L1"] == [1, 2, 3]

    s3_env.start()
    assert "kill/step-00000001/manifest.json" in keys(s3_env, "kill"), "step 1 must survive the lost server"
    _save(mgr, 4)
    assert mgr.wait_durable() == ["L1", "L2"]
    assert mgr.stats.level_failures == {"L2": 2} and mgr.stats.bytes_written["L2"] > 0
    assert mgr.stats.write_seconds["L2"] > 0  # uploads of the two committed steps and the failed ones
    mgr.close()
    stored = keys(s3_env, "kill")
    assert {k.split("/")[1] for k in stored if "step-" in k} == {"step-00000001", "step-00000004"}, stored
    remote_only = _manager([l2(s3_env, "kill")])
    state = make_state(0, "replica", 0, zero=True)
    assert remote_only.load(state).step == 4 and matches(state, 4) == []
    remote_only.close()


class _ListHandler(logging.Handler):
    def __init__(self, out: list) -> None:
        super().__init__(logging.ERROR)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


def test_refused_credentials_and_a_missing_bucket_fail_at_start_up(tmp_path, monkeypatch):
    server = start_s3_server(tmp_path / "s3", credentials=True)
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        _manager([l2(server, "ok")]).close()  # the right key works
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(CheckpointError, match="credentials were refused .*SignatureDoesNotMatch|InvalidAccess"):
            _manager([l2(server, "run")])
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
        with pytest.raises(CheckpointError, match="credentials were refused"):
            _manager([l2(server, "run")])
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.env()["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.env()["AWS_SECRET_ACCESS_KEY"])
        missing = {**l2(server, "run"), "root": "s3://no-such-bucket/run"}
        with pytest.raises(CheckpointError, match="bucket 'no-such-bucket' does not exist"):
            _manager([missing])
    finally:
        server.stop()


def test_ecpt_train_resumes_from_s3_alone_at_another_world_size(s3_env, tiny_raw, tmp_path):
    """Two workers train with L1 on disk and L2 on S3; with L1 deleted (a new node: nothing local), one worker
    resumes the same run from S3: step, tokens and cursor continue where the S3 copy left off."""
    run = tmp_path / "run"
    first = recovery_config(
        tiny_raw, tmp_path, 2, interval=2, l0_interval=0, l2_dir=s3_env.url("runs"), l2_interval=2, l2_keep_last=1
    )
    check_ok(ecpt_train(first, run))
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl", "step")][-1] == 6
    shutil.rmtree(run / "checkpoints")
    stored = keys(s3_env, "runs")
    assert any(k.endswith("step-00000006/manifest.json") for k in stored), stored
    longer = recovery_config(
        tiny_raw, tmp_path, 3, interval=2, l0_interval=0, l2_dir=s3_env.url("runs"), l2_interval=2, l2_keep_last=1
    )
    check_ok(ecpt_train(longer, run, "--nproc-per-node", "1"))
    resume = read_jsonl(run / "metrics.jsonl", "resume")[-1]
    assert resume["level"] == "L2" and resume["step"] == 6
    assert (resume["saved_world_size"], resume["world_size"]) == (2, 1)
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl", "step")]
    assert steps[-3:] == [7, 8, 9]


def test_ecpt_train_refuses_a_missing_bucket_before_any_worker_starts(s3_env, tiny_raw, tmp_path):
    raw = {**tiny_raw, "checkpoint": {**tiny_raw["checkpoint"]}}
    raw["checkpoint"].update(l2_dir="s3://no-such-bucket/run", l2_interval=2, s3_endpoint=s3_env.endpoint)
    run = tmp_path / "run"
    result = run_ecpt(["train", "--config", str(write_toml(raw, tmp_path / "s3.toml")), "--run-dir", str(run)], 120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "checkpoint.l2_dir = 's3://no-such-bucket/run'" in result.stderr
    assert "bucket 'no-such-bucket' does not exist" in result.stderr
    assert not (run / "metrics.jsonl").exists(), "no worker may start"


def test_credentials_from_the_aws_config_files(tmp_path, monkeypatch):
    """No AWS_* key in the environment: the key comes from the shared credentials file of a named profile."""
    server = start_s3_server(tmp_path / "s3", credentials=True)
    try:
        env = server.env()
        (tmp_path / "credentials").write_text(
            f"[ckpt]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\naws_secret_access_key = "
            f"{env['AWS_SECRET_ACCESS_KEY']}\n"
        )
        (tmp_path / "config").write_text("[profile ckpt]\nregion = us-east-1\n")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
        monkeypatch.setenv("AWS_PROFILE", "ckpt")
        mgr = _manager([l2(server, "profile")])
        _save(mgr, 1)
        assert mgr.wait_durable() == ["L2"]
        mgr.close()
        assert "profile/step-00000001/manifest.json" in keys(server, "profile")
        monkeypatch.setenv("AWS_PROFILE", "nobody")  # a profile that does not exist: no key at all
        with pytest.raises(CheckpointError, match="AWS credentials .*nobody"):
            _manager([l2(server, "profile")])
    finally:
        server.stop()


def test_retention_deletes_an_abandoned_step_and_aborts_its_multipart_upload(s3_env):
    """A process killed mid-upload leaves a step prefix without manifest and an incomplete multipart upload (both
    made here by hand); the next commit on the level removes both."""
    client = s3_env.client()
    client.put_object(Bucket="ckpt", Key="mp/step-00000001/w/c/0", Body=b"half a checkpoint")
    upload = client.create_multipart_upload(Bucket="ckpt", Key="mp/step-00000001/w/c/1")
    client.upload_part(
        Bucket="ckpt", Key="mp/step-00000001/w/c/1", UploadId=upload["UploadId"], PartNumber=1, Body=b"x"
    )
    assert len(client.list_multipart_uploads(Bucket="ckpt", Prefix="mp/").get("Uploads", [])) == 1
    mgr = _manager([l2(s3_env, "mp")])
    _save(mgr, 2)
    assert mgr.wait_durable() == ["L2"]
    mgr.close()
    assert not any("step-00000001" in k for k in keys(s3_env, "mp"))
    assert client.list_multipart_uploads(Bucket="ckpt", Prefix="mp/").get("Uploads", []) == []


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_a_damaged_object_is_detected_on_load_and_loading_falls_back(s3_env, damage, capsys):
    mgr = _manager([l2(s3_env, "damage")])
    for step in (1, 2):
        _save(mgr, step)
    assert mgr.wait_durable() == ["L2", "L2"]
    mgr.close()
    chunk = next(k for k in keys(s3_env, "damage/step-00000002") if "/c/" in k)
    client = s3_env.client()
    if damage == "corrupt":
        body = bytearray(client.get_object(Bucket="ckpt", Key=chunk)["Body"].read())
        body[len(body) // 2] ^= 0xFF
        client.put_object(Bucket="ckpt", Key=chunk, Body=bytes(body))
    else:
        client.delete_object(Bucket="ckpt", Key=chunk)
    loader = _manager([l2(s3_env, "damage")])
    state = make_state(0, "replica", 0, zero=True)
    res = loader.load(state)
    loader.close()
    assert res.step == 1 and matches(state, 1) == []
    expected = "crc32c" if damage == "corrupt" else "missing"
    assert any(chunk in f and expected in f for f in res.fallbacks), res.fallbacks
    from launch.cli import main as ecpt_main

    assert ecpt_main(["ckpt", "list", s3_env.url("damage")]) == 0
    listed = capsys.readouterr().out
    assert s3_env.url("damage/step-00000001") in listed and s3_env.url("damage/step-00000002") in listed
    assert ecpt_main(["ckpt", "verify", s3_env.url("damage")]) == 1  # the newest step, damaged
    assert chunk in capsys.readouterr().out
    assert ecpt_main(["ckpt", "verify", s3_env.url("damage/step-00000001")]) == 0


def test_a_partial_load_from_s3_fetches_and_verifies_only_the_covering_blocks(s3_env):
    """A Shard ending inside a chunk: one ranged GET for the blocks covering it, each verified against its block
    crc. Damage in a block the range needs is named; damage elsewhere in the object does not fail this load (by
    design each rank verifies what it reads)."""
    import torch

    from checkpointing import Shard
    from checkpointing.checksums import CRC_BLOCK_BYTES

    mgr = CheckpointManager([LevelSpec(**l2(s3_env, "ranged"))], chunk_bytes=1 << 20)
    full = torch.randn(512, 512)  # 1 MiB: one object of four 256 KiB blocks
    mgr.save(1, {"w": full}, {})
    assert mgr.wait_durable() == ["L2"]

    def load(start: int, stop: int) -> int:
        part = Shard(torch.zeros(stop - start), (512, 512), (start, stop))
        res = mgr.load({"w": part})
        assert torch.equal(part.local, full.reshape(-1)[start:stop])
        return res.bytes_read

    per_block = CRC_BLOCK_BYTES // 4
    assert load(per_block + 5, 2 * per_block + 5) == 2 * CRC_BLOCK_BYTES  # blocks 1 and 2 of 4
    key, client = "ranged/step-00000001/w/c/0/0", s3_env.client()
    body = bytearray(client.get_object(Bucket="ckpt", Key=key)["Body"].read())
    body[10] ^= 0xFF  # block 0
    client.put_object(Bucket="ckpt", Key=key, Body=bytes(body))
    assert load(per_block + 5, 2 * per_block + 5) == 2 * CRC_BLOCK_BYTES
    with pytest.raises(CheckpointError, match=rf"{key}: block 0 \(bytes 0-{CRC_BLOCK_BYTES}\)"):
        load(0, 10)
    mgr.close()
