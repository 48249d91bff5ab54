"""``curves.png``: validation loss per domain of every arm and the learning rate, with the phase boundaries.

matplotlib is an optional extra (``ecpt[plot]``), so it is imported only when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path

from launch.cpt.results import ArmReport, schedule_label


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
        lr_ax.plot(c["steps"], c["lr"], lw=1.4, label=schedule_label(r.result), color=colors[len(drawn) % len(colors)])
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
        if s > 0:
            ax.axvline(s, color="grey", ls="--", lw=0.9)
    for s, e, n in zip(starts, ends, names):
        if e <= s:  # the base's phase ends at step 0: nothing of it is drawn
            continue
        ax.text(
            (s + e) / 2, 1.0, n, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8, color="grey"
        )


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
