"""The CPT base's stopping rule, its [experiment.base] table and the base run's config, on hand-made values."""

import pytest

from elastic.config import ConfigError
from launch.cpt.base_spec import BaseSpec, base_config, base_digest, base_raw, flattened, parse_base


@pytest.mark.parametrize(
    "losses,patience,min_improvement,expected",
    [
        ([3.0, 2.0], 2, 0.01, False),  # not more than K evaluations yet
        ([3.0, 2.0, 1.99, 1.985], 2, 0.01, True),  # last 2 improve 2.0 by 0.015 / 2.0 = 0.75% < 1%
        ([3.0, 2.0, 1.99, 1.97], 2, 0.01, False),  # 0.03 / 2.0 = 1.5% > 1%
        ([3.0, 2.0, 2.1, 2.2], 2, 0.01, True),  # worse than before: no improvement at all
        ([3.0, 2.0, 2.1, 1.5], 2, 0.01, False),  # a noisy rise then a new best still counts as improving
        ([2.0, 1.0, 0.99], 1, 0.0, False),  # min_improvement 0: stop only when the loss stops falling
        ([2.0, 1.0, 1.0], 1, 0.0, True),
    ],
)
def test_flattened(losses, patience, min_improvement, expected):
    assert flattened(losses, patience, min_improvement) is expected


def test_defaults_and_overrides():
    spec = parse_base({"patience": 3, "schedule": {"warmup_steps": 7}})
    assert spec.patience == 3 and spec.eval_interval == BaseSpec().eval_interval
    assert spec.schedule == {"kind": "infinite", "anneal_steps": 0, "warmup_steps": 7}  # the defaults stay
    assert parse_base(None) == BaseSpec()


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"patience": 0}, "experiment.base.patience must be >= 1"),
        ({"min_improvement": 1.5}, "experiment.base.min_improvement must be in [0, 1)"),
        ({"eval_interval": "10"}, "experiment.base.eval_interval must be an integer"),
        ({"threads": -1}, "experiment.base.threads must be >= 0"),
        ({"stop": 1}, "experiment.base has unknown key(s) ['stop']"),
        ({"schedule": {"lr": 1}}, "experiment.base.schedule has unknown key(s) ['lr']"),
    ],
)
def test_bad_table_names_the_field(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_base(raw)


def _experiment_raw(tiny_raw: dict) -> dict:
    tiny_raw["data"]["phases"] = [
        {"name": "prose", "tokens": 4096, "mixture": {"prose": 0.9, "c": 0.1}},
        {"name": "python", "tokens": 1024, "mixture": {"python": 1.0}},
    ]
    tiny_raw["model"]["init"] = ""
    return tiny_raw


def test_base_trains_the_first_phase_domain_only(tiny_raw):
    raw = base_raw(_experiment_raw(tiny_raw), parse_base({"eval_interval": 7}))
    assert raw["data"]["phases"] == [{"name": "prose", "tokens": 4096, "mixture": {"prose": 1.0}}]
    assert raw["train"]["eval_interval"] == 7 and raw["schedule"]["kind"] == "infinite"


@pytest.mark.parametrize("schedule", [{"kind": "cosine"}, {"kind": "wsd"}, {"kind": "infinite", "anneal_steps": 10}])
def test_schedule_that_depends_on_the_length_is_refused(tiny_raw, schedule):
    with pytest.raises(ConfigError, match="experiment.base.schedule must not depend on the run's length"):
        base_config(_experiment_raw(tiny_raw), parse_base({"schedule": schedule}))


def test_digest_follows_what_decides_the_weights(tiny_raw):
    raw = _experiment_raw(tiny_raw)
    spec = parse_base({})
    digest = base_digest(base_config(raw, spec), spec, "corpus-1")
    assert base_digest(base_config(raw, parse_base({"threads": 1})), spec, "corpus-1") == digest
    assert base_digest(base_config(raw, spec), parse_base({"threads": 1}), "corpus-1") == digest
    assert base_digest(base_config(raw, spec), spec, "corpus-2") != digest
    assert base_digest(base_config(raw, spec), parse_base({"patience": 9}), "corpus-1") != digest
    raw["train"]["seed"] = raw["train"].get("seed", 0) + 1
    assert base_digest(base_config(raw, spec), spec, "corpus-1") != digest
