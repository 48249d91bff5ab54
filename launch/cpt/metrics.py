"""Forgetting and stability-gap metrics of a continual pre-training run, computed from per-domain validation curves.

Pure functions of the curves, so they can be tested on hand-made numbers and recomputed from a saved JSON file.
Definitions (De Lange et al., "Continual evaluation for lifelong learning"; Guo et al., arXiv 2406.14833), with
``L_j(t)`` the validation loss of domain ``j`` after ``t`` completed optimizer steps, phase ``k`` covering steps
``(tau_{k-1}, tau_k]`` and ``tau_k`` its last step (``tau_{-1} = 0``), and domain ``j`` the one trained in phase ``j``:

- forgetting         ``F_j = L_j(end) - L_j(tau_j)``: how much worse domain j is at the end than when its phase ended.
- rise from best     ``L_j(end) - min_t L_j(t)``: the same against the best value ever measured (any phase).
- worst after        ``max_{t > tau_j} L_j(t)``: the worst-case loss of domain j once its phase is over.
- stability gap      for the shift after phase ``k`` and every earlier domain ``j <= k``:
                     ``G_jk = max_{tau_k < t <= tau_{k+1}} L_j(t) - L_j(tau_k)`` and the step where the max is reached;
                     recovery = steps from ``tau_k`` to the first evaluation at or after the peak where
                     ``L_j(t) <= L_j(tau_k) + 0.1 G_jk``, searched within phase ``k+1``; ``None`` ("not recovered")
                     when that never happens inside the phase. A non-positive ``G_jk`` means the loss never rose
                     above its reference: there is no gap, and recovery is 0 steps.
- average final loss the mean over domains of ``L_j(end)``.

Only evaluation points count: the curves must include an evaluation at every phase end ``tau_k`` (the trainer
always evaluates there), and the time resolution of peak and recovery is the evaluation interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

RECOVERY_FRACTION = 0.1
"""Recovered when the rise is back below this fraction of the peak rise G (the stability-gap papers' convention)."""


class CurveError(ValueError):
    """The curves cannot support a metric (missing evaluation at a phase end, ragged lists); says which."""


@dataclass(frozen=True)
class LossCurves:
    """Validation loss per domain at increasing evaluation steps (completed optimizer steps)."""

    steps: tuple[int, ...]
    losses: dict[str, tuple[float, ...]]

    def __post_init__(self):
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise CurveError(f"evaluation steps must be strictly increasing, got {list(self.steps)}")
        for domain, values in self.losses.items():
            if len(values) != len(self.steps):
                raise CurveError(f"domain {domain!r} has {len(values)} losses for {len(self.steps)} evaluation steps")

    @classmethod
    def from_lists(cls, steps: list[int], losses: dict[str, list[float]]) -> "LossCurves":
        return cls(tuple(steps), {d: tuple(v) for d, v in losses.items()})

    def at(self, domain: str, step: int) -> float:
        """L_domain(step); the step must be an evaluation step, because metrics must not interpolate."""
        if domain not in self.losses:
            raise CurveError(f"no validation curve for domain {domain!r}; have {sorted(self.losses)}")
        try:
            return self.losses[domain][self.steps.index(step)]
        except ValueError:
            raise CurveError(
                f"no evaluation at step {step} (a phase end must be evaluated); evaluated steps: {list(self.steps)}"
            ) from None

    def window(self, domain: str, after: int, until: int) -> list[tuple[int, float]]:
        """(step, loss) of the evaluations with ``after < step <= until``."""
        return [(s, v) for s, v in zip(self.steps, self.losses[domain]) if after < s <= until]

    @property
    def end(self) -> int:
        return self.steps[-1]


@dataclass(frozen=True)
class Forgetting:
    """How much domain ``domain`` (trained in phase ``phase``) got worse after its phase ended."""

    domain: str
    phase: int
    loss_at_phase_end: float
    """L_j(tau_j)."""
    final_loss: float
    """L_j(end)."""
    forgetting: float
    """F_j = L_j(end) - L_j(tau_j)."""
    best_loss: float
    """min_t L_j(t) over every evaluation."""
    best_step: int
    rise_from_best: float
    """L_j(end) - best_loss."""
    worst_after: float | None
    """max_{t > tau_j} L_j(t); None for the last phase's domain, which has no evaluation after its phase."""


@dataclass(frozen=True)
class StabilityGap:
    """The transient rise of an earlier domain's loss right after the data shift that starts phase ``shift``."""

    domain: str
    shift: int
    """Index of the phase that starts at the shift (k + 1)."""
    ref_step: int
    """tau_k, the last step before the shift."""
    ref_loss: float
    """L_j(tau_k)."""
    peak_rise: float
    """G_jk = max over phase k+1 of L_j(t) - L_j(tau_k)."""
    peak_step: int
    """Step (completed optimizer steps) where the maximum is reached."""
    recovery_steps: int | None
    """Steps from tau_k until L_j <= L_j(tau_k) + 0.1 G_jk (at or after the peak); None = not recovered in the phase."""

    @property
    def recovered(self) -> bool:
        return self.recovery_steps is not None


@dataclass(frozen=True)
class CptMetrics:
    """Every metric of one run, in a JSON-friendly shape (see ``to_dict``)."""

    phase_end_losses: list[dict[str, float]]
    """Per phase k: {domain: L_domain(tau_k)}; the last entry is the end of the run."""
    final_losses: dict[str, float]
    average_final_loss: float
    forgetting: list[Forgetting]
    stability_gaps: list[StabilityGap]

    def to_dict(self) -> dict:
        out = asdict(self)
        for gap in out["stability_gaps"]:
            gap["recovered"] = gap["recovery_steps"] is not None
        return out


def _check_phases(curves: LossCurves, phase_domains: list[str], phase_ends: list[int]) -> None:
    if len(phase_domains) != len(phase_ends):
        raise CurveError(f"{len(phase_domains)} phase domains for {len(phase_ends)} phase ends")
    if any(b <= a for a, b in zip(phase_ends, phase_ends[1:])):
        raise CurveError(f"phase ends must be strictly increasing, got {phase_ends}")
    if phase_ends and phase_ends[-1] != curves.end:
        raise CurveError(
            f"the last evaluation (step {curves.end}) is not the end of the last phase "
            f"(step {phase_ends[-1]}): the run did not finish"
        )


def phase_end_losses(curves: LossCurves, phase_ends: list[int]) -> list[dict[str, float]]:
    """Validation loss of every domain at the end of every phase (the classic continual-learning matrix)."""
    return [{d: curves.at(d, tau) for d in curves.losses} for tau in phase_ends]


def forgetting(curves: LossCurves, phase_domains: list[str], phase_ends: list[int]) -> list[Forgetting]:
    """F_j = L_j(end) - L_j(tau_j) for every phase's domain, plus the rise from the best value and the worst after."""
    _check_phases(curves, phase_domains, phase_ends)
    out = []
    for j, (domain, tau) in enumerate(zip(phase_domains, phase_ends)):
        at_end, final = curves.at(domain, tau), curves.at(domain, curves.end)
        values = curves.losses[domain]
        best_index = min(range(len(values)), key=values.__getitem__)
        after = [v for _, v in curves.window(domain, tau, curves.end)]
        out.append(
            Forgetting(
                domain=domain,
                phase=j,
                loss_at_phase_end=at_end,
                final_loss=final,
                forgetting=final - at_end,
                best_loss=values[best_index],
                best_step=curves.steps[best_index],
                rise_from_best=final - values[best_index],
                worst_after=max(after) if after else None,
            )
        )
    return out


def stability_gap(curves: LossCurves, domain: str, ref_step: int, phase_end: int, shift: int) -> StabilityGap:
    """Peak rise of ``domain`` over L(ref_step) within (ref_step, phase_end], its step, and the recovery time."""
    ref = curves.at(domain, ref_step)
    window = curves.window(domain, ref_step, phase_end)
    if not window:
        raise CurveError(f"no evaluation of {domain!r} between steps {ref_step} and {phase_end}")
    peak_step, peak = max(window, key=lambda sv: sv[1])  # the first step reaching the max, on ties
    rise = peak - ref
    if rise <= 0:
        return StabilityGap(domain, shift, ref_step, ref, rise, peak_step, 0)
    threshold = ref + RECOVERY_FRACTION * rise
    recovery = next((s - ref_step for s, v in window if s >= peak_step and v <= threshold), None)
    return StabilityGap(domain, shift, ref_step, ref, rise, peak_step, recovery)


def stability_gaps(curves: LossCurves, phase_domains: list[str], phase_ends: list[int]) -> list[StabilityGap]:
    """G_jk for every shift k -> k+1 and every domain j <= k trained before it, in (shift, domain) order."""
    _check_phases(curves, phase_domains, phase_ends)
    gaps = []
    for k in range(len(phase_ends) - 1):
        for domain in phase_domains[: k + 1]:
            gaps.append(stability_gap(curves, domain, phase_ends[k], phase_ends[k + 1], shift=k + 1))
    return gaps


def average_final_loss(curves: LossCurves, domains: list[str] | None = None) -> float:
    """Mean over domains of L_j(end): one number for "how good is the final model on everything"."""
    domains = list(curves.losses) if domains is None else domains
    if not domains:
        raise CurveError("average_final_loss needs at least one domain")
    return sum(curves.at(d, curves.end) for d in domains) / len(domains)


def cpt_metrics(curves: LossCurves, phase_domains: list[str], phase_ends: list[int]) -> CptMetrics:
    """All metrics of one run."""
    _check_phases(curves, phase_domains, phase_ends)
    return CptMetrics(
        phase_end_losses=phase_end_losses(curves, phase_ends),
        final_losses={d: curves.at(d, curves.end) for d in curves.losses},
        average_final_loss=average_final_loss(curves),
        forgetting=forgetting(curves, phase_domains, phase_ends),
        stability_gaps=stability_gaps(curves, phase_domains, phase_ends),
    )
