"""Each schedule is a pure function tested by a table of (step, expected lr)."""

import math

import pytest

from elastic.config import ScheduleConfig
from elastic.schedule import constant_lr, cosine_rewarm_lr, decay_shape, infinite_lr, lr_at, wsd_lr

S = ScheduleConfig(
    kind="infinite",
    lr_max=1.0,
    lr_min=0.1,
    lr_const=0.5,
    warmup_steps=10,
    cooldown_steps=40,
    cooldown_shape="cosine",
    anneal_steps=20,
    decay_steps=20,
    decay_shape="linear",
)
TOTAL = 200
PHASES = (0, 100, 150)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (5, 0.5), (10, 1.0), (99, 1.0)])
def test_constant(step, expected):
    assert constant_lr(step, S) == pytest.approx(expected)


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.0),
        (5, 0.5),
        (10, 1.0),  # phase 0 warms up from 0
        (55, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))),
        (100, 0.1),
        (105, 0.55),
        (110, 1.0),  # phase 1 re-warms from lr_min
        (130, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 20 / 40))),
        (150, 0.1),
        (160, 1.0),
        (199, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 40))),
    ],
)
def test_cosine_rewarms_at_every_phase(step, expected):
    assert cosine_rewarm_lr(step, S, PHASES, TOTAL) == pytest.approx(expected)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (10, 1.0), (179, 1.0), (180, 1.0), (190, 0.55), (200, 0.1)])
def test_wsd(step, expected):
    assert wsd_lr(step, S, TOTAL) == pytest.approx(expected)


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.0),
        (5, 0.5),
        (10, 1.0),  # warmup
        (30, 0.75),  # cosine cooldown midpoint: 0.5 + 0.5 * 0.5
        (50, 0.5),
        (100, 0.5),
        (179, 0.5),  # constant across phase boundaries, no re-warming
        (180, 0.5),
        (190, 0.5 * (0.1 / 0.5) ** 0.5),  # exponential anneal
        (200, 0.1),
        (250, 0.1),
    ],
)
def test_infinite(step, expected):
    assert infinite_lr(step, S, TOTAL) == pytest.approx(expected)


def test_infinite_without_anneal_stays_constant_forever():
    s = ScheduleConfig(kind="infinite", lr_max=1.0, lr_min=0.1, lr_const=0.5, warmup_steps=10, cooldown_steps=40)
    assert infinite_lr(10_000, s, 200) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "shape,u,expected",
    [
        ("cosine", 0.0, 1.0),
        ("cosine", 0.5, 0.5),
        ("cosine", 1.0, 0.0),
        ("linear", 0.25, 0.75),
        ("inverse_sqrt", 0.0, 1.0),
        ("inverse_sqrt", 1.0, 0.0),
        ("inverse_sqrt", 0.5, 1 - (1 / math.sqrt(6) - 1) / (1 / math.sqrt(11) - 1)),
    ],
)
def test_decay_shapes(shape, u, expected):
    assert decay_shape(u, shape) == pytest.approx(expected)


def test_lr_at_dispatches_on_kind():
    for kind, fn in [
        ("constant", lambda t: constant_lr(t, S)),
        ("wsd", lambda t: wsd_lr(t, S, TOTAL)),
        ("infinite", lambda t: infinite_lr(t, S, TOTAL)),
        ("cosine", lambda t: cosine_rewarm_lr(t, S, PHASES, TOTAL)),
    ]:
        s = ScheduleConfig(**{**S.__dict__, "kind": kind})
        assert [lr_at(t, s, PHASES, TOTAL) for t in range(0, TOTAL, 7)] == [fn(t) for t in range(0, TOTAL, 7)]
