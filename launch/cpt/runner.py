"""Running the experiment: the base first (pre-trained once and cached, or given by ``--base``), then every arm
that has no result yet in its own spawned process, starting from the base, with start/finish lines and a
step-weighted ETA; the report is rewritten afterwards over every finished arm."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from elastic.config import config_from_dict
from elastic.data import build_corpus, phase_plan
from launch.cpt.base import Base, ensure_base
from launch.cpt.report import format_duration, write_report
from launch.cpt.results import RESULT_VERSION, load_result, read_curves, write_json_atomic
from launch.cpt.spec import ArmSpec, Experiment, arm_config, config_digest, require

STATUS_INTERVAL_S = 30.0
"""Seconds between compact progress lines while arms run without a progress bar."""


@dataclass(frozen=True)
class ArmJob:
    """What a worker process needs to train one arm: plain data, so it pickles into a spawned process."""

    name: str
    config: dict
    """The arm's resolved Config as a dict."""
    run_dir: str
    digest: str
    arm: dict
    """The ArmSpec as a dict, stored in result.json."""
    phase_domains: list[str]
    """Every phase's domain, the base's first."""
    base_phase: str
    """Name of the base's phase (the first data phase), which ends at arm step 0."""
    base: dict
    """Where the arm started: {"init": "hf:DIR", "steps": base steps or None for a --base model}."""


def run_arm(job: ArmJob) -> dict:
    """Train one arm (resuming from its newest checkpoint if an earlier attempt left one) and write its
    result.json; runs in a fresh process (see ``run_arms``)."""
    # The trainer stack is imported in the arm's process only: the launcher process never trains (as launch.agent).
    from elastic.bootstrap import join_job
    from elastic.model import count_parameters
    from elastic.trainer import Trainer

    started = time.perf_counter()
    cfg = config_from_dict(job.config)
    logging.basicConfig(level=logging.INFO, format=f"[cpt {job.name}] %(message)s", stream=sys.stderr, force=True)
    run_dir = Path(job.run_dir)
    ctx = join_job(cfg)  # the arm's process has no launcher variables: a world of one
    trainer = Trainer(cfg, ctx.world, ctx.groups, ctx.device, log=ctx.log)
    try:
        trainer.resume(started)
        if trainer.state.step == 0:
            # Step 0 evaluation: the common starting point of every arm (evaluation draws no randomness).
            trainer.jsonl.write(
                "eval", step=0, phase=0, phase_name=trainer.plan.names[0], phase_end=False, losses=trainer.evaluate()
            )
        trainer.run()
    finally:
        trainer.close()
    if trainer.state.step != trainer.total_steps:  # stopped early: no result.json, so a rerun trains it again
        raise RuntimeError(f"arm {job.name} stopped at step {trainer.state.step} of {trainer.total_steps}")
    wall = time.perf_counter() - started
    plan = trainer.plan
    result = {
        "version": RESULT_VERSION,
        "name": job.name,
        "arm": job.arm,
        "digest": job.digest,
        "wall_seconds": wall,
        "threads": cfg.train.threads_per_worker,
        "schedule": asdict(cfg.schedule),
        "parameters": count_parameters(trainer.model),
        "total_steps": trainer.total_steps,
        "base": job.base,
        "phases": {  # the base's phase ends at arm step 0: forgetting and gaps of its domain are measured from there
            "names": [job.base_phase, *plan.names],
            "domains": job.phase_domains,
            "ends": [0, *(plan.end_of(k) for k in range(len(plan.starts)))],
        },
        "curves": read_curves(run_dir / "metrics.jsonl"),
    }
    write_json_atomic(run_dir / "result.json", result)
    return result


def _last_step(metrics_jsonl: Path) -> int:
    """Completed steps of a running arm, from the last step row of its metrics.jsonl (0 if none yet)."""
    if not metrics_jsonl.is_file():
        return 0
    lines = metrics_jsonl.read_text().splitlines()
    for line in reversed(lines):
        if '"kind": "step"' in line:
            try:
                return int(json.loads(line)["step"])
            except json.JSONDecodeError:  # the writer is in the middle of this line
                continue
    return 0


@dataclass
class Progress:
    """Step-weighted ETA over the arms this invocation trains."""

    total_steps: int
    started: float = field(default_factory=time.perf_counter)
    done_steps: int = 0

    def eta(self, running_steps: int) -> str:
        done = self.done_steps + running_steps
        if done <= 0:
            return "unknown"
        elapsed = time.perf_counter() - self.started
        return format_duration(elapsed * (self.total_steps - done) / done)


def _jobs(exp: Experiment, arms: list[ArmSpec], out: Path, threads: int, progress: bool, base: Base) -> list[ArmJob]:
    jobs = []
    for arm in arms:
        run_dir = out / "arms" / arm.name
        cfg = arm_config(exp, arm, run_dir=run_dir, threads=threads, progress=progress)
        jobs.append(
            ArmJob(
                name=arm.name,
                config=cfg.to_dict(),
                run_dir=str(run_dir),
                digest=config_digest(cfg),
                arm=asdict(arm),
                phase_domains=exp.phase_domains,
                base_phase=exp.config.data.phases[0].name,
                base={"init": base.init, "steps": base.info.get("steps")},
            )
        )
    return jobs


def _running_steps(pending: dict) -> dict[str, int]:
    """Completed steps of every submitted, unfinished arm that has started training."""
    counts = {j.name: _last_step(Path(j.run_dir) / "metrics.jsonl") for j in pending.values()}
    return {n: c for n, c in counts.items() if c > 0}


def run_arms(jobs: list[ArmJob], parallel: int, say=print) -> tuple[dict[str, dict], dict[str, str]]:
    """Train the jobs in up to ``parallel`` fresh processes; returns (results, errors) keyed by arm name.

    Prints one line when an arm starts or finishes (with the ETA of the whole batch) and, every
    STATUS_INTERVAL_S, a compact line with the step of every running arm.
    """
    steps_of = {j.name: phase_plan(config_from_dict(j.config)).total_steps for j in jobs}
    progress = Progress(total_steps=sum(steps_of.values()))
    results, errors = {}, {}
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=parallel, mp_context=ctx, max_tasks_per_child=1) as pool:
        pending = {}
        for job in jobs:
            Path(job.run_dir).mkdir(parents=True, exist_ok=True)  # unfinished: resumes from its checkpoints
            pending[pool.submit(run_arm, job)] = job
        started_count = 0
        while started_count < min(parallel, len(jobs)):
            started_count += 1
            say(
                f"[cpt] start {jobs[started_count - 1].name} ({started_count}/{len(jobs)}), "
                f"{steps_of[jobs[started_count - 1].name]} steps"
            )
        while pending:
            finished, _ = cf.wait(pending, timeout=STATUS_INTERVAL_S, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                progress.done_steps += steps_of[job.name]
                exc = fut.exception()
                eta = progress.eta(sum(_running_steps(pending).values()))
                if exc is None:
                    results[job.name] = fut.result()
                    say(
                        f"[cpt] done {job.name} in {format_duration(results[job.name]['wall_seconds'])} "
                        f"({len(results) + len(errors)}/{len(jobs)} finished); ETA {eta}"
                    )
                else:
                    errors[job.name] = f"{type(exc).__name__}: {exc}"
                    say(f"[cpt] FAILED {job.name}: {errors[job.name]}")
                if started_count < len(jobs):
                    started_count += 1
                    nxt = jobs[started_count - 1]
                    say(f"[cpt] start {nxt.name} ({started_count}/{len(jobs)}), {steps_of[nxt.name]} steps")
            if not finished:
                counts = _running_steps(pending)
                status = ", ".join(f"{n} {c}/{steps_of[n]}" for n, c in counts.items())
                say(
                    f"[cpt] {format_duration(time.perf_counter() - progress.started)}: {status or 'starting'}; "
                    f"ETA {progress.eta(sum(counts.values()))}"
                )
    return results, errors


def run_experiment(
    exp: Experiment,
    out: Path,
    arm_names: list[str] | None = None,
    parallel: int | None = None,
    command: str = "ecpt experiment cpt",
    say=print,
) -> int:
    """Pre-train the base unless it is cached or given (``exp.base_init``), train the selected arms that have no
    result yet from it, then write the report over every finished arm.

    Returns 0 when every selected arm finished, 1 when some failed (the report still covers the others).
    """
    started = time.perf_counter()
    arms = exp.spec.select(arm_names)
    parallel = parallel or exp.spec.parallel
    require(parallel >= 1, f"--parallel must be >= 1, got {parallel}")
    out.mkdir(parents=True, exist_ok=True)
    if exp.given_base:
        base = Base(init=exp.base_init, info={})
        say(f"[cpt] base: given by --base, {exp.base_init[len('hf:') :]}; no base is pre-trained")
    else:
        base = ensure_base(exp.config_raw, exp.config, exp.spec.base, exp.phase_domains[0], say=say)
        exp.base_init = base.init
    threads = exp.config.train.threads_per_worker or max(1, (os.cpu_count() or 1) // parallel)
    progress_bar = parallel == 1 and exp.config.train.progress and sys.stderr.isatty()
    jobs = _jobs(exp, arms, out, threads, progress_bar, base)
    todo = []
    for job in jobs:
        if load_result(Path(job.run_dir), job.digest) is not None:
            say(f"[cpt] skip {job.name}: finished earlier ({Path(job.run_dir) / 'result.json'})")
        else:
            todo.append(job)
    errors: dict[str, str] = {}
    if todo:
        # once, before the workers memory-map it (with the arms' tokenizer: a --base model brings its own)
        build_corpus(config_from_dict(todo[0].config), log=lambda msg: say(f"[cpt] {msg}"))
        say(
            f"[cpt] training {len(todo)} arm(s) {[j.name for j in todo]} in {min(parallel, len(todo))} process(es) "
            f"x {threads} thread(s); output {out}"
        )
        _, errors = run_arms(todo, min(parallel, len(todo)), say=say)
    write_report(exp, out, command, time.perf_counter() - started, base, say=say)
    if errors:
        say(f"[cpt] {len(errors)} arm(s) failed: " + "; ".join(f"{n}: {e}" for n, e in errors.items()))
        return 1
    return 0
