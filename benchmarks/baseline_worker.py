"""The peer for benchmarks/elastic.py: a plain torchrun DDP worker with torch.save checkpoints every K steps.

What a careful user of torchrun + torch.save would write: same model, data and global batch as ecpt (reusing
elastic's model and corpus so the work per step is identical), rank 0 saves model + optimizer with torch.save
every ``--ckpt-every`` steps (write to a temp file, then rename), and every (re)started worker loads the newest
file with ``torch.load(weights_only=True)``. It logs the same JSONL step rows as ecpt so one analysis serves both.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from elastic.batch import rank_batch
from elastic.config import config_from_json
from elastic.data import Corpus
from elastic.model import LlamaLM
from elastic.trainer import build_optimizer
from elastic.schedule import lr_at


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--ckpt-every", type=int, default=20)
    args = parser.parse_args()
    cfg = config_from_json(args.config_json)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run = Path(cfg.train.run_dir)
    (run / "ranks").mkdir(parents=True, exist_ok=True)
    (run / "ranks" / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "pid": os.getpid()}))
    corpus = Corpus(cfg)
    torch.manual_seed(cfg.train.seed)
    model = LlamaLM(cfg.model)
    opt = build_optimizer(model, cfg)
    ckpt = run / "baseline.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["step"]
    ddp = DistributedDataParallel(model)
    log = open(run / "metrics.jsonl", "a", buffering=1) if rank == 0 else None
    if log:
        log.write(json.dumps({"kind": "resume", "time": time.time(), "step": start, "world_size": world}) + "\n")
    g = cfg.train.global_batch
    total = min(corpus.plan.total_steps, cfg.train.max_steps or corpus.plan.total_steps)
    for step in range(start, total):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        share = rank_batch(step, g, cfg.train.micro_batch, rank, world)
        for i, (first, size) in enumerate(share.micro_batches):
            tokens = torch.from_numpy(corpus.batch(first, size)[0])
            logits = ddp(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            # DDP averages over ranks; weight by this rank's share so the mean is over the global batch
            (loss * size * world / g).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.schedule, corpus.plan.starts, corpus.plan.total_steps)
        opt.step()
        if rank == 0 and (step + 1) % args.ckpt_every == 0:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step + 1}, tmp)
            os.replace(tmp, ckpt)
        if log:
            log.write(
                json.dumps(
                    {
                        "kind": "step",
                        "time": time.time(),
                        "step": step + 1,
                        "world_size": world,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                + "\n"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
