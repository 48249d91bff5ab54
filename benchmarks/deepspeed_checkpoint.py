"""DeepSpeed checkpoint benchmark: DeepSpeed's native save_checkpoint against ecpt's checkpoints, same engine, same
state, same run; and resuming at another world size: ds_to_universal + load_universal against ecpt's online reshard.

    .venv/bin/python benchmarks/deepspeed_checkpoint.py                  # ~10 M parameters (~120 MB fp32 state)
    .venv/bin/python benchmarks/deepspeed_checkpoint.py --quick          # ~1 M parameters, a smoke run

Save phase (ZeRO stage --stage, W=2 gloo ranks, one process each): after one real training step,
  native   engine.save_checkpoint with DeepSpeed's torch checkpoint engine (synchronous torch.save, no fsync)
  adapter  engine.save_checkpoint with ecpt's EcptCheckpointEngine (returns once staged; zarr + fsync + manifest
           persist in the background)
  ecpt     the trainer's path: CheckpointManager.save of the per-parameter Shards + wait_staged
stall = time the training loop is blocked by the call, durable = until the data is committed (native: the call).
Resume phase (W=1, same stage):
  native   ds_to_universal (offline conversion) + load_checkpoint with load_universal
  ecpt     CheckpointManager.load into the W=1 engine's tensors (reshard while reading)
Results: a table on stdout and benchmarks/results/deepspeed_checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)  # benchmarks/elastic.py would shadow the elastic package


def _config(dim: int, layers: int, stage: int, extra_json: str = ""):
    from elastic.config import Config, PhaseConfig

    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len = dim, layers, 4, 64
    cfg.data.phases = [PhaseConfig(name="p", tokens=1, mixture={"prose": 1.0})]
    cfg.train.global_batch, cfg.train.micro_batch, cfg.train.engine = 4, 2, "deepspeed"
    cfg.deepspeed.zero_stage, cfg.deepspeed.config_json = stage, extra_json
    cfg.launch.nproc_per_node = 2
    return cfg.validate()


def _engine(cfg):
    import torch

    from elastic.engines.deepspeed_engine import DeepSpeedEngine
    from elastic.model import LlamaLM
    from elastic.trainer import build_optimizer
    from elastic.world import detect_world

    torch.manual_seed(0)
    model = LlamaLM(cfg.model)
    return DeepSpeedEngine(cfg, detect_world(), model, build_optimizer(model, cfg), torch.device("cpu"))


def _one_step(engine, cfg) -> None:
    import torch

    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1), generator=g)
    engine.forward_backward(iter([batch] * engine.gas), engine.gas, cfg.train.global_batch)
    engine.step(1e-3, lambda: None)


def _fingerprint(engine) -> float:
    """Sum of all fp32 master elements over ranks: equal before save and after any resharded load."""
    import torch
    import torch.distributed as dist

    from checkpointing import Shard

    total = 0.0
    for name, value in engine.checkpoint_tensors().items():
        if name.startswith("model/"):
            local = value.local if isinstance(value, Shard) else value
            total += float(local.double().sum()) if isinstance(value, Shard) or dist.get_rank() == 0 else 0.0
    t = torch.tensor([total], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def worker_save(args) -> None:
    import torch.distributed as dist

    from checkpointing import CheckpointManager, LevelSpec
    from elastic.engines.ds_checkpoint_engine import EcptCheckpointEngine

    cfg = _config(args.dim, args.layers, args.stage)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt_group = dist.new_group(backend="gloo")
    t0 = time.perf_counter()
    engine = _engine(cfg)
    startup = time.perf_counter() - t0
    _one_step(engine, cfg)
    out, work = {"startup_seconds": startup, "fingerprint": _fingerprint(engine)}, Path(args.work)
    native = []
    for i in range(args.saves):
        dist.barrier()
        t = time.perf_counter()
        engine.ds.save_checkpoint(str(work / "native"), tag=f"global_step{i + 1}")
        native.append(time.perf_counter() - t)
    out["native"] = {"stall": native, "durable": native}
    native_engine = engine.ds.checkpoint_engine
    engine.ds.checkpoint_engine = EcptCheckpointEngine(work / "adapter", rank, world, ckpt_group, keep_last=2)
    stall, durable = [], []
    for i in range(args.saves):
        dist.barrier()
        t = time.perf_counter()
        engine.ds.save_checkpoint(str(work / "adapter_ds"), tag=f"global_step{i + 1}")
        stall.append(time.perf_counter() - t)
        engine.ds.checkpoint_engine.wait()
        durable.append(time.perf_counter() - t)
    out["adapter"] = {"stall": stall, "durable": durable}
    engine.ds.checkpoint_engine.cleanup()
    engine.ds.checkpoint_engine = native_engine
    mgr = CheckpointManager([LevelSpec(name="L1", root=str(work / "ecpt"), interval=1, keep_last=2, node_local=False)],
                            rank=rank, world_size=world, group=ckpt_group)
    tensors, stall, durable = engine.checkpoint_tensors(), [], []
    for i in range(args.saves):
        dist.barrier()
        t = time.perf_counter()
        handle = mgr.save(i + 1, tensors, {"step": i + 1})
        mgr.wait_staged()
        stall.append(time.perf_counter() - t)
        handle.durable.result()
        durable.append(time.perf_counter() - t)
    mgr.wait_durable()
    mgr.close()
    out["ecpt"] = {"stall": stall, "durable": durable}
    if rank == 0:
        Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()


def worker_resume(args) -> None:
    import torch.distributed as dist

    from checkpointing import CheckpointManager, LevelSpec

    work = Path(args.work)
    out = {}
    if args.method == "native":
        extra = work / "universal.json"
        extra.write_text(json.dumps({"checkpoint": {"load_universal": True}}))
        cfg = _config(args.dim, args.layers, args.stage, str(extra))
        engine = _engine(cfg)
        t = time.perf_counter()
        engine.ds.load_checkpoint(str(work / "native"), tag=f"global_step{args.saves}_universal",
                                  load_module_strict=False)
        out["load_seconds"] = time.perf_counter() - t
    else:
        cfg = _config(args.dim, args.layers, args.stage)
        engine = _engine(cfg)
        mgr = CheckpointManager([LevelSpec(name="L1", root=str(work / "ecpt"), interval=1, keep_last=2,
                                           node_local=False)], rank=0, world_size=1)
        t = time.perf_counter()
        res = mgr.load(engine.checkpoint_tensors())
        engine.after_load(res.step)
        out["load_seconds"] = time.perf_counter() - t
        mgr.close()
    out["fingerprint"] = _fingerprint(engine)
    Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()


def _spawn(world: int, argv: list[str], timeout: float = 900) -> None:
    from elastic.world import free_port

    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for rank, p in enumerate(procs):
        out, _ = p.communicate(timeout=timeout)
        if p.returncode:
            raise SystemExit(f"rank {rank} of {argv[0]} failed ({p.returncode}):\n{out[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1 M parameters instead of ~10 M")
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "deepspeed_checkpoint.json"))
    ap.add_argument("--worker", choices=("save", "resume"), help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "save":
        return worker_save(args)
    if args.worker == "resume":
        return worker_resume(args)
    dim, layers = (128, 4) if args.quick else (384, 6)
    work = Path(tempfile.mkdtemp(prefix="ecpt-ds-bench-"))
    common = ["--work", str(work), "--dim", str(dim), "--layers", str(layers), "--stage", str(args.stage),
              "--saves", str(args.saves)]
    try:
        _spawn(2, ["--worker", "save", "--out", str(work / "save.json"), *common])
        save = json.loads((work / "save.json").read_text())
        t = time.perf_counter()
        conv = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(work / "native" / f"global_step{args.saves}"), "--output_folder",
                               str(work / "native" / f"global_step{args.saves}_universal"),
                               "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        convert_seconds = time.perf_counter() - t
        resume = {}
        for method in ("native", "ecpt"):
            if method == "native" and conv.returncode:
                resume[method] = {"error": "ds_to_universal failed: " + conv.stdout[-800:] + conv.stderr[-800:]}
                continue
            try:
                _spawn(1, ["--worker", "resume", "--method", method, "--out", str(work / f"{method}.json"), *common])
                resume[method] = json.loads((work / f"{method}.json").read_text())
            except SystemExit as exc:
                resume[method] = {"error": str(exc)[-1500:]}
        if "load_seconds" in resume.get("native", {}):
            resume["native"]["convert_seconds"] = convert_seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)
    params = sum(12 * dim * dim for _ in range(layers)) + 256 * dim
    result = {"params_approx": params, "stage": args.stage, "world_save": 2, "world_resume": 1,
              "startup_seconds_w2": save["startup_seconds"], "save": {k: save[k] for k in ("native", "adapter",
                                                                                              "ecpt")},
              "resume": resume, "fingerprint_saved": save["fingerprint"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    med = statistics.median
    print(f"ZeRO-{args.stage}, ~{params / 1e6:.1f} M parameters, save at W=2, resume at W=1; "
          f"DeepSpeed engine start at W=2: {save['startup_seconds']:.2f} s")
    print(f"{'save method':<34}{'stall s (median)':>18}{'durable s (median)':>20}")
    for key, label in (("native", "DeepSpeed save_checkpoint (torch)"), ("adapter", "save_checkpoint via ecpt adapter"),
                       ("ecpt", "ecpt trainer Shards")):
        s = save[key]
        print(f"{label:<34}{med(s['stall']):>18.3f}{med(s['durable']):>20.3f}")
    base = med(save["native"]["stall"])
    print(f"stall ratio native/ecpt: {base / max(med(save['ecpt']['stall']), 1e-9):.1f}x")
    for method, r in resume.items():
        if "error" in r:
            print(f"resume {method}: FAILED: {r['error'].splitlines()[-1] if r['error'] else ''}")
        else:
            conv_s = r.get("convert_seconds", 0.0)
            ok = abs(r["fingerprint"] - save["fingerprint"]) <= 1e-6 * max(abs(save["fingerprint"]), 1.0)
            print(f"resume {method}: convert {conv_s:.2f} s + load {r['load_seconds']:.2f} s = "
                  f"{conv_s + r['load_seconds']:.2f} s; state matches saved: {ok}")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
