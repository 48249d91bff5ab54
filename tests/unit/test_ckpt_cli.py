"""`ecpt ckpt list|verify|inspect|export` through the argparse wiring the ecpt CLI uses."""

from __future__ import annotations

import argparse
import json

from checkpointing import CheckpointManager, LevelSpec
from launch.ckpt_commands import add_ckpt_parser
from support.ckpt_state import make_state


def ckpt(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ecpt")
    add_ckpt_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ckpt", *argv])
    return args.func(args)


def test_list_verify_inspect_export(tmp_path, capsys):
    root = tmp_path / "L1"
    mgr = CheckpointManager([LevelSpec("L1", str(root), 1, 3, node_local=True)], chunk_bytes=256)
    for step in (10, 20):
        mgr.save(step, make_state(0, "replica", step), {"hf_config": {"model_type": "llama"}})
    mgr.wait_durable()
    mgr.close()
    assert ckpt(["list", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].split()[0] == "10" and lines[2].split()[0] == "20"
    assert ckpt(["verify", str(root)]) == 0 and "OK" in capsys.readouterr().out
    assert ckpt(["inspect", str(root / "step-00000010")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 10
    assert ckpt(["export", str(root), "--to", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "config.json").is_file()
    manifest = json.loads((root / "step-00000020" / "manifest.json").read_text())
    chunk = root / "step-00000020" / manifest["tensors"]["counters"]["chunks"]["0"]["file"]
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    capsys.readouterr()
    assert ckpt(["verify", str(root)]) == 1
    assert str(chunk) in capsys.readouterr().out
    assert ckpt(["verify", str(tmp_path / "nothing")]) == 2


def test_a_url_is_refused_instead_of_read_as_a_local_path(tmp_path, monkeypatch, capsys):
    """`ecpt ckpt list s3://ckpt/run` used to look in the local directory s3:/ckpt/run and say it held nothing;
    list and verify now read s3:// (tests/faults/test_s3_level.py), the rest refuse every URL."""
    monkeypatch.chdir(tmp_path)
    for command, url in [("inspect", "s3://ckpt/run"), ("list", "gs://ckpt/run"), ("verify", "file:///ckpt/run")]:
        assert ckpt([command, url]) == 2
        assert f"{url.split(':')[0]}:// URLs are not supported" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
