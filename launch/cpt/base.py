"""Pre-training the CPT experiment's base once and caching it: ``<data.cache_dir>/cpt-base-<digest>/``, a directory
written by the same export as ``ecpt ckpt export`` (config.json + model.safetensors), so every arm starts from it
with ``model.init = "hf:<dir>"``, plus ``base.json`` (why and where it stopped, its validation curve, wall time).

The digest (``base_spec.base_digest``) covers everything that decides the weights, so every arm and every rerun of
the same experiment reuses one base, and a changed config gets a new one. A file lock lets one builder train while
concurrent invocations wait. The base trains in ``<name>.build/`` (checkpoints and metrics.jsonl, so an interrupted
build resumes) and is published by renaming a finished temporary directory: a killed build never looks complete.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from elastic.config import Config, config_from_dict
from elastic.corpus_build import build_corpus, cache_key, data_tokenizer
from elastic.data import phase_plan
from launch.cpt.base_spec import BaseSpec, base_config, base_digest, flattened
from launch.cpt.results import read_curves, write_json_atomic

BASE_INFO = "base.json"
"""Written last inside the published directory: the base's stop step, reason, curve and wall time."""


@dataclass(frozen=True)
class BaseJob:
    """What the base's training process needs: plain data, so it pickles into a spawned process."""

    config: dict
    """The base run's resolved Config as a dict (run_dir = the build directory)."""
    rule: dict
    """The BaseSpec as a dict."""
    domain: str
    """The first phase's own domain, whose validation loss decides when to stop."""


def _evals_through(metrics_jsonl: Path, step: int) -> list[dict]:
    """Evaluations an interrupted build logged up to its restored step (the rule needs the whole curve)."""
    if not metrics_jsonl.is_file():
        return []
    curves = read_curves(metrics_jsonl)
    return [
        {"step": s, "losses": {d: v[i] for d, v in curves["losses"].items()}}
        for i, s in enumerate(curves["eval_steps"])
        if s <= step
    ]


def train_base(job: BaseJob) -> dict:
    """Train the base until the rule says its loss flattened (or the cap), make the last step durable, and return
    {"steps", "stopped", "cap"}; runs in a fresh process (see ``build_base``)."""
    from elastic.bootstrap import join_job
    from elastic.trainer import Trainer

    cfg = config_from_dict(job.config)
    rule = BaseSpec(**job.rule)
    logging.basicConfig(level=logging.INFO, format="[cpt base] %(message)s", stream=sys.stderr, force=True)
    ctx = join_job(cfg)
    trainer = Trainer(cfg, ctx.world, ctx.groups, ctx.device, log=ctx.log)
    cap = trainer.total_steps
    try:
        trainer.resume(time.perf_counter())
        metrics_jsonl = Path(cfg.train.run_dir) / "metrics.jsonl"
        losses = [e["losses"][job.domain] for e in _evals_through(metrics_jsonl, trainer.state.step)]
        if flattened(losses, rule.patience, rule.min_improvement):  # killed after it stopped, before it was published
            trainer.total_steps = trainer.state.step

        def stop_after_eval(step: int, evaluated: dict[str, float]) -> bool:
            losses.append(evaluated[job.domain])
            stop = flattened(losses, rule.patience, rule.min_improvement)
            ctx.log.info(
                f"{job.domain} validation loss {losses[-1]:.4f} at step {step} (best {min(losses):.4f})"
                + ("; flattened, stopping" if stop else "")
            )
            return stop

        trainer.stop_after_eval = stop_after_eval
        trainer.run()
        step = trainer.state.step
        trainer.checkpoints.emergency_save(step)  # the last step, durable, whatever the checkpoint interval
    finally:
        trainer.close()
    if trainer.stop_signal is not None:
        raise RuntimeError(f"the base's training was stopped by signal {trainer.stop_signal} at step {step}")
    return {"steps": step, "stopped": "flattened" if step < cap else "cap", "cap": cap}


@dataclass(frozen=True)
class Base:
    """The base the arms start from."""

    init: str
    """``hf:<dir>``: the arms' model.init."""
    info: dict
    """base.json (empty for a ``--base`` model, which ecpt did not train)."""


def base_dir(exp_config_raw: dict, config: Config, spec: BaseSpec) -> tuple[Path, Config]:
    """Where the base of this experiment is (or will be) cached, and the base run's config."""
    cfg = base_config(exp_config_raw, spec)
    digest = base_digest(cfg, spec, cache_key(cfg, data_tokenizer(cfg)))
    return Path(os.path.expanduser(config.data.cache_dir)) / f"cpt-base-{digest}", cfg


def load_base(path: Path) -> Base | None:
    """The published base at ``path``, or None if it has not been published (a partial build never is)."""
    info = path / BASE_INFO
    return Base(init=f"hf:{path.resolve()}", info=json.loads(info.read_text())) if info.is_file() else None


def ensure_base(exp_config_raw: dict, config: Config, spec: BaseSpec, domain: str, say=print) -> Base:
    """The cached base of this experiment, pre-training it first if no complete one exists."""
    path, cfg = base_dir(exp_config_raw, config, spec)
    found = load_base(path)
    if found is not None:
        say(f"[cpt] base: reusing {path} (step {found.info['steps']}, {found.info['stopped']})")
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent invocation waits here, then finds the published base
        found = load_base(path)
        if found is None:
            found = _build(path, cfg, spec, domain, say)
    return found


def _build(path: Path, cfg: Config, spec: BaseSpec, domain: str, say) -> Base:
    from launch.ckpt_commands import export_checkpoint

    started = time.perf_counter()
    build = path.parent / f"{path.name}.build"
    threads = spec.threads or os.cpu_count() or 1
    raw = cfg.to_dict()
    raw["train"].update(run_dir=str(build), threads_per_worker=threads, progress=False)
    raw["checkpoint"].update(dir="checkpoints", resume=True)
    run_cfg = config_from_dict(raw)
    build_corpus(run_cfg, log=lambda msg: say(f"[cpt] {msg}"))
    cap = phase_plan(run_cfg).total_steps
    say(
        f"[cpt] base: pre-training on {domain} until its validation loss flattens (best of the last "
        f"{spec.patience} evaluations, every {spec.eval_interval} steps, improves by <= {spec.min_improvement:.1%}), "
        f"at most {cap} steps, {threads} thread(s); building in {build}"
    )
    job = BaseJob(config=run_cfg.to_dict(), rule=asdict(spec), domain=domain)
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        outcome = pool.submit(train_base, job).result()
    from checkpointing import list_checkpoints

    newest = list_checkpoints(build / "checkpoints")[-1]
    if newest.step != outcome["steps"]:
        raise RuntimeError(f"the base stopped at step {outcome['steps']} but its newest checkpoint is {newest.step}")
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    export_checkpoint(Path(newest.path), tmp)
    shutil.copyfile(build / "metrics.jsonl", tmp / "metrics.jsonl")
    curves = read_curves(build / "metrics.jsonl")
    info = {
        **outcome,
        "domain": domain,
        "rule": asdict(spec),
        "wall_seconds": time.perf_counter() - started,
        "threads": threads,
        "final_losses": {d: v[-1] for d, v in curves["losses"].items()},
        "curves": curves,
    }
    write_json_atomic(tmp / BASE_INFO, info)
    for file in tmp.iterdir():  # durable before it becomes visible
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    shutil.rmtree(build, ignore_errors=True)
    say(
        f"[cpt] base: {outcome['stopped']} at step {outcome['steps']} in {info['wall_seconds']:.0f} s; "
        f"{domain} validation loss {info['final_losses'][domain]:.3f}; published {path}"
    )
    return Base(init=f"hf:{path.resolve()}", info=info)
