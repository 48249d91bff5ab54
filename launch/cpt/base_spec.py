"""The pre-trained base of the CPT experiment: the ``[experiment.base]`` table, its stopping rule (a pure function
of the validation curve), the training config of the base run, and the digest that names its cache directory.

The base trains ecpt's byte-level model from ``train.seed`` on the first data phase (the first domain) until its
validation loss on that domain flattens, or until the phase's token budget (the cap) is used up. Its schedule must
not depend on the run's length, because the length is not known in advance: ``constant``, or ``infinite`` without
an anneal (warmup, cooldown to ``lr_const``, then constant: the "main run" of Ibrahim et al. 2024, from which
continual pre-training starts).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field

from elastic.config import Config, ConfigError, ScheduleConfig, config_from_dict

BASE_VERSION = 1
"""Bump when the base's training or export changes in a way the config does not show: older bases are rebuilt."""


def require(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless cond (launch.cpt.spec re-exports it for the rest of the experiment)."""
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class BaseSpec:
    """``[experiment.base]``: how the base is pre-trained on the first phase's domain and when it stops."""

    eval_interval: int = 20
    """Steps between the base's validation evaluations (the stopping rule looks at these)."""
    patience: int = 5
    """K: the rule compares the best loss of the last K evaluations with the best loss before them."""
    min_improvement: float = 0.01
    """Stop when the last K evaluations improved the first domain's best validation loss by at most this fraction
    of it ((best before - best of last K) / best before <= min_improvement). The first phase's ``tokens`` cap the
    run."""
    schedule: dict = field(default_factory=lambda: {"kind": "infinite", "anneal_steps": 0})
    """Overrides of ``[schedule]`` for the base: kind constant, or infinite with anneal_steps = 0."""
    threads: int = 0
    """Threads of the base's training process (it runs alone, before the arms); 0 = one per CPU core. Not part of
    the digest: threads only change the order of float sums."""

    def validate(self) -> None:
        require(self.eval_interval >= 1, f"experiment.base.eval_interval must be >= 1, got {self.eval_interval}")
        require(self.patience >= 1, f"experiment.base.patience must be >= 1, got {self.patience}")
        require(
            0.0 <= self.min_improvement < 1.0,
            f"experiment.base.min_improvement must be in [0, 1), got {self.min_improvement}",
        )
        known = set(ScheduleConfig.__dataclass_fields__)
        unknown = sorted(set(self.schedule) - known)
        require(not unknown, f"experiment.base.schedule has unknown key(s) {unknown}; valid keys: {sorted(known)}")
        require(self.threads >= 0, f"experiment.base.threads must be >= 0 (0 = one per core), got {self.threads}")


def parse_base(raw: object) -> BaseSpec:
    """The ``[experiment.base]`` table (absent: the defaults) -> a validated BaseSpec; errors name the field."""
    if raw is None:
        raw = {}
    require(isinstance(raw, dict), "experiment.base must be a table ([experiment.base] in TOML)")
    allowed = set(BaseSpec.__dataclass_fields__)
    unknown = sorted(set(raw) - allowed)
    require(not unknown, f"experiment.base has unknown key(s) {unknown}; valid keys: {sorted(allowed)}")
    for key in ("eval_interval", "patience", "threads"):
        value = raw.get(key, 1)
        require(
            isinstance(value, int) and not isinstance(value, bool),
            f"experiment.base.{key} must be an integer, got {value!r}",
        )
    value = raw.get("min_improvement", 0.0)
    require(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        f"experiment.base.min_improvement must be a number, got {value!r}",
    )
    require(isinstance(raw.get("schedule", {}), dict), "experiment.base.schedule must be a table of [schedule] keys")
    defaults = BaseSpec()
    spec = BaseSpec(
        eval_interval=raw.get("eval_interval", defaults.eval_interval),
        patience=raw.get("patience", defaults.patience),
        min_improvement=float(raw.get("min_improvement", defaults.min_improvement)),
        schedule={**defaults.schedule, **raw.get("schedule", {})},
        threads=raw.get("threads", defaults.threads),
    )
    spec.validate()
    return spec


def flattened(losses: list[float], patience: int, min_improvement: float) -> bool:
    """The stopping rule: True when the best of the last ``patience`` losses improves the best loss before them by
    at most ``min_improvement`` of it (0: by nothing). Needs more than ``patience`` evaluations (False before)."""
    if len(losses) <= patience:
        return False
    before, recent = min(losses[:-patience]), min(losses[-patience:])
    return before - recent <= min_improvement * before


def base_raw(config_raw: dict, spec: BaseSpec) -> dict:
    """The base run's raw config: the first data phase only, the base schedule, ecpt's own model from
    ``train.seed``, evaluated every ``spec.eval_interval`` steps."""
    raw = copy.deepcopy(config_raw)
    first = raw["data"]["phases"][0]
    raw["data"]["phases"] = [{**first, "mixture": {_own_domain(first): 1.0}}]
    raw.setdefault("schedule", {}).update(spec.schedule)
    raw.setdefault("model", {})["init"] = ""
    raw.setdefault("train", {})["eval_interval"] = spec.eval_interval
    return raw


def _own_domain(phase: dict) -> str:
    mixture = phase["mixture"]
    return max(mixture, key=mixture.get)


def base_config(config_raw: dict, spec: BaseSpec) -> Config:
    """The validated base run config; a schedule that depends on the run's length is an error naming the field."""
    cfg = config_from_dict(base_raw(config_raw, spec))
    s = cfg.schedule
    require(
        s.kind == "constant" or (s.kind == "infinite" and s.anneal_steps == 0),
        f"experiment.base.schedule must not depend on the run's length (the base stops when its loss flattens): "
        f'use kind = "constant", or kind = "infinite" with anneal_steps = 0; got kind {s.kind!r}'
        + (f", anneal_steps {s.anneal_steps}" if s.kind == "infinite" else ""),
    )
    return cfg


def outcome_config(cfg: Config) -> dict:
    """The config as far as it can change a run's numbers: not where it writes, how many threads it uses (they only
    change float summation order), whether it shows a bar, or how it launches, checkpoints and reports."""
    d = cfg.to_dict()
    for key in ("run_dir", "progress", "threads_per_worker"):
        d["train"].pop(key)
    d["data"].pop("cache_dir")
    for section in ("metrics", "launch", "checkpoint"):
        d.pop(section)
    return d


def base_digest(cfg: Config, spec: BaseSpec, corpus_key: str) -> str:
    """Hash of everything that decides the base's weights: the base run config (outcome_config), the stopping
    rule, the corpus' identity and BASE_VERSION."""
    d = outcome_config(cfg)
    rule = {k: v for k, v in asdict(spec).items() if k != "threads"}
    stamp = {"version": BASE_VERSION, "config": d, "rule": rule, "corpus": corpus_key}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
