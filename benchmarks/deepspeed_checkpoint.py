"""DeepSpeed checkpoint benchmark: DeepSpeed's native and decoupled (asynchronous) save_checkpoint against ecpt's
checkpoints, same model, same state, same run; and resuming at another world size: ds_to_universal + load_universal
against ecpt's online reshard.

    .venv/bin/python benchmarks/deepspeed_checkpoint.py                  # ~10 M parameters (~120 MB fp32 state)
    .venv/bin/python benchmarks/deepspeed_checkpoint.py --quick          # ~1 M parameters, a smoke run

Save phase (ZeRO stage --stage, W=2 gloo ranks, one process each): after one real training step,
  native   engine.save_checkpoint with DeepSpeed's torch checkpoint engine (synchronous torch.save, no fsync)
  adapter  engine.save_checkpoint with ecpt's EcptCheckpointEngine (returns once staged; zarr + fsync + manifest
           persist in the background)
  ecpt     the trainer's path: CheckpointManager.save of the per-parameter Shards + wait_staged
  decoupled  DeepSpeed's DecoupledCheckpointEngine, selected by its config (DECOUPLED_JSON) in a second pair of
           ranks that builds the same state (same seed, same step: the fingerprints must match). save_checkpoint
           queues the state dicts to a writer subprocess per rank; DeepSpeed's next engine.step() waits for that
           write before the optimizer changes the (shared-memory) tensors. Here one real forward/backward runs in
           between, so stall = save_checkpoint + the wait at the step, durable = until the last file was written.
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
import re
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


def _forward_backward(engine, cfg) -> None:
    import torch

    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1), generator=g)
    engine.forward_backward(iter([batch] * engine.gas), engine.gas, cfg.train.global_batch)


def _one_step(engine, cfg) -> None:
    _forward_backward(engine, cfg)
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
    mgr = CheckpointManager(
        [LevelSpec(name="L1", root=str(work / "ecpt"), interval=1, keep_last=2, node_local=False)],
        rank=rank,
        world_size=world,
        group=ckpt_group,
    )
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


DECOUPLED_JSON = {"checkpoint": {"writer": {"type": "python", "decoupled": True, "data_parallel": "replica"}}}
"""DeepSpeed's decoupled checkpoint engine as its config selects it. Writer "python" writes with plain file I/O in the
subprocess; "fast" (the default type) needs the AsyncIO C++ op, a libaio build this benchmark does not do. Without a
"data_parallel" unit DeepSpeed 0.19.8 fails (UniversalParallelInfo has no dp_rank). Every unit makes each rank of a
single node a writer, and every writer saves the replicated ZeRO-1/2 model states: with the "python" writer both ranks
write mp_rank_00_model_states.pt at once (only "fast" writers suffix the path), which corrupted it in 3 of 6 runs
here (reading it back: "PytorchStreamReader failed reading zip archive", once a 12 GB allocation that the OOM killer
ended), so only rank 0 saves that file below, as with the torch engine."""


def worker_save_decoupled(args) -> None:
    import pickle

    import torch
    import torch.distributed as dist
    from deepspeed.runtime.checkpoint_engine import DecoupledCheckpointEngine, TorchCheckpointEngine

    # DeepSpeed's writer factory reads the node count and index from the variables its own launcher sets.
    os.environ.setdefault("CROSS_RANK", "0")
    os.environ.setdefault("CROSS_SIZE", "1")
    work = Path(args.work)
    cfg = _config(args.dim, args.layers, args.stage, str(work / "decoupled.json"))
    dist.init_process_group("gloo")
    engine = _engine(cfg)
    if not isinstance(engine.ds.checkpoint_engine, DecoupledCheckpointEngine):
        raise SystemExit(f"DECOUPLED_JSON selected {type(engine.ds.checkpoint_engine).__name__}")
    if args.stage < 3:  # one replicated model-states file: rank 0 alone writes it (see DECOUPLED_JSON)
        engine.ds.save_non_zero_checkpoint = dist.get_rank() == 0
    _one_step(engine, cfg)
    out = {"fingerprint": _fingerprint(engine)}
    stall, durable, blocked = [], [], []
    for i in range(args.saves):
        saved = _fingerprint(engine)
        tag = f"global_step{i + 1}"
        dist.barrier()
        wall, t = time.time(), time.perf_counter()
        # ZeRO-1/2 state dicts hold slices of the fp32 partitions (requires_grad), which torch.multiprocessing
        # refuses to send to the writer process ("non-leaf tensor which requires_grad") unless made without grad.
        with torch.no_grad():
            engine.ds.save_checkpoint(str(work / "decoupled"), tag=tag)
        call = time.perf_counter() - t
        _forward_backward(engine, cfg)  # training goes on while the subprocess writes
        t = time.perf_counter()
        engine.ds._commit_decoupled_checkpoint()  # what engine.ds.step() does first: wait for the write
        blocked.append(time.perf_counter() - t)
        engine.step(1e-3, lambda: None)
        dist.barrier()  # every rank's writer has finished: the files are complete
        stall.append(call + blocked[-1])
        durable.append(max(f.stat().st_mtime for f in (work / "decoupled" / tag).iterdir()) - wall)
    out["decoupled"] = {"stall": stall, "durable": durable, "blocked_at_step": blocked}
    engine.ds.checkpoint_engine.cleanup()
    # Reading back: the decoupled engine's own load is torch.load with torch's weights_only default, which refuses
    # DeepSpeed's pickled objects; the files themselves are torch.save files that the torch engine reads.
    out["decoupled_engine_load"] = "ok"
    for f in sorted((work / "decoupled" / tag).glob("*.pt")):
        try:
            engine.ds.checkpoint_engine.load(str(f), map_location="cpu")
        except pickle.UnpicklingError as exc:
            why = [line for line in str(exc).splitlines() if "WeightsUnpickler error" in line] or [str(exc)[:200]]
            why = why[0].strip().split(". Please use")[0]
            out["decoupled_engine_load"] = f"{f.name}: torch.load(weights_only=True) failed: {why}"
            break
    engine.ds.checkpoint_engine = TorchCheckpointEngine()
    engine.ds.load_checkpoint(str(work / "decoupled"), tag=tag)
    out["reloaded_matches_saved"] = abs(_fingerprint(engine) - saved) <= 1e-9 * max(abs(saved), 1.0)
    if dist.get_rank() == 0:
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
        engine.ds.load_checkpoint(
            str(work / "native"), tag=f"global_step{args.saves}_universal", load_module_strict=False
        )
        out["load_seconds"] = time.perf_counter() - t
    else:
        cfg = _config(args.dim, args.layers, args.stage)
        engine = _engine(cfg)
        mgr = CheckpointManager(
            [LevelSpec(name="L1", root=str(work / "ecpt"), interval=1, keep_last=2, node_local=False)],
            rank=0,
            world_size=1,
        )
        t = time.perf_counter()
        res = mgr.load(engine.checkpoint_tensors())
        engine.after_load(res.step)
        out["load_seconds"] = time.perf_counter() - t
        mgr.close()
    out["fingerprint"] = _fingerprint(engine)
    Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()


def _last_error(output: str) -> str:
    """The last line of a failed rank's output that names an exception, else the first ("rank R ... failed (code)")."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\w+(Error|Exception|Interrupt)\b", line)]
    return errors[-1] if errors else (lines or [""])[0]


def _spawn(world: int, argv: list[str], timeout: float = 900) -> None:
    from elastic.world import free_port

    port, procs = free_port(), []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
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
    ap.add_argument("--worker", choices=("save", "save_decoupled", "resume"), help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "save":
        return worker_save(args)
    if args.worker == "save_decoupled":
        return worker_save_decoupled(args)
    if args.worker == "resume":
        return worker_resume(args)
    dim, layers = (128, 4) if args.quick else (384, 6)
    work = Path(tempfile.mkdtemp(prefix="ecpt-ds-bench-"))
    load_before = os.getloadavg()[0]
    common = [
        "--work",
        str(work),
        "--dim",
        str(dim),
        "--layers",
        str(layers),
        "--stage",
        str(args.stage),
        "--saves",
        str(args.saves),
    ]
    try:
        _spawn(2, ["--worker", "save", "--out", str(work / "save.json"), *common])
        save = json.loads((work / "save.json").read_text())
        (work / "decoupled.json").write_text(json.dumps(DECOUPLED_JSON))
        try:
            _spawn(2, ["--worker", "save_decoupled", "--out", str(work / "decoupled.out.json"), *common])
            decoupled = json.loads((work / "decoupled.out.json").read_text())
            if abs(decoupled["fingerprint"] - save["fingerprint"]) > 1e-9 * max(abs(save["fingerprint"]), 1.0):
                decoupled = {
                    "error": f"not the same state: fingerprint {decoupled['fingerprint']} vs {save['fingerprint']}"
                }
        except SystemExit as exc:  # _spawn's report of a failed rank, with its output
            decoupled = {"error": str(exc)[-1500:]}
        t = time.perf_counter()
        conv = subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(work / "native" / f"global_step{args.saves}"),
                "--output_folder",
                str(work / "native" / f"global_step{args.saves}_universal"),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
                "--inject_missing_state",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
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
    result = {
        "params_approx": params,
        "stage": args.stage,
        "world_save": 2,
        "world_resume": 1,
        "startup_seconds_w2": save["startup_seconds"],
        "save": {
            **{k: save[k] for k in ("native", "adapter", "ecpt")},
            "decoupled": decoupled.get("decoupled", {"error": decoupled.get("error")}),
        },
        "decoupled_config": DECOUPLED_JSON,
        "decoupled_checks": {
            k: decoupled[k] for k in ("decoupled_engine_load", "reloaded_matches_saved") if k in decoupled
        },
        "resume": resume,
        "fingerprint_saved": save["fingerprint"],
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    med = statistics.median
    print(
        f"ZeRO-{args.stage}, ~{params / 1e6:.1f} M parameters, save at W=2, resume at W=1; "
        f"DeepSpeed engine start at W=2: {save['startup_seconds']:.2f} s; load average "
        f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'save method':<34}{'stall s (median)':>18}{'durable s (median)':>20}{'first save stall s':>20}")
    for key, label in (
        ("native", "DeepSpeed save_checkpoint (torch)"),
        ("decoupled", "DeepSpeed decoupled engine"),
        ("adapter", "save_checkpoint via ecpt adapter"),
        ("ecpt", "ecpt trainer Shards"),
    ):
        s = result["save"][key]
        if "error" in s:
            print(f"{label:<34} FAILED: {_last_error(s['error'] or '')}")
        else:
            print(f"{label:<34}{med(s['stall']):>18.3f}{med(s['durable']):>20.3f}{s['stall'][0]:>20.3f}")
    print(
        f"decoupled engine: DeepSpeed config {json.dumps(DECOUPLED_JSON)}, save_checkpoint under torch.no_grad(), "
        f"CROSS_RANK/CROSS_SIZE set (see DECOUPLED_JSON in this file)"
    )
    checks = result["decoupled_checks"]
    if checks:
        print(
            f"decoupled checkpoint reloaded (torch engine) equals the saved state: "
            f"{checks['reloaded_matches_saved']}; load through the decoupled engine itself: "
            f"{checks['decoupled_engine_load']}"
        )
    base = med(save["native"]["stall"])
    print(f"stall ratio native/ecpt: {base / max(med(save['ecpt']['stall']), 1e-9):.1f}x")
    for method, r in resume.items():
        if "error" in r:
            print(f"resume {method}: FAILED: {r['error'].splitlines()[-1] if r['error'] else ''}")
        else:
            conv_s = r.get("convert_seconds", 0.0)
            ok = abs(r["fingerprint"] - save["fingerprint"]) <= 1e-6 * max(abs(save["fingerprint"]), 1.0)
            print(
                f"resume {method}: convert {conv_s:.2f} s + load {r['load_seconds']:.2f} s = "
                f"{conv_s + r['load_seconds']:.2f} s; state matches saved: {ok}"
            )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
