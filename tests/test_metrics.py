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
        # >= 0.7 at iter 9; t0's drop at boundary 2 (0.8 -> 0.6) is not more than the tolerance: no gap
        (0.2, 9 - 4, 12 - 10, None, 12 - 10),
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
    assert (t0["pre_acc"], t0["min_acc"], t0["drop"]) == approx((0.8, 0.6, 0.2))
    if tol < 0.2:
        assert t0["has_gap"] is True and t0["iters_to_min"] == 1
        assert t0["gap"] == approx(0.2) and t0["recovery_iters"] == rec2_t0
    else:
        assert t0["has_gap"] is False
        assert t0["gap"] is None and t0["iters_to_min"] is None and t0["recovery_iters"] is None
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
    # No evaluation before the boundary -> pre/gap/recovery None (whether there is a gap
    # is unknown), min still reported.
    tr = ContinualTracker()
    tr.start_experience(0, 0)
    tr.start_experience(1, 5)
    tr.update(6, {0: 0.5, 1: 0.1})
    g = tr.stability_gaps()[0]
    assert g["pre_acc"] is None and g["gap"] is None and g["recovery_iters"] is None
    assert g["has_gap"] is None and g["drop"] is None and g["iters_to_min"] is None
    assert g["min_acc"] == approx(0.5)
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


# ---------------------------------------------------------------------------
# FWT: undefined in class-IL, recomputable from the run directory elsewhere
# ---------------------------------------------------------------------------


def test_accuracy_matrix_fwt_note_and_baseline_in_summary():
    m = AccuracyMatrix(3, fwt_undefined="class-IL: masked")
    m.set_baseline(BASE3)
    for j, row in enumerate(R3):
        m.update(j, row)
    s = m.summary()
    assert s["fwt"] is None and s["fwt_note"] == "class-IL: masked"
    assert s["baseline_acc"] == BASE3
    assert s["bwt"] == approx(-0.25)  # the other metrics are untouched
    m2 = AccuracyMatrix(3)
    m2.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert m2.summary() == s

    no_base = AccuracyMatrix(3)
    for j, row in enumerate(R3):
        no_base.update(j, row)
    s = no_base.summary()
    assert s["fwt"] is None and s["baseline_acc"] is None and "baseline" in s["fwt_note"]


@pytest.mark.parametrize("scenario", ["class_incremental", "task_incremental", "domain_incremental"])
def test_fwt_from_the_run_directory(tmp_path, scenario):
    from clbench.config import load_config
    from clbench.engine import run

    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run", f"scenario={scenario}", "scenario.n_tasks=2",
                             "strategy=finetune", "train.iterations=3", "eval.every=0", "eval.subset_size=50",
                             "logging.console=false", "logging.tensorboard=false", "checkpoint.enabled=false"])
    run(cfg)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    R, b = saved["matrix"], saved["baseline_acc"]
    assert (saved["window_unit"], saved["wf_tasks"], saved["gap_window"]) == ("iterations", "previous", 100)
    assert len(b) == 2 and all(0.0 <= a <= 1.0 for a in b)
    if scenario == "class_incremental":
        # task 1's classes are masked before it is trained: R[0][1] = b_1 = 0 whatever the model
        assert R[0][1] == 0.0 and b[1] == 0.0
        assert saved["fwt"] is None and "class-IL" in saved["fwt_note"]
    else:
        assert saved["fwt_note"] is None
        assert saved["fwt"] == approx(R[0][1] - b[1])  # (1 / (T-1)) * sum_{i=1}^{T-1} (R[i-1][i] - b_i), T = 2


# ---------------------------------------------------------------------------
# Windowed forgetting / plasticity: windows in iterations, eval period 2
# ---------------------------------------------------------------------------
#
#   iteration:  2    4    6    8  | 10   12   14   16      (exp 1 starts after iteration 8)
#   t0:        0.2  0.6  0.5  0.9 | 0.4  0.7  0.3  0.8
#   t1:                           | 0.1  0.5  0.4  0.6
#
# Window w = 5 iterations: pairs m < n with n - m < 5, i.e. 2 or 4 iterations apart.
#   WF t0 = 0.5 (iter 8 -> 10; 8 -> 14 would give 0.6 but is 6 iterations apart)
#   WP t0 = 0.5 (14 -> 16; 2 -> 8 would give 0.7)
#   WF t1 = 0.1 (12 -> 14);  WP t1 = 0.4 (10 -> 12; 10 -> 16 would give 0.5)
# A window of 2 iterations holds no two evaluations at period 2: not computed.
PERIOD2 = [(2, {0: 0.2}), (4, {0: 0.6}), (6, {0: 0.5}), (8, {0: 0.9}),
           (10, {0: 0.4, 1: 0.1}), (12, {0: 0.7, 1: 0.5}), (14, {0: 0.3, 1: 0.4}), (16, {0: 0.8, 1: 0.6})]


def feed_period2(tracker: ContinualTracker) -> dict[int, dict]:
    tracker.start_experience(0, 0)
    out = {}
    for it, accs in PERIOD2:
        if it == 10:
            tracker.start_experience(1, 8)
        out[it] = tracker.update(it, accs)
    return out


@pytest.mark.parametrize("wf_tasks, wf_exp0, wf_final", [
    ("previous", None, 0.5),  # mean over previous tasks: t0 only; undefined during exp 0
    ("seen", 0.1, (0.5 + 0.1) / 2),  # authors' code: every tracked task, the one in training included
])
def test_windowed_metrics_in_iterations_with_period_2(wf_tasks, wf_exp0, wf_final):
    tr = ContinualTracker(windows=(2, 5), wf_tasks=wf_tasks, period=2)
    out = feed_period2(tr)
    assert out[8].get("wf5") == (None if wf_exp0 is None else approx(wf_exp0))  # t0: 0.6 -> 0.5 (iters 4 -> 6)
    assert out[8]["wp5"] == approx(0.4)  # 0.2 -> 0.6 and 0.5 -> 0.9
    assert out[16]["wf5"] == approx(wf_final)
    assert out[16]["wp5"] == approx((0.5 + 0.4) / 2)  # WP always over every seen task
    assert not any(k in o for o in out.values() for k in ("wf2", "wp2"))
    s = tr.summary()
    assert s["wf5"] == approx(wf_final) and s["wf2"] is None and s["wp2"] is None
    assert s["window_unit"] == "iterations" and s["wf_tasks"] == wf_tasks

    resumed = ContinualTracker()
    resumed.load_state_dict(json.loads(json.dumps(tr.state_dict())))
    assert resumed.summary() == s


def test_wf_tasks_and_gap_window_are_eval_config_keys():
    from clbench.config import load_config

    cfg = load_config(None, ["eval.wf_tasks=seen", "eval.gap_window=7", "eval.every=3", "eval.windows=[3,10]"])
    assert (cfg.eval.wf_tasks, cfg.eval.gap_window) == ("seen", 7)
    assert load_config(None, []).eval.wf_tasks == "previous"


# ---------------------------------------------------------------------------
# Stability gap: only a dip within the gap window counts
# ---------------------------------------------------------------------------


def dip_and_recover(n: int) -> float:  # 0.5, 0.3, 0.6, 0.88, 0.9, ...
    return {6: 0.5, 7: 0.3, 8: 0.6, 9: 0.88}.get(n, 0.9)


def monotone_rise(n: int) -> float:  # 0.91, 0.92, ...
    return round(0.9 + 0.01 * (n - 5), 6)


def slow_drift(n: int) -> float:  # -0.004 per iteration: 0.86 at the window's end, 0.78 at the experience's
    return round(0.9 - 0.004 * (n - 5), 6)


@pytest.mark.parametrize("curve, has_gap, min_acc, gap, to_min, recovery", [
    (dip_and_recover, True, 0.3, 0.6, 7 - 5, 9 - 5),  # 0.88 >= 0.9 - 0.05 at iteration 9
    (monotone_rise, False, 0.91, None, None, None),
    (slow_drift, False, 0.86, None, None, None),  # window min 0.86: drop 0.04 <= tol 0.05
])
def test_stability_gap_definition_on_synthetic_curves(curve, has_gap, min_acc, gap, to_min, recovery):
    tr = ContinualTracker(windows=(10,), recovery_tol=0.05, gap_window=10)
    tr.start_experience(0, 0)
    for n in range(1, 6):  # task 0 learned: 0.5 ... 0.9
        tr.update(n, {0: 0.4 + 0.1 * n})
    tr.start_experience(1, 5)
    for n in range(6, 36):  # 30 iterations of task 1
        tr.update(n, {0: curve(n), 1: 0.5})
    (g,) = tr.stability_gaps()
    assert g["pre_acc"] == approx(0.9)
    assert g["min_acc"] == approx(min_acc) and g["drop"] == approx(0.9 - min_acc)
    assert g["has_gap"] is has_gap and g["per_task"][0]["has_gap"] is has_gap
    assert g["gap"] == (None if gap is None else approx(gap))
    assert g["iters_to_min"] == to_min and g["recovery_iters"] == recovery
    s = tr.summary()
    assert s["n_gaps"] == int(has_gap) and s["mean_gap"] == (None if gap is None else approx(gap))


def test_gap_table_shows_none_for_a_boundary_without_gap():
    from clbench.logging.summary import gap_rows

    rows = gap_rows({"stability_gaps": [
        {"experience": 1, "pre_acc": 0.9, "min_acc": 0.3, "has_gap": True, "gap": 0.6, "iters_to_min": 2, "recovery_iters": 4},
        {"experience": 2, "pre_acc": 0.9, "min_acc": 0.91, "has_gap": False, "gap": None, "iters_to_min": None,
         "recovery_iters": None},
    ]})
    assert rows == [["1", "0.9000", "0.3000", "0.6000", "2", "4"], ["2", "0.9000", "0.9100", "none", "–", "–"]]
