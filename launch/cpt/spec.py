"""The continual pre-training (CPT) experiment: which LR schedule, with or without replay, when the data shifts.

Every arm trains the same model from the same initialisation (``train.seed``) through the same data phases of one
base config; an arm only overrides ``schedule.*`` and rewrites the phase mixtures (its replay fraction). Each arm runs
in its own process (``--parallel N`` of them at once, single-threaded by default so results do not depend on N),
writes ``<out>/arms/<arm>/metrics.jsonl`` through the normal trainer, and marks itself finished with
``<out>/arms/<arm>/result.json`` (curves, LR, wall time, config digest). The report (``results.md``, ``results.json``,
``curves.png``) is recomputed from those files on every invocation, so a rerun skips finished arms and rebuilds the
table. An unfinished arm resumes from its newest checkpoint (``[checkpoint]`` of the experiment file, written under
the arm's directory); the curves keep the last row of every step, so a replayed step replaces the lost one.

The experiment file is a normal training config plus an ``[experiment]`` table::

    [experiment]
    parallel = 2                 # arms trained at once (processes)
    out = "runs/cpt-experiment"  # default output directory
    [[experiment.arms]]
    name = "cosine"
    description = "repeated cosine, re-warmed at every phase"
    replay = 0.0                 # fraction of every later phase spent on the earlier phases' domains
    schedule = { kind = "cosine", warmup_steps = 3 }

The metrics are defined in ``launch.cpt.metrics``.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from elastic.config import CONFIG_DIR, Config, ConfigError, ScheduleConfig, apply_overrides, config_from_dict
from launch.cpt.metrics import CptMetrics, LossCurves, StabilityGap, cpt_metrics
from elastic.data import build_corpus, phase_plan
from elastic.metrics import read_jsonl

CPT_CONFIG = CONFIG_DIR / "cpt-experiment.toml"
RESULT_VERSION = 1
"""Bump when result.json's layout changes, so older results are rerun instead of misread."""
STATUS_INTERVAL_S = 30.0
"""Seconds between compact progress lines while arms run without a progress bar."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------------------------
# The experiment definition.


@dataclass(frozen=True)
class ArmSpec:
    """One arm: schedule overrides and a replay fraction applied on top of the base config."""

    name: str
    """Directory name and table label; letters, digits, '-', '_' and '.' only."""
    description: str = ""
    """One line for the table and the plot title."""
    replay: float = 0.0
    """Fraction of every phase after the first spent on the earlier phases' domains, split evenly among them;
    0 trains each phase on its own domain only."""
    schedule: dict = field(default_factory=dict)
    """Overrides of the base ``[schedule]`` table (kind, lr_max, warmup_steps, ...)."""

    def validate(self, where: str) -> None:
        _require(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name),
                 f"{where}.name must be non-empty and use only letters, digits, '-', '_', '.'; got {self.name!r}")
        _require(0.0 <= self.replay < 1.0, f"{where}.replay must be in [0, 1), got {self.replay}")
        known = {f for f in ScheduleConfig.__dataclass_fields__}
        unknown = sorted(set(self.schedule) - known)
        _require(not unknown, f"{where}.schedule has unknown key(s) {unknown}; valid keys: {sorted(known)}")


@dataclass
class ExperimentSpec:
    """The ``[experiment]`` table: arms and how to run them."""

    arms: list[ArmSpec]
    parallel: int = 2
    """Arms trained at once, each in its own process."""
    out: str = "runs/cpt-experiment"
    """Output directory (``--out`` overrides it)."""

    def validate(self) -> None:
        _require(bool(self.arms), "experiment.arms must list at least one arm ([[experiment.arms]] in TOML)")
        for i, arm in enumerate(self.arms):
            arm.validate(f"experiment.arms[{i}]")
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _require(not dupes, f"experiment.arms names must be unique; repeated: {dupes}")
        _require(self.parallel >= 1, f"experiment.parallel must be >= 1, got {self.parallel}")

    def select(self, names: list[str] | None) -> list[ArmSpec]:
        """The arms named (in config order), or all of them; an unknown name is an error that lists the valid ones."""
        if not names:
            return list(self.arms)
        known = [a.name for a in self.arms]
        unknown = [n for n in names if n not in known]
        _require(not unknown, f"--arms names unknown arm(s) {unknown}; arms in this config: {known}")
        return [a for a in self.arms if a.name in names]


def _parse_arm(raw: object, where: str) -> ArmSpec:
    _require(isinstance(raw, dict), f"{where} must be a table")
    allowed = {"name", "description", "replay", "schedule"}
    unknown = sorted(set(raw) - allowed)
    _require(not unknown, f"{where} has unknown key(s) {unknown}; valid keys: {sorted(allowed)}")
    replay = raw.get("replay", 0.0)
    _require(isinstance(replay, (int, float)) and not isinstance(replay, bool),
             f"{where}.replay must be a number, got {replay!r}")
    schedule = raw.get("schedule", {})
    _require(isinstance(schedule, dict), f"{where}.schedule must be a table of [schedule] overrides")
    return ArmSpec(name=str(raw.get("name", "")), description=str(raw.get("description", "")),
                   replay=float(replay), schedule=dict(schedule))


def parse_experiment(raw: object) -> ExperimentSpec:
    """The ``[experiment]`` table -> a validated ExperimentSpec; errors name the TOML field."""
    _require(isinstance(raw, dict), "the config needs an [experiment] table with [[experiment.arms]]")
    allowed = {"arms", "parallel", "out"}
    unknown = sorted(set(raw) - allowed)
    _require(not unknown, f"unknown key(s) {['experiment.' + k for k in unknown]}; valid keys: {sorted(allowed)}")
    arms_raw = raw.get("arms", [])
    _require(isinstance(arms_raw, list), "experiment.arms must be an array of tables ([[experiment.arms]])")
    parallel, out = raw.get("parallel", 2), raw.get("out", "runs/cpt-experiment")
    _require(isinstance(parallel, int) and not isinstance(parallel, bool),
             f"experiment.parallel must be an integer, got {parallel!r}")
    _require(isinstance(out, str) and bool(out), f"experiment.out must be a non-empty path, got {out!r}")
    spec = ExperimentSpec(arms=[_parse_arm(a, f"experiment.arms[{i}]") for i, a in enumerate(arms_raw)],
                          parallel=parallel, out=out)
    spec.validate()
    return spec


@dataclass
class Experiment:
    """A loaded experiment file: the base training config (raw and validated) and the arms."""

    path: Path
    base_raw: dict
    base: Config
    spec: ExperimentSpec
    phase_domains: list[str]
    """The domain each phase trains on (its largest mixture weight in the base config)."""


def phase_domains(cfg: Config) -> list[str]:
    """Each phase's own domain: the one with the largest weight in the base mixture (a tie is an error)."""
    out = []
    for i, phase in enumerate(cfg.data.phases):
        top = max(phase.mixture.values())
        leaders = [d for d, w in phase.mixture.items() if w == top]
        _require(len(leaders) == 1, f"data.phases[{i}].mixture has no single largest domain ({leaders}); the CPT "
                                    f"experiment needs one own domain per phase")
        out.append(leaders[0])
    return out


def replay_mixtures(domains: list[str], replay: float) -> list[dict[str, float]]:
    """Phase k trains on domains[k] with weight 1 - replay and on each earlier phase's domain with replay / k.

    A domain that is both a phase's own domain and an earlier one (a phase repeated later) accumulates its weights.
    """
    mixtures = []
    for k, own in enumerate(domains):
        earlier = domains[:k]
        if not earlier or replay == 0:
            mixtures.append({own: 1.0})
            continue
        mix = {own: 1.0 - replay}
        for d in earlier:
            mix[d] = mix.get(d, 0.0) + replay / len(earlier)
        mixtures.append(mix)
    return mixtures


def arm_raw(exp: Experiment, arm: ArmSpec) -> dict:
    """The base config's raw TOML dict with the arm's schedule overrides and replay mixtures applied."""
    raw = copy.deepcopy(exp.base_raw)
    raw.setdefault("schedule", {}).update(arm.schedule)
    for phase, mixture in zip(raw["data"]["phases"], replay_mixtures(exp.phase_domains, arm.replay)):
        phase["mixture"] = mixture
    return raw


def arm_config(exp: Experiment, arm: ArmSpec, run_dir: Path | None = None, threads: int | None = None,
               progress: bool | None = None) -> Config:
    """A validated Config for one arm; errors name the arm as well as the field."""
    raw = arm_raw(exp, arm)
    train = raw.setdefault("train", {})
    if run_dir is not None:
        train["run_dir"] = str(run_dir)
    if threads is not None:
        train["threads_per_worker"] = threads
    if progress is not None:
        train["progress"] = progress
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"experiment arm {arm.name!r}: {exc}") from exc


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> Experiment:
    """Read an experiment file, apply ``--set`` overrides (to the base config or to ``experiment.*``) and validate
    the base config, the arms and every arm's resulting config before anything trains."""
    path = Path(path) if path else CPT_CONFIG
    _require(path.is_file(), f"experiment config {path} does not exist; pass --config with an existing TOML file "
                             f"(the default is {CPT_CONFIG})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"experiment config {path} is not valid TOML: {exc}") from exc
    raw = apply_overrides(raw, overrides or [])
    spec = parse_experiment(raw.pop("experiment", None))
    base = config_from_dict(copy.deepcopy(raw))
    _require(base.train.max_steps == 0, f"train.max_steps must be 0 in a CPT experiment (every arm runs all its "
                                        f"phases, or forgetting cannot be measured), got {base.train.max_steps}")
    exp = Experiment(path=path, base_raw=raw, base=base, spec=spec, phase_domains=phase_domains(base))
    for arm in spec.arms:
        arm_config(exp, arm)
    return exp


def config_digest(cfg: Config) -> str:
    """Hash of everything that can change an arm's numbers (not where it writes, nor whether it shows a bar)."""
    d = cfg.to_dict()
    for key in ("run_dir", "progress", "threads_per_worker"):  # threads only change float summation order
        d["train"].pop(key)
    d["data"].pop("cache_dir")
    for section in ("metrics", "launch", "checkpoint"):
        d.pop(section)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Running one arm (inside its own process).


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


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _last_per_step(rows: list[dict]) -> list[dict]:
    """After a resume, steps after the checkpoint are logged again: the later row is the surviving trajectory."""
    return list({r["step"]: r for r in rows}.values())


def read_curves(metrics_jsonl: Path) -> dict:
    """Evaluation and step rows of a trainer's metrics.jsonl as lists (eval steps, losses per domain, lr, loss)."""
    evals = sorted(_last_per_step(read_jsonl(metrics_jsonl, "eval")), key=lambda r: r["step"])
    steps = sorted(_last_per_step(read_jsonl(metrics_jsonl, "step")), key=lambda r: r["step"])
    domains = list(evals[0]["losses"]) if evals else []
    return {"eval_steps": [r["step"] for r in evals],
            "losses": {d: [r["losses"][d] for r in evals] for d in domains},
            "steps": [r["step"] for r in steps], "lr": [r["lr"] for r in steps],
            "train_loss": [r["loss"] for r in steps]}


def run_arm(job: ArmJob) -> dict:
    """Train one arm (resuming from its newest checkpoint if an earlier attempt left one) and write its
    result.json; runs in a fresh process (see ``run_arms``)."""
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
            trainer.jsonl.write("eval", step=0, phase=0, phase_name=trainer.plan.names[0], phase_end=False,
                                losses=trainer.evaluate())
        trainer.run()
    finally:
        trainer.close()
    if trainer.state.step != trainer.total_steps:  # stopped early: no result.json, so a rerun trains it again
        raise RuntimeError(f"arm {job.name} stopped at step {trainer.state.step} of {trainer.total_steps}")
    wall = time.perf_counter() - started
    plan = trainer.plan
    result = {"version": RESULT_VERSION, "name": job.name, "arm": job.arm, "digest": job.digest,
              "wall_seconds": wall, "threads": cfg.train.threads_per_worker, "schedule": asdict(cfg.schedule),
              "parameters": count_parameters(trainer.model), "total_steps": trainer.total_steps,
              "phases": {"names": list(plan.names), "domains": job.phase_domains,
                         "ends": [plan.end_of(k) for k in range(len(plan.starts))]},
              "curves": read_curves(run_dir / "metrics.jsonl")}
    _write_json_atomic(run_dir / "result.json", result)
    return result


# --------------------------------------------------------------------------------------------------------------
# Running all arms: skip finished ones, start the rest in processes, report progress.


def load_result(run_dir: Path, digest: str) -> dict | None:
    """The finished result of an arm, or None if it has not finished; an arm finished under another config is an
    error, because mixing it into the table would compare different experiments."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("version") != RESULT_VERSION:
        return None
    if result.get("digest") != digest:
        raise ConfigError(f"{path} was produced by a different config (digest {result.get('digest')} != {digest}); "
                          f"use another --out, or delete {run_dir} to rerun that arm")
    return result


def _fmt_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


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
        return _fmt_duration(elapsed * (self.total_steps - done) / done)


def _jobs(exp: Experiment, arms: list[ArmSpec], out: Path, threads: int, progress: bool) -> list[ArmJob]:
    jobs = []
    for arm in arms:
        run_dir = out / "arms" / arm.name
        cfg = arm_config(exp, arm, run_dir=run_dir, threads=threads, progress=progress)
        jobs.append(ArmJob(name=arm.name, config=cfg.to_dict(), run_dir=str(run_dir), digest=config_digest(cfg),
                           arm=asdict(arm), phase_domains=exp.phase_domains))
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
            say(f"[cpt] start {jobs[started_count - 1].name} ({started_count}/{len(jobs)}), "
                f"{steps_of[jobs[started_count - 1].name]} steps")
        while pending:
            finished, _ = cf.wait(pending, timeout=STATUS_INTERVAL_S, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                progress.done_steps += steps_of[job.name]
                exc = fut.exception()
                eta = progress.eta(sum(_running_steps(pending).values()))
                if exc is None:
                    results[job.name] = fut.result()
                    say(f"[cpt] done {job.name} in {_fmt_duration(results[job.name]['wall_seconds'])} "
                        f"({len(results) + len(errors)}/{len(jobs)} finished); ETA {eta}")
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
                say(f"[cpt] {_fmt_duration(time.perf_counter() - progress.started)}: {status or 'starting'}; "
                    f"ETA {progress.eta(sum(counts.values()))}")
    return results, errors


# --------------------------------------------------------------------------------------------------------------
# The report: metrics, tables, JSON, plots.


@dataclass
class ArmReport:
    """One finished arm with its metrics, as it appears in the table, the JSON and the plot."""

    name: str
    arm: dict
    result: dict
    metrics: CptMetrics

    @property
    def curves(self) -> LossCurves:
        c = self.result["curves"]
        return LossCurves.from_lists(c["eval_steps"], c["losses"])


def arm_report(result: dict) -> ArmReport:
    """Recompute the metrics of a finished arm from its curves (so metric fixes apply to old runs too)."""
    c, phases = result["curves"], result["phases"]
    curves = LossCurves.from_lists(c["eval_steps"], c["losses"])
    return ArmReport(name=result["name"], arm=result["arm"], result=result,
                     metrics=cpt_metrics(curves, phases["domains"], phases["ends"]))


def _schedule_label(result: dict) -> str:
    s = result["schedule"]
    return f"{s['kind']}, warmup {s['warmup_steps']}"


def _gap_cell(gap: StabilityGap) -> str:
    rec = f"rec {gap.recovery_steps}" if gap.recovered else "not rec."
    if gap.peak_rise <= 0:
        return f"{gap.peak_rise:+.3f} (none)"
    return f"{gap.peak_rise:+.3f} @{gap.peak_step}, {rec}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(reports: list[ArmReport], domains: list[str], phase_domains: list[str]) -> str:
    """One row per arm: final losses, their mean, forgetting F_j, the gap of the just-left domain at each shift,
    wall time."""
    header = ["arm", "schedule", "replay"] + [f"final {d}" for d in domains] + ["avg final"]
    header += [f"F {d}" for d in phase_domains[:-1]]
    header += [f"gap {phase_domains[k]} at →{phase_domains[k + 1]}" for k in range(len(phase_domains) - 1)]
    header += ["wall s"]
    rows = []
    for r in reports:
        m = r.metrics
        gaps = {(g.domain, g.shift): g for g in m.stability_gaps}
        row = [r.name, _schedule_label(r.result), f"{r.arm['replay']:.0%}"]
        row += [f"{m.final_losses[d]:.3f}" for d in domains] + [f"**{m.average_final_loss:.3f}**"]
        row += [f"{f.forgetting:+.3f}" for f in m.forgetting[:-1]]
        row += [_gap_cell(gaps[(phase_domains[k], k + 1)]) for k in range(len(phase_domains) - 1)]
        row += [f"{r.result['wall_seconds']:.0f}"]
        rows.append(row)
    return _md_table(header, rows)


def phase_table(reports: list[ArmReport], domains: list[str], phase_names: list[str]) -> str:
    """Validation loss of every domain after every phase (the last column group is the end of the run)."""
    header = ["arm"] + [f"after {name}: " + " / ".join(domains) for name in phase_names]
    rows = [[r.name] + [" / ".join(f"{losses[d]:.3f}" for d in domains) for losses in r.metrics.phase_end_losses]
            for r in reports]
    return _md_table(header, rows)


def forgetting_table(reports: list[ArmReport]) -> str:
    header = ["arm", "domain", "L at its phase end", "L at end", "F = end - phase end", "best (step)",
              "rise from best", "worst after its phase"]
    rows = []
    for r in reports:
        for f in r.metrics.forgetting[:-1]:
            rows.append([r.name, f.domain, f"{f.loss_at_phase_end:.3f}", f"{f.final_loss:.3f}",
                         f"{f.forgetting:+.3f}", f"{f.best_loss:.3f} ({f.best_step})", f"{f.rise_from_best:+.3f}",
                         f"{f.worst_after:.3f}" if f.worst_after is not None else "-"])
    return _md_table(header, rows)


def gap_table(reports: list[ArmReport], phase_names: list[str]) -> str:
    header = ["arm", "shift", "domain", "L(tau_k)", "peak rise G", "peak step", "recovery steps"]
    rows = []
    for r in reports:
        for g in r.metrics.stability_gaps:
            rec = str(g.recovery_steps) if g.recovered else "not recovered"
            rows.append([r.name, f"{phase_names[g.shift - 1]}→{phase_names[g.shift]} (step {g.ref_step})", g.domain,
                         f"{g.ref_loss:.3f}", f"{g.peak_rise:+.3f}", str(g.peak_step), rec])
    return _md_table(header, rows)


def markdown_report(exp: Experiment, reports: list[ArmReport], command: str, total_wall: float | None) -> str:
    base = exp.base
    plan = phase_plan(base)
    domains = list(base.data.sources)
    names = list(plan.names)
    steps = [plan.end_of(k) - plan.starts[k] for k in range(len(plan.starts))]
    model = (f"model {reports[0].result['parameters'] / 1e6:.2f} M parameters" if reports
             else f"model dim {base.model.dim} x {base.model.n_layers} layers")
    intro = [
        "# Continual pre-training experiment", "",
        f"Command: `{command}`  ",
        f"Config: `{exp.path}`; {model}, phases "
        + ", ".join(f"{n} ({s} steps)" for n, s in zip(names, steps))
        + f", global batch {base.train.global_batch} x {base.model.seq_len} tokens, validation every "
          f"{base.train.eval_interval} steps on {base.train.eval_batches * base.train.micro_batch} fixed windows "
          f"per domain, seed {base.train.seed}.  ",
        f"Arms finished: {len(reports)}/{len(exp.spec.arms)}"
        + (f"; wall time of this invocation {_fmt_duration(total_wall)}" if total_wall is not None else "") + ".",
        "",
        "Losses are validation cross-entropy (nats per byte). F = L(end) - L(end of the domain's own phase); "
        "gap = peak rise of the domain just left over its value at the shift, the step of the peak, and the steps "
        "from the shift until the rise falls below 10% of the peak (\"not rec.\" = not within the next phase).",
        "",
    ]
    sections = [
        "## Summary", "", summary_table(reports, domains, exp.phase_domains), "",
        "## Validation loss after each phase", "", phase_table(reports, domains, names), "",
        "## Forgetting", "", forgetting_table(reports), "",
        "## Stability gap after every shift (all earlier domains)", "", gap_table(reports, names), "",
    ]
    return "\n".join(intro + sections)


def plot_curves(reports: list[ArmReport], path: Path, phase_names: list[str]) -> Path:
    """One panel per arm (validation loss per domain, phase boundaries dashed) plus one LR-vs-step panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3
    nrows = -(-len(reports) // ncols) + 1  # the arms' rows, then the LR panel across the whole last row
    fig = plt.figure(figsize=(5.2 * ncols, 3.6 * nrows))
    grid = fig.add_gridspec(nrows, ncols)
    arm_axes = [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(len(reports))]
    lr_ax = fig.add_subplot(grid[nrows - 1, :])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    domains = list(reports[0].result["curves"]["losses"]) if reports else []
    ends = reports[0].result["phases"]["ends"] if reports else []
    low, high = _y_range(reports)
    for ax, r in zip(arm_axes, reports):
        c = r.result["curves"]
        for i, d in enumerate(domains):
            ax.plot(c["eval_steps"], c["losses"][d], color=colors[i % len(colors)], lw=1.4, label=d)
        _mark_phases(ax, ends, phase_names)
        ax.set_ylim(low, high)
        ax.set_title(f"{r.name}: avg final {r.metrics.average_final_loss:.3f}", fontsize=10, pad=14)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    drawn: set[tuple[float, ...]] = set()
    for r in reports:
        c = r.result["curves"]
        key = tuple(c["lr"])
        if key in drawn:  # replay twins share a schedule: draw each distinct schedule once
            continue
        lr_ax.plot(c["steps"], c["lr"], lw=1.4, label=_schedule_label(r.result), color=colors[len(drawn) % len(colors)])
        drawn.add(key)
    _mark_phases(lr_ax, ends, phase_names)
    lr_ax.set_title("learning rate", fontsize=10, pad=14)
    lr_ax.set_xlabel("step")
    lr_ax.set_ylabel("lr")
    lr_ax.grid(alpha=0.3)
    lr_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _mark_phases(ax, ends: list[int], names: list[str]) -> None:
    starts = [0] + ends[:-1]
    for s in ends[:-1]:
        ax.axvline(s, color="grey", ls="--", lw=0.9)
    for s, e, n in zip(starts, ends, names):
        ax.text((s + e) / 2, 1.0, n, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8,
                color="grey")


def _y_range(reports: list[ArmReport]) -> tuple[float, float]:
    """Shared y-limits: from the lowest loss to the highest loss after the first evaluations, so the steep start
    does not squash the part where forgetting and the stability gap show."""
    values, early = [], []
    for r in reports:
        c = r.result["curves"]
        first_end = r.result["phases"]["ends"][0]
        for d, v in c["losses"].items():
            values += [x for s, x in zip(c["eval_steps"], v) if s >= first_end / 3]
            early += v
    if not values:
        values = early or [0.0, 1.0]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def write_report(exp: Experiment, out: Path, command: str, total_wall: float | None, say=print) -> dict:
    """Recompute metrics from every finished arm of this config and write results.md, results.json, curves.png."""
    reports = []
    for arm in exp.spec.arms:
        cfg = arm_config(exp, arm, run_dir=out / "arms" / arm.name)
        result = load_result(out / "arms" / arm.name, config_digest(cfg))
        if result is not None:
            reports.append(arm_report(result))
    plan = phase_plan(exp.base)
    md = markdown_report(exp, reports, command, total_wall)
    (out / "results.md").write_text(md + "\n")
    payload = {"command": command, "config": str(exp.path), "base_config": exp.base.to_dict(),
               "domains": list(exp.base.data.sources), "phase_names": list(plan.names),
               "phase_domains": exp.phase_domains, "phase_ends": [plan.end_of(k) for k in range(len(plan.starts))],
               "arms": {r.name: {"arm": r.arm, "wall_seconds": r.result["wall_seconds"],
                                 "parameters": r.result["parameters"], "total_steps": r.result["total_steps"],
                                 "metrics": r.metrics.to_dict(), "curves": r.result["curves"]} for r in reports}}
    _write_json_atomic(out / "results.json", payload)
    if reports:
        plot_curves(reports, out / "curves.png", list(plan.names))
    say(md)
    say(f"[cpt] wrote {out / 'results.md'}, {out / 'results.json'}"
        + (f", {out / 'curves.png'}" if reports else ""))
    return payload


def run_experiment(exp: Experiment, out: Path, arm_names: list[str] | None = None, parallel: int | None = None,
                   command: str = "ecpt experiment cpt", say=print) -> int:
    """Train the selected arms that have no result yet, then write the report over every finished arm.

    Returns 0 when every selected arm finished, 1 when some failed (the report still covers the others).
    """
    started = time.perf_counter()
    arms = exp.spec.select(arm_names)
    parallel = parallel or exp.spec.parallel
    _require(parallel >= 1, f"--parallel must be >= 1, got {parallel}")
    out.mkdir(parents=True, exist_ok=True)
    threads = exp.base.train.threads_per_worker or max(1, (os.cpu_count() or 1) // parallel)
    progress_bar = parallel == 1 and exp.base.train.progress and sys.stderr.isatty()
    jobs = _jobs(exp, arms, out, threads, progress_bar)
    todo = []
    for job in jobs:
        if load_result(Path(job.run_dir), job.digest) is not None:
            say(f"[cpt] skip {job.name}: finished earlier ({Path(job.run_dir) / 'result.json'})")
        else:
            todo.append(job)
    errors: dict[str, str] = {}
    if todo:
        build_corpus(exp.base, log=lambda msg: say(f"[cpt] {msg}"))  # once, before the workers memory-map it
        say(f"[cpt] training {len(todo)} arm(s) {[j.name for j in todo]} in {min(parallel, len(todo))} process(es) "
            f"x {threads} thread(s); output {out}")
        _, errors = run_arms(todo, min(parallel, len(todo)), say=say)
    write_report(exp, out, command, time.perf_counter() - started, say=say)
    if errors:
        say(f"[cpt] {len(errors)} arm(s) failed: " + "; ".join(f"{n}: {e}" for n, e in errors.items()))
        return 1
    return 0
