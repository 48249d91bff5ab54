"""The CPT metrics on hand-made loss curves whose forgetting, stability gap and recovery are known exactly."""

import pytest

from launch.cpt.metrics import (
    CurveError,
    LossCurves,
    average_final_loss,
    cpt_metrics,
    forgetting,
    phase_end_losses,
    stability_gap,
    stability_gaps,
)
from launch.cpt.spec import replay_mixtures

# Three phases of 10 steps (tau = 10, 20, 30), evaluated every 2 steps. Domain a is trained in phase 0, b in 1, c in 2.
STEPS = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]
A = [
    5.0,
    4.0,
    3.5,
    3.2,
    3.1,
    3.0,  # phase 0: learns a; L_a(tau_0) = 3.0
    3.8,
    3.4,
    3.1,
    3.05,
    3.2,  # phase 1: gap peaks at step 12 (+0.8), back to <= 3.08 at step 18
    3.6,
    3.3,
    3.3,
    3.4,
    3.5,
]  # phase 2: peak +0.4 at step 22 over 3.2, never back to <= 3.24
B = [
    5.0,
    4.5,
    4.4,
    4.3,
    4.2,
    4.1,
    3.5,
    3.0,
    2.8,
    2.6,
    2.5,  # phase 1: learns b; L_b(tau_1) = 2.5
    2.9,
    3.0,
    3.1,
    3.0,
    2.95,
]  # phase 2: rises to 3.1 at step 26 (+0.6), never back to <= 2.56
C = [5.0, 4.9, 4.8, 4.7, 4.6, 4.5, 4.4, 4.3, 4.2, 4.1, 4.0, 3.0, 2.5, 2.2, 2.1, 2.0]
CURVES = LossCurves.from_lists(STEPS, {"a": A, "b": B, "c": C})
DOMAINS = ["a", "b", "c"]
ENDS = [10, 20, 30]


def test_phase_end_losses_are_the_values_at_each_tau():
    assert phase_end_losses(CURVES, ENDS) == [
        {"a": 3.0, "b": 4.1, "c": 4.5},
        {"a": 3.2, "b": 2.5, "c": 4.0},
        {"a": 3.5, "b": 2.95, "c": 2.0},
    ]


def test_forgetting_is_final_minus_own_phase_end_and_rise_from_best():
    f = {x.domain: x for x in forgetting(CURVES, DOMAINS, ENDS)}
    assert f["a"].forgetting == pytest.approx(0.5)  # 3.5 - 3.0
    assert f["a"].best_loss == 3.0 and f["a"].best_step == 10
    assert f["a"].rise_from_best == pytest.approx(0.5)
    assert f["a"].worst_after == 3.8  # the stability-gap peak at step 12
    assert f["b"].forgetting == pytest.approx(0.45)  # 2.95 - 2.5
    assert f["b"].worst_after == 3.1
    assert f["c"].forgetting == 0.0 and f["c"].worst_after is None  # the last domain has nothing after its phase


def test_rise_from_best_differs_from_forgetting_when_the_best_came_later():
    # Domain a keeps improving in the next phase (positive transfer): F is negative, the rise from best is not.
    curves = LossCurves.from_lists([0, 5, 10, 15, 20], {"a": [4.0, 3.0, 2.5, 2.8, 2.9], "b": [4.0] * 5})
    (fa, _) = forgetting(curves, ["a", "b"], [5, 20])
    assert fa.forgetting == pytest.approx(2.9 - 3.0)
    assert fa.best_loss == 2.5 and fa.best_step == 10
    assert fa.rise_from_best == pytest.approx(0.4)


def test_stability_gap_peak_step_and_recovery():
    gap = stability_gap(CURVES, "a", ref_step=10, phase_end=20, shift=1)
    assert gap.ref_loss == 3.0
    assert gap.peak_rise == pytest.approx(0.8) and gap.peak_step == 12
    # Threshold 3.0 + 0.1 * 0.8 = 3.08: step 16 is at 3.1 (above), step 18 at 3.05 (below) -> 18 - 10 = 8 steps.
    assert gap.recovery_steps == 8 and gap.recovered


def test_stability_gap_that_never_recovers_within_the_phase():
    gap = stability_gap(CURVES, "b", ref_step=20, phase_end=30, shift=2)
    assert gap.peak_rise == pytest.approx(0.6) and gap.peak_step == 26
    assert gap.recovery_steps is None and not gap.recovered


def test_recovery_counts_only_evaluations_at_or_after_the_peak():
    # The loss is still at the reference right after the shift (step 12): that is before the peak, not a recovery.
    curves = LossCurves.from_lists(
        [0, 10, 12, 14, 16, 18, 20], {"a": [5.0, 2.0, 2.0, 3.0, 2.5, 2.05, 2.2], "b": [5.0] * 7}
    )
    gap = stability_gap(curves, "a", ref_step=10, phase_end=20, shift=1)
    assert gap.peak_rise == pytest.approx(1.0) and gap.peak_step == 14
    assert gap.recovery_steps == 8  # step 18: 2.05 <= 2.0 + 0.1


def test_no_gap_when_the_loss_never_rises():
    curves = LossCurves.from_lists([0, 10, 15, 20], {"a": [5.0, 3.0, 2.9, 2.95], "b": [5.0, 4.0, 3.0, 2.0]})
    gap = stability_gap(curves, "a", ref_step=10, phase_end=20, shift=1)
    assert gap.peak_rise == pytest.approx(-0.05) and gap.peak_step == 20
    assert gap.recovery_steps == 0


def test_stability_gaps_cover_every_earlier_domain_at_every_shift():
    gaps = stability_gaps(CURVES, DOMAINS, ENDS)
    assert [(g.shift, g.domain) for g in gaps] == [(1, "a"), (2, "a"), (2, "b")]
    a2 = gaps[1]
    assert a2.ref_loss == 3.2 and a2.peak_rise == pytest.approx(0.4) and a2.peak_step == 22
    assert a2.recovery_steps is None  # threshold 3.24; the loss never drops below 3.3 in phase 2


def test_average_final_loss():
    assert average_final_loss(CURVES) == pytest.approx((3.5 + 2.95 + 2.0) / 3)
    assert average_final_loss(CURVES, ["a", "c"]) == pytest.approx(2.75)


def test_cpt_metrics_json_shape():
    d = cpt_metrics(CURVES, DOMAINS, ENDS).to_dict()
    assert set(d) == {"phase_end_losses", "final_losses", "average_final_loss", "forgetting", "stability_gaps"}
    assert d["final_losses"] == {"a": 3.5, "b": 2.95, "c": 2.0}
    assert [g["recovered"] for g in d["stability_gaps"]] == [True, False, False]


def test_a_phase_end_without_evaluation_is_an_error_naming_the_step():
    curves = LossCurves.from_lists([0, 4, 8], {"a": [3.0, 2.0, 2.5], "b": [3.0, 3.0, 2.0]})
    with pytest.raises(CurveError, match="no evaluation at step 5"):
        forgetting(curves, ["a", "b"], [5, 8])


def test_an_unfinished_run_is_refused():
    with pytest.raises(CurveError, match="did not finish"):
        cpt_metrics(CURVES, DOMAINS, [10, 20, 40])


def test_ragged_curves_are_refused():
    with pytest.raises(CurveError, match="domain 'a' has 2 losses for 3 evaluation steps"):
        LossCurves.from_lists([0, 1, 2], {"a": [1.0, 2.0]})


@pytest.mark.parametrize(
    "replay,expected",
    [
        (0.0, [{"a": 1.0}, {"b": 1.0}, {"c": 1.0}]),
        (0.1, [{"a": 1.0}, {"b": 0.9, "a": 0.1}, {"c": 0.9, "a": 0.05, "b": 0.05}]),
    ],
)
def test_replay_mixtures(replay, expected):
    got = replay_mixtures(["a", "b", "c"], replay)
    assert [{k: pytest.approx(v) for k, v in m.items()} for m in got] == expected
