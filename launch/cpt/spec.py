"""The CPT experiment's definition: the ``[experiment]`` table of an experiment file, its arms, and the validated
training config of every arm (with the digest that tells whether a saved result belongs to it).

The first data phase is the base's (``launch.cpt.base_spec``); every arm starts from the base (``model.init``) and
trains the later phases, so arm step 0 is the end of the first phase."""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path

from elastic.config import Config, ConfigError, ScheduleConfig, apply_overrides, config_from_dict, resolve_config
from launch.cpt.base_spec import BaseSpec, outcome_config, parse_base, require

CPT_CONFIG = "cpt-experiment"
"""The bundled experiment config used without --config (configs/cpt-experiment.toml)."""


@dataclass(frozen=True)
class ArmSpec:
    """One arm: schedule overrides and a replay fraction applied on top of the base config."""

    name: str
    """Directory name and table label; letters, digits, '-', '_' and '.' only."""
    description: str = ""
    """One line for the table and the plot title."""
    replay: float = 0.0
    """Fraction of every arm phase spent on the earlier phases' domains (the base's included), split evenly among
    them; 0 trains each phase on its own domain only."""
    schedule: dict = field(default_factory=dict)
    """Overrides of the base ``[schedule]`` table (kind, lr_max, warmup_steps, ...)."""

    def validate(self, where: str) -> None:
        require(
            bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name),
            f"{where}.name must be non-empty and use only letters, digits, '-', '_', '.'; got {self.name!r}",
        )
        require(0.0 <= self.replay < 1.0, f"{where}.replay must be in [0, 1), got {self.replay}")
        known = {f for f in ScheduleConfig.__dataclass_fields__}
        unknown = sorted(set(self.schedule) - known)
        require(not unknown, f"{where}.schedule has unknown key(s) {unknown}; valid keys: {sorted(known)}")


@dataclass
class ExperimentSpec:
    """The ``[experiment]`` table: arms and how to run them."""

    arms: list[ArmSpec]
    base: BaseSpec = field(default_factory=BaseSpec)
    """How the base is pre-trained on the first phase and when it stops (``[experiment.base]``)."""
    parallel: int = 2
    """Arms trained at once, each in its own process."""
    out: str = "runs/cpt-experiment"
    """Output directory (``--out`` overrides it)."""

    def validate(self) -> None:
        require(bool(self.arms), "experiment.arms must list at least one arm ([[experiment.arms]] in TOML)")
        for i, arm in enumerate(self.arms):
            arm.validate(f"experiment.arms[{i}]")
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        require(not dupes, f"experiment.arms names must be unique; repeated: {dupes}")
        require(self.parallel >= 1, f"experiment.parallel must be >= 1, got {self.parallel}")

    def select(self, names: list[str] | None) -> list[ArmSpec]:
        """The arms named (in config order), or all of them; an unknown name is an error that lists the valid ones."""
        if not names:
            return list(self.arms)
        known = [a.name for a in self.arms]
        unknown = [n for n in names if n not in known]
        require(not unknown, f"--arms names unknown arm(s) {unknown}; arms in this config: {known}")
        return [a for a in self.arms if a.name in names]


def _parse_arm(raw: object, where: str) -> ArmSpec:
    require(isinstance(raw, dict), f"{where} must be a table")
    allowed = {"name", "description", "replay", "schedule"}
    unknown = sorted(set(raw) - allowed)
    require(not unknown, f"{where} has unknown key(s) {unknown}; valid keys: {sorted(allowed)}")
    replay = raw.get("replay", 0.0)
    require(
        isinstance(replay, (int, float)) and not isinstance(replay, bool),
        f"{where}.replay must be a number, got {replay!r}",
    )
    schedule = raw.get("schedule", {})
    require(isinstance(schedule, dict), f"{where}.schedule must be a table of [schedule] overrides")
    return ArmSpec(
        name=str(raw.get("name", "")),
        description=str(raw.get("description", "")),
        replay=float(replay),
        schedule=dict(schedule),
    )


def parse_experiment(raw: object) -> ExperimentSpec:
    """The ``[experiment]`` table -> a validated ExperimentSpec; errors name the TOML field."""
    require(isinstance(raw, dict), "the config needs an [experiment] table with [[experiment.arms]]")
    allowed = {"arms", "base", "parallel", "out"}
    unknown = sorted(set(raw) - allowed)
    require(not unknown, f"unknown key(s) {['experiment.' + k for k in unknown]}; valid keys: {sorted(allowed)}")
    arms_raw = raw.get("arms", [])
    require(isinstance(arms_raw, list), "experiment.arms must be an array of tables ([[experiment.arms]])")
    parallel, out = raw.get("parallel", 2), raw.get("out", "runs/cpt-experiment")
    require(
        isinstance(parallel, int) and not isinstance(parallel, bool),
        f"experiment.parallel must be an integer, got {parallel!r}",
    )
    require(isinstance(out, str) and bool(out), f"experiment.out must be a non-empty path, got {out!r}")
    spec = ExperimentSpec(
        arms=[_parse_arm(a, f"experiment.arms[{i}]") for i, a in enumerate(arms_raw)],
        base=parse_base(raw.get("base")),
        parallel=parallel,
        out=out,
    )
    spec.validate()
    return spec


@dataclass
class Experiment:
    """A loaded experiment file: the shared training config (raw and validated) and the arms."""

    path: Path | Traversable
    """The experiment file: a path, or a bundled config inside the installed package."""
    config_raw: dict
    config: Config
    """The experiment's training config, all phases (the first is the base's)."""
    spec: ExperimentSpec
    phase_domains: list[str]
    """The domain each phase trains on (its largest mixture weight in the config); the first is the base's."""
    base_init: str = ""
    """``hf:DIR`` of the base every arm starts from: ``--base``, or the built base once it exists ("" before)."""
    given_base: bool = False
    """The base came from ``--base`` (its own tokenizer) instead of being pre-trained here (byte-level)."""


def phase_domains(cfg: Config) -> list[str]:
    """Each phase's own domain: the one with the largest weight in the base mixture (a tie is an error)."""
    out = []
    for i, phase in enumerate(cfg.data.phases):
        top = max(phase.mixture.values())
        leaders = [d for d, w in phase.mixture.items() if w == top]
        require(
            len(leaders) == 1,
            f"data.phases[{i}].mixture has no single largest domain ({leaders}); the CPT "
            f"experiment needs one own domain per phase",
        )
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
    """The experiment's raw TOML dict for one arm: the phases after the base's, with the arm's replay mixtures and
    schedule overrides, starting from ``exp.base_init`` (ecpt's byte-level model while the base does not exist yet:
    enough to validate everything else)."""
    raw = copy.deepcopy(exp.config_raw)
    raw.setdefault("schedule", {}).update(arm.schedule)
    phases = raw["data"]["phases"]
    for phase, mixture in zip(phases, replay_mixtures(exp.phase_domains, arm.replay)):
        phase["mixture"] = mixture
    raw["data"]["phases"] = phases[1:]
    raw.setdefault("model", {})["init"] = exp.base_init
    if exp.base_init and not exp.given_base and raw["data"].get("tokenizer", "auto") == "auto":
        raw["data"]["tokenizer"] = "bytes"  # the built base is byte-level; its directory has no tokenizer files
    return raw


def arm_config(
    exp: Experiment, arm: ArmSpec, run_dir: Path | None = None, threads: int | None = None, progress: bool | None = None
) -> Config:
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


def load_experiment(
    path: str | Path | None = None, overrides: list[str] | None = None, base: str | None = None
) -> Experiment:
    """Read an experiment file, apply ``--set`` overrides (to the config or to ``experiment.*``) and validate the
    config, the base's run config, the arms and every arm's resulting config before anything trains. ``base``
    ("hf:DIR", from ``--base``): every arm starts from that model and no base is pre-trained."""
    path = resolve_config(path, default=CPT_CONFIG)  # a file, or a bundled config by name; else a ConfigError
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"experiment config {path} is not valid TOML: {exc}") from exc
    raw = apply_overrides(raw, overrides or [])
    spec = parse_experiment(raw.pop("experiment", None))
    config = config_from_dict(copy.deepcopy(raw))
    require(
        config.train.max_steps == 0,
        f"train.max_steps must be 0 in a CPT experiment (every arm runs all its "
        f"phases, or forgetting cannot be measured), got {config.train.max_steps}",
    )
    require(
        len(config.data.phases) >= 2,
        f"a CPT experiment needs at least 2 data phases (the first pre-trains the base, the later ones are the "
        f"domain shifts the arms continue through), got {len(config.data.phases)}",
    )
    exp = Experiment(path=path, config_raw=raw, config=config, spec=spec, phase_domains=phase_domains(config))
    if base is not None:
        from elastic.hf_checkpoint import init_directory, inspect_directory

        directory = init_directory(base, field="--base").resolve()
        inspect_directory(directory, field="--base")  # a missing or unsupported model is an error naming --base
        exp.base_init, exp.given_base = f"hf:{directory}", True
    else:
        from launch.cpt.base_spec import base_config

        base_config(raw, spec.base)  # the base run's config is valid before anything trains
    for arm in spec.arms:
        arm_config(exp, arm)
    return exp


def config_digest(cfg: Config) -> str:
    """Hash of everything that can change an arm's numbers (not where it writes, nor whether it shows a bar)."""
    return hashlib.sha256(json.dumps(outcome_config(cfg), sort_keys=True).encode()).hexdigest()[:16]
