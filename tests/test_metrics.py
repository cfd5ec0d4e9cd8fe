"""Tests for clbench.metrics: every expected value below is computed by hand."""

from __future__ import annotations

import json

import pytest

from clbench.metrics import (
    AccuracyMatrix,
    ContinualTracker,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)

approx = pytest.approx

# ---------------------------------------------------------------------------
# Accuracy matrix
# ---------------------------------------------------------------------------

R3 = [
    [0.9, 0.1, 0.0],
    [0.95, 0.8, 0.2],
    [0.5, 0.7, 0.9],
]
BASE3 = [0.1, 0.05, 0.1]


def test_matrix_functions_by_hand():
    assert average_accuracy(R3, 0) == approx(0.9)
    assert average_accuracy(R3, 1) == approx((0.95 + 0.8) / 2)  # 0.875
    assert average_accuracy(R3, 2) == approx(0.7)
    # (0.9 + 0.875 + 0.7) / 3
    assert average_incremental_accuracy(R3) == approx(0.825)
    # task 0: max(0.9, 0.95) - 0.5 = 0.45 (max, not the diagonal); task 1: 0.8 - 0.7 = 0.1
    mean_f, per_task = forgetting(R3)
    assert per_task == approx([0.45, 0.1])
    assert mean_f == approx(0.275)
    # ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert backward_transfer(R3) == approx(-0.25)
    # ((0.1 - 0.05) + (0.2 - 0.1)) / 2
    assert forward_transfer(R3, BASE3) == approx(0.075)


def test_matrix_functions_partial_rows():
    partial = [R3[0], R3[1], [None, None, None]]
    mean_f, per_task = forgetting(partial)
    assert per_task == approx([-0.05])  # 0.9 - 0.95: negative forgetting
    assert mean_f == approx(-0.05)
    assert backward_transfer(partial) == approx(0.05)
    assert forward_transfer(partial, BASE3) == approx(0.05)
    assert average_incremental_accuracy(partial) == approx((0.9 + 0.875) / 2)


def test_accuracy_matrix_summary_and_state():
    m = AccuracyMatrix(3)
    m.set_baseline(BASE3)
    for j, row in enumerate(R3):
        m.update(j, row)
    s = m.summary()
    assert s["acc"] == approx(0.7)
    assert s["avg_inc_acc"] == approx(0.825)
    assert s["forgetting"] == approx(0.275)
    assert s["forgetting_per_task"] == approx([0.45, 0.1])
    assert s["bwt"] == approx(-0.25)
    assert s["fwt"] == approx(0.075)
    assert s["matrix"] == R3

    m2 = AccuracyMatrix(1)
    m2.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert m2.summary() == s


def test_accuracy_matrix_none_handling():
    m = AccuracyMatrix(1)
    assert m.summary()["acc"] is None
    m.update(0, [0.8])
    s = m.summary()
    assert s["acc"] == approx(0.8) and s["avg_inc_acc"] == approx(0.8)
    assert s["forgetting"] is None and s["forgetting_per_task"] == []
    assert s["bwt"] is None and s["fwt"] is None

    # Unseen tasks not evaluated (class-IL) -> FWT undefined; no baseline -> undefined.
    m3 = AccuracyMatrix(3)
    m3.set_baseline(BASE3)
    m3.update(0, [0.9, None, None])
    m3.update(1, [0.6, 0.8, None])
    s3 = m3.summary()
    assert s3["fwt"] is None
    assert s3["acc"] == approx(0.7)
    assert s3["forgetting"] == approx(0.3) and s3["bwt"] == approx(-0.3)
    assert forward_transfer(R3, None) is None
    with pytest.raises(ValueError):
        m3.update(0, [0.1])


# ---------------------------------------------------------------------------
# Continual tracker: 3 tasks, evaluation after every iteration
# ---------------------------------------------------------------------------
#
#   exp 0 (iters 1-4):   t0 0.5 0.7 0.9 0.9
#   exp 1 (iters 5-10):  t0 0.7 0.5 0.3 0.5 0.7 0.8   (drop 0.9 -> 0.3, recovers to 0.8)
#                        t1 0.2 0.4 0.6 0.7 0.8 0.9
#   exp 2 (iters 11-13): t0 0.6 0.8 0.9
#                        t1 0.5 0.8 0.9
#                        t2 0.3 0.6 0.9
EXPS = [
    (0, 0, {0: [0.5, 0.7, 0.9, 0.9]}),
    (1, 4, {0: [0.7, 0.5, 0.3, 0.5, 0.7, 0.8], 1: [0.2, 0.4, 0.6, 0.7, 0.8, 0.9]}),
    (2, 10, {0: [0.6, 0.8, 0.9], 1: [0.5, 0.8, 0.9], 2: [0.3, 0.6, 0.9]}),
]


def events():
    """Yield (time, event) in order: ('start', exp, boundary) at time boundary + 0.5,
    ('eval', iteration, accs) at time iteration."""
    for exp, boundary, curves in EXPS:
        yield boundary + 0.5, ("start", exp, boundary)
        n = len(next(iter(curves.values())))
        for step in range(n):
            it = boundary + step + 1
            yield it, ("eval", it, {t: c[step] for t, c in curves.items()})


def run(tracker: ContinualTracker, after: float = -1, upto: float = float("inf")) -> dict[int, dict]:
    """Feed the events with after < time <= upto; return {iteration: update output}."""
    outputs = {}
    for time, ev in events():
        if not after < time <= upto:
            continue
        if ev[0] == "start":
            tracker.start_experience(ev[1], ev[2])
        else:
            outputs[ev[1]] = tracker.update(ev[1], ev[2])
    return outputs


def test_tracker_metrics_by_hand():
    out = run(ContinualTracker(windows=(3, 100)))

    # During exp 0: no previous task -> no min_acc / wf; WC-ACC = A(0, t).
    assert set(out[4]) == {"wc_acc", "wp3", "wp100"}
    assert out[4]["wc_acc"] == approx(0.9)
    assert out[4]["wp3"] == approx(0.4)  # 0.5 -> 0.9 (iters 1 -> 3)

    # Iter 6: min over t0's evaluations after iter 4 = min(0.7, 0.5); WC = (0.4 + 0.5) / 2.
    assert out[6]["min_acc"] == approx(0.5)
    assert out[6]["wc_acc"] == approx(0.45)

    # End of exp 1 (iter 10): the 0.9 at iter 4 is not counted in the minimum.
    o = out[10]
    assert o["min_acc"] == approx(0.3)
    assert o["wc_acc"] == approx(0.5 * 0.9 + 0.5 * 0.3)
    # t0 within 3 consecutive evaluations drops at most 0.4 (0.9 -> 0.5, 0.7 -> 0.3);
    # the long window sees the full 0.9 -> 0.3.
    assert o["wf3"] == approx(0.4)
    assert o["wf100"] == approx(0.6)
    # WP: t0 0.4 (w=3) / 0.5 (0.3 -> 0.8); t1 0.4 (0.2 -> 0.6) / 0.7 (0.2 -> 0.9)
    assert o["wp3"] == approx(0.4)
    assert o["wp100"] == approx((0.5 + 0.7) / 2)

    # End of exp 2 (iter 13): mins t0 0.3, t1 0.5 (evals after iter 10 only).
    o = out[13]
    assert o["min_acc"] == approx(0.4)
    assert o["wc_acc"] == approx(0.9 / 3 + (2 / 3) * 0.4)
    assert o["wf3"] == approx((0.4 + 0.4) / 2)  # t1: 0.9 -> 0.5
    assert o["wf100"] == approx((0.6 + 0.4) / 2)
    assert o["wp3"] == approx((0.4 + 0.4 + 0.6) / 3)
    assert o["wp100"] == approx((0.6 + 0.7 + 0.6) / 3)  # t0 now 0.3 -> 0.9


def test_tracker_per_task_min_and_summary():
    tr = ContinualTracker(windows=(3, 100))
    run(tr)
    assert tr.per_task_min() == approx({0: 0.3, 1: 0.5})
    s = tr.summary()
    assert s["min_acc"] == approx(0.4)
    assert s["wf100"] == approx(0.5)
    assert s["mean_gap"] == approx((0.6 + 0.3) / 2)
    assert len(s["stability_gaps"]) == 2
    json.dumps(s)  # loggers write it as JSON


@pytest.mark.parametrize(
    "tol, rec1, rec2, rec2_t0, rec2_t1",
    [
        # tol 0: t0 never gets back to 0.9 within exp 1 (its 0.9 at iter 13 is exp 2).
        (0.0, None, 13 - 10, 12 - 10, 13 - 10),
        (0.1, 10 - 4, 12 - 10, 12 - 10, 12 - 10),  # >= 0.8 at iter 10; mean >= 0.75 at 12
        (0.2, 9 - 4, 12 - 10, 12 - 10, 12 - 10),  # >= 0.7 at iter 9
    ],
)
def test_stability_gaps(tol, rec1, rec2, rec2_t0, rec2_t1):
    tr = ContinualTracker(windows=(3,), recovery_tol=tol)
    run(tr)
    g1, g2 = tr.stability_gaps()

    assert (g1["experience"], g1["iteration"]) == (1, 4)
    assert g1["pre_acc"] == approx(0.9)
    assert g1["min_acc"] == approx(0.3)
    assert g1["gap"] == approx(0.6)
    assert g1["iters_to_min"] == 3  # min at iter 7
    assert g1["recovery_iters"] == rec1
    assert set(g1["per_task"]) == {0}
    assert g1["per_task"][0]["gap"] == approx(0.6)
    assert g1["per_task"][0]["recovery_iters"] == rec1

    # Boundary 2: mean of t0, t1: pre (0.8 + 0.9) / 2, then 0.55, 0.8, 0.9.
    assert (g2["experience"], g2["iteration"]) == (2, 10)
    assert g2["pre_acc"] == approx(0.85)
    assert g2["min_acc"] == approx(0.55)
    assert g2["gap"] == approx(0.3)
    assert g2["iters_to_min"] == 1
    assert g2["recovery_iters"] == rec2
    t0, t1 = g2["per_task"][0], g2["per_task"][1]
    assert (t0["pre_acc"], t0["min_acc"], t0["iters_to_min"]) == approx((0.8, 0.6, 1))
    assert t0["gap"] == approx(0.2) and t0["recovery_iters"] == rec2_t0
    assert (t1["pre_acc"], t1["min_acc"], t1["iters_to_min"]) == approx((0.9, 0.5, 1))
    assert t1["gap"] == approx(0.4) and t1["recovery_iters"] == rec2_t1


def test_stability_gap_in_progress():
    tr = ContinualTracker()
    run(tr, upto=11)
    g2 = tr.stability_gaps()[1]
    assert g2["min_acc"] == approx(0.55) and g2["iters_to_min"] == 1
    assert g2["recovery_iters"] is None


def test_recovery_resets_on_new_minimum():
    tr = ContinualTracker()
    tr.start_experience(0, 0)
    tr.update(1, {0: 0.9})
    tr.start_experience(1, 1)
    # 0.5 (min), 0.9 (recovered), 0.2 (new, lower min), 0.6 (not recovered)
    for it, a in zip(range(2, 6), [0.5, 0.9, 0.2, 0.6]):
        tr.update(it, {0: a, 1: 0.5})
    g = tr.stability_gaps()[0]
    assert g["min_acc"] == approx(0.2) and g["gap"] == approx(0.7)
    assert g["iters_to_min"] == 3
    assert g["recovery_iters"] is None
    tr.update(6, {0: 0.95, 1: 0.5})
    assert tr.stability_gaps()[0]["recovery_iters"] == 5


def test_single_task_none_handling():
    tr = ContinualTracker(windows=(10,))
    tr.start_experience(0, 0)
    out = tr.update(1, {0: 0.4})
    assert out == {"wc_acc": approx(0.4), "wp10": 0.0}
    out = tr.update(2, {0: 0.6})
    assert "min_acc" not in out and "wf10" not in out
    assert out["wp10"] == approx(0.2)
    s = tr.summary()
    assert s["min_acc"] is None and s["wf10"] is None
    assert s["stability_gaps"] == [] and s["mean_gap"] is None
    assert tr.per_task_min() == {}


def test_boundary_without_pre_eval_and_eval_at_boundary():
    # No evaluation before the boundary -> pre/gap/recovery None, min still reported.
    tr = ContinualTracker()
    tr.start_experience(0, 0)
    tr.start_experience(1, 5)
    tr.update(6, {0: 0.5, 1: 0.1})
    g = tr.stability_gaps()[0]
    assert g["pre_acc"] is None and g["gap"] is None and g["recovery_iters"] is None
    assert g["min_acc"] == approx(0.5) and g["iters_to_min"] == 1
    assert tr.summary()["mean_gap"] is None

    # A pre-training evaluation at the boundary iteration is "before" the boundary:
    # it sets pre_acc but is not part of min-ACC (n > |T_0| required).
    tr = ContinualTracker()
    tr.start_experience(0, 0)
    tr.update(1, {0: 0.8})
    tr.update(2, {0: 0.9})
    tr.start_experience(1, 2)
    out = tr.update(2, {0: 0.95, 1: 0.1})
    assert "min_acc" not in out and "wc_acc" not in out
    assert tr.stability_gaps()[0]["pre_acc"] == approx(0.95)
    out = tr.update(3, {0: 0.4, 1: 0.5})
    assert out["min_acc"] == approx(0.4)
    assert out["wc_acc"] == approx((0.5 + 0.4) / 2)
    assert tr.stability_gaps()[0]["gap"] == approx(0.55)


@pytest.mark.parametrize("cut", [6, 10])  # mid exp 1 / right before the boundary of exp 2
def test_state_dict_round_trip_mid_run(cut):
    full = ContinualTracker(windows=(3, 100), recovery_tol=0.1)
    ref = run(full)

    first = ContinualTracker(windows=(3, 100), recovery_tol=0.1)
    run(first, upto=cut)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ContinualTracker()  # constructor arguments come from the state
    resumed.load_state_dict(state)
    out = run(resumed, after=cut)
    run(first, after=cut)

    assert sorted(out) == list(range(cut + 1, 14))
    for it, o in out.items():
        assert o == ref[it]
    assert resumed.summary() == full.summary() == first.summary()
    assert resumed.summary()["stability_gaps"][0]["recovery_iters"] == 6
