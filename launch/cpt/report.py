"""The experiment's report over every finished arm: the Markdown tables (``results.md``, also printed), the JSON
with metrics and curves (``results.json``) and the plot (``curves.png``), all recomputed from the arms' result files."""

from __future__ import annotations

from pathlib import Path

from elastic.data import phase_plan
from launch.cpt.base import Base
from launch.cpt.metrics import StabilityGap
from launch.cpt.plots import plot_curves
from launch.cpt.results import ArmReport, arm_report, load_result, schedule_label, write_json_atomic
from launch.cpt.spec import Experiment, arm_config, config_digest


def format_duration(seconds: float) -> str:
    """Whole seconds as "42 s" or "3 min 07 s", for the report and the runner's progress lines."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


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
        row = [r.name, schedule_label(r.result), f"{r.arm['replay']:.0%}"]
        row += [f"{m.final_losses[d]:.3f}" for d in domains] + [f"**{m.average_final_loss:.3f}**"]
        row += [f"{f.forgetting:+.3f}" for f in m.forgetting[:-1]]
        row += [_gap_cell(gaps[(phase_domains[k], k + 1)]) for k in range(len(phase_domains) - 1)]
        row += [f"{r.result['wall_seconds']:.0f}"]
        rows.append(row)
    return _md_table(header, rows)


def phase_table(reports: list[ArmReport], domains: list[str], phase_names: list[str]) -> str:
    """Validation loss of every domain after every phase (the last column group is the end of the run)."""
    header = ["arm"] + [f"after {name}: " + " / ".join(domains) for name in phase_names]
    rows = [
        [r.name] + [" / ".join(f"{losses[d]:.3f}" for d in domains) for losses in r.metrics.phase_end_losses]
        for r in reports
    ]
    return _md_table(header, rows)


def forgetting_table(reports: list[ArmReport]) -> str:
    header = [
        "arm",
        "domain",
        "L at its phase end",
        "L at end",
        "F = end - phase end",
        "best (step)",
        "rise from best",
        "worst after its phase",
    ]
    rows = []
    for r in reports:
        for f in r.metrics.forgetting[:-1]:
            rows.append(
                [
                    r.name,
                    f.domain,
                    f"{f.loss_at_phase_end:.3f}",
                    f"{f.final_loss:.3f}",
                    f"{f.forgetting:+.3f}",
                    f"{f.best_loss:.3f} ({f.best_step})",
                    f"{f.rise_from_best:+.3f}",
                    f"{f.worst_after:.3f}" if f.worst_after is not None else "-",
                ]
            )
    return _md_table(header, rows)


def gap_table(reports: list[ArmReport], phase_names: list[str]) -> str:
    header = ["arm", "shift", "domain", "L(tau_k)", "peak rise G", "peak step", "recovery steps"]
    rows = []
    for r in reports:
        for g in r.metrics.stability_gaps:
            rec = str(g.recovery_steps) if g.recovered else "not recovered"
            rows.append(
                [
                    r.name,
                    f"{phase_names[g.shift - 1]}→{phase_names[g.shift]} (step {g.ref_step})",
                    g.domain,
                    f"{g.ref_loss:.3f}",
                    f"{g.peak_rise:+.3f}",
                    str(g.peak_step),
                    rec,
                ]
            )
    return _md_table(header, rows)


def base_line(exp: Experiment, base: Base) -> str:
    """Where every arm started, in one sentence."""
    name = exp.config.data.phases[0].name
    if exp.given_base:
        return f"Base: `{base.init}` (given by --base; its first-phase domain {name} is assumed to be its own).  "
    i = base.info
    stopped = "its validation loss flattened" if i["stopped"] == "flattened" else "it reached the cap unflattened"
    return (
        f"Base: pre-trained on {name} from seed {exp.config.train.seed} for {i['steps']} steps (stopped: "
        f"{stopped}; cap {i['cap']}), {name} validation loss {i['final_losses'][i['domain']]:.3f}, "
        f"built in {format_duration(i['wall_seconds'])}; `{base.init}`.  "
    )


def markdown_report(
    exp: Experiment, reports: list[ArmReport], command: str, total_wall: float | None, base: Base
) -> str:
    config = exp.config
    plan = phase_plan(config)
    domains = list(config.data.sources)
    names = list(plan.names)
    steps = [plan.end_of(k) - plan.starts[k] for k in range(1, len(plan.starts))]
    model = (
        f"model {reports[0].result['parameters'] / 1e6:.2f} M parameters"
        if reports
        else f"model dim {config.model.dim} x {config.model.n_layers} layers"
    )
    intro = [
        "# Continual pre-training experiment",
        "",
        f"Command: `{command}`  ",
        base_line(exp, base),
        f"Config: `{exp.path}`; {model}; every arm continues the base through "
        + ", ".join(f"{n} ({s} steps)" for n, s in zip(names[1:], steps))
        + f", global batch {config.train.global_batch} x {config.model.seq_len} tokens, validation every "
        f"{config.train.eval_interval} steps on {config.train.eval_batches * config.train.micro_batch} fixed "
        f"windows per domain, seed {config.train.seed}. Step 0 is the base.  ",
        f"Arms finished: {len(reports)}/{len(exp.spec.arms)}"
        + (f"; wall time of this invocation {format_duration(total_wall)}" if total_wall is not None else "")
        + ".",
        "",
        "Losses are validation cross-entropy (nats per token). F = L(end) - L(end of the domain's own phase; "
        f"{names[0]}: the base, step 0); "
        "gap = peak rise of the domain just left over its value at the shift, the step of the peak, and the steps "
        'from the shift until the rise falls below 10% of the peak ("not rec." = not within the next phase).',
        "",
    ]
    sections = [
        "## Summary",
        "",
        summary_table(reports, domains, exp.phase_domains),
        "",
        "## Validation loss after each phase",
        "",
        phase_table(reports, domains, names),
        "",
        "## Forgetting",
        "",
        forgetting_table(reports),
        "",
        "## Stability gap after every shift (all earlier domains)",
        "",
        gap_table(reports, names),
        "",
    ]
    return "\n".join(intro + sections)


def write_report(exp: Experiment, out: Path, command: str, total_wall: float | None, base: Base, say=print) -> dict:
    """Recompute metrics from every finished arm of this config and write results.md, results.json, curves.png."""
    reports = []
    for arm in exp.spec.arms:
        cfg = arm_config(exp, arm, run_dir=out / "arms" / arm.name)
        result = load_result(out / "arms" / arm.name, config_digest(cfg))
        if result is not None:
            reports.append(arm_report(result))
    plan = phase_plan(exp.config)
    md = markdown_report(exp, reports, command, total_wall, base)
    (out / "results.md").write_text(md + "\n")
    payload = {
        "command": command,
        "config": str(exp.path),
        "training_config": exp.config.to_dict(),
        "base": {"init": base.init, "given": exp.given_base, **{k: v for k, v in base.info.items() if k != "curves"}},
        "base_curves": base.info.get("curves"),
        "domains": list(exp.config.data.sources),
        "phase_names": list(plan.names),
        "phase_domains": exp.phase_domains,
        "phase_ends": [0, *(plan.end_of(k) - plan.starts[1] for k in range(1, len(plan.starts)))],
        "arms": {
            r.name: {
                "arm": r.arm,
                "wall_seconds": r.result["wall_seconds"],
                "parameters": r.result["parameters"],
                "total_steps": r.result["total_steps"],
                "metrics": r.metrics.to_dict(),
                "curves": r.result["curves"],
            }
            for r in reports
        },
    }
    write_json_atomic(out / "results.json", payload)
    if reports:
        plot_curves(reports, out / "curves.png", list(plan.names))
    say(md)
    say(f"[cpt] wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {out / 'curves.png'}" if reports else ""))
    return payload
