"""Learning-rate schedules as pure functions of the step.

Every function maps an optimizer step (0-based: the LR used for the update of step ``t``) to a float and depends only
on its arguments, so resuming at any step on any world size gives the same LR without saved scheduler state.

- constant:  linear warmup to lr_max, then flat.
- cosine:    re-warmed at every data phase (Gupta et al. 2023): phase 0 warms 0 -> lr_max, later phases warm
             lr_min -> lr_max, then a cosine to lr_min at the phase end.
- wsd:       warmup, stable at lr_max, decay to lr_min over the last decay_steps (MiniCPM; HF get_wsd_schedule).
- infinite:  Ibrahim et al. 2024 / Singh et al. 2025 Eq. 1: warmup -> cooldown to lr_const -> constant across
             every phase (no re-warming) -> optional exponential anneal to lr_min over the last anneal_steps.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

from elastic.config import ScheduleConfig

INVERSE_SQRT_A = 10.0  # "Beyond Cosine Decay" inverse-sqrt cooldown constant a


def decay_shape(u: float, shape: str) -> float:
    """g(u): 1 at u=0 falling to 0 at u=1, for the cooldown/decay shapes of the infinite and WSD schedules."""
    u = min(max(u, 0.0), 1.0)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * u))
    if shape == "linear":
        return 1.0 - u
    if shape == "inverse_sqrt":
        h = lambda x: 1.0 / math.sqrt(1.0 + INVERSE_SQRT_A * x) - 1.0  # noqa: E731 - the paper's h(u)
        return 1.0 - h(u) / h(1.0)
    raise ValueError(f"unknown decay shape {shape!r}; use cosine, linear or inverse_sqrt")


def _warmup(step: int, warmup_steps: int, start: float, peak: float) -> float:
    return start + (peak - start) * step / warmup_steps


def constant_lr(step: int, s: ScheduleConfig) -> float:
    if step < s.warmup_steps:
        return _warmup(step, s.warmup_steps, 0.0, s.lr_max)
    return s.lr_max


def cosine_rewarm_lr(step: int, s: ScheduleConfig, phase_starts: Sequence[int], total_steps: int) -> float:
    """Cosine cycle per data phase; every phase after the first re-warms from lr_min to lr_max."""
    phase = bisect_right(phase_starts, step) - 1
    start = phase_starts[phase]
    end = phase_starts[phase + 1] if phase + 1 < len(phase_starts) else total_steps
    local, length = step - start, max(end - start, 1)
    warmup = min(s.warmup_steps, length - 1)
    if local < warmup:
        return _warmup(local, warmup, 0.0 if phase == 0 else s.lr_min, s.lr_max)
    u = (local - warmup) / max(length - warmup, 1)
    return s.lr_min + (s.lr_max - s.lr_min) * decay_shape(u, "cosine")


def wsd_lr(step: int, s: ScheduleConfig, total_steps: int) -> float:
    decay = s.decay_steps or max(1, round(0.1 * total_steps))
    decay_start = total_steps - decay
    if step < s.warmup_steps:
        return _warmup(step, s.warmup_steps, 0.0, s.lr_max)
    if step < decay_start:
        return s.lr_max
    return s.lr_min + (s.lr_max - s.lr_min) * decay_shape((step - decay_start) / decay, s.decay_shape)


def infinite_lr(step: int, s: ScheduleConfig, total_steps: int) -> float:
    """Warmup -> cooldown to lr_const -> constant (across phases) -> exponential anneal over the last anneal_steps."""
    n_w = s.warmup_steps
    n_c = n_w + s.cooldown_steps
    n_a = total_steps - s.anneal_steps if s.anneal_steps else math.inf
    if step < n_w:
        return _warmup(step, n_w, 0.0, s.lr_max)
    if step < n_c:
        return s.lr_const + (s.lr_max - s.lr_const) * decay_shape((step - n_w) / s.cooldown_steps, s.cooldown_shape)
    if step < n_a:
        return s.lr_const
    u = min((step - n_a) / s.anneal_steps, 1.0)
    return s.lr_const * (s.lr_min / s.lr_const) ** u


def lr_at(step: int, s: ScheduleConfig, phase_starts: Sequence[int], total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` for the configured schedule kind."""
    if s.kind == "constant":
        return constant_lr(step, s)
    if s.kind == "cosine":
        return cosine_rewarm_lr(step, s, phase_starts, total_steps)
    if s.kind == "wsd":
        return wsd_lr(step, s, total_steps)
    if s.kind == "infinite":
        return infinite_lr(step, s, total_steps)
    raise ValueError(f"schedule.kind {s.kind!r} is not one of constant, cosine, wsd, infinite")
