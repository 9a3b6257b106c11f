"""The CPU memory constants (launch/plan/hardware.py, cpu row) are the ones `python -m bench.planner` fits to the
measured points in bench/results/planner.json, and the planner predicts every point, fitted or held out, within
±15%. Pure: the planner's functions on the saved points, no training run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bench.planner import CONSTANTS, HELD_OUT_CONFIG, HELD_OUT_MODEL, RESULTS, TOLERANCE, fit, in_fit, predict
from launch.plan.hardware import HARDWARE


@pytest.fixture(scope="module")
def saved() -> dict:
    return json.loads((RESULTS / "planner.json").read_text())


def test_cpu_constants_are_the_fitted_ones(saved):
    cpu = HARDWARE["cpu"]
    fitted = fit(saved["points"], saved["configs"])
    assert {k: getattr(cpu, k) for k in CONSTANTS} == fitted
    assert saved["fitted_constants"] == fitted  # the saved report was written from these points


def test_every_point_within_tolerance_of_the_plan(saved):
    for p in saved["points"]:
        predicted = predict(p, saved["configs"][p["model"]]).total
        assert p["measured_gib"] == pytest.approx(predicted, rel=TOLERANCE), p["key"]


def test_points_cover_sizes_tuning_and_stages_with_a_held_out_size_and_config(saved):
    points = saved["points"]
    params = {p["model"]: p["params"] for p in points}
    assert len(params) >= 3 and min(params.values()) <= 15e6 and max(params.values()) >= 250e6
    assert any(p["vocab"] >= 262_144 for p in points)
    assert {(p["full"], p["zero_stage"]) for p in points} >= {(f, z) for f in (True, False) for z in (0, 3)}
    assert {p["zero_stage"] for p in points} >= {0, 1, 3}
    held = [p for p in points if not in_fit(p)]
    assert any(p["model"] == HELD_OUT_MODEL for p in held)
    assert any((p["full"], p["zero_stage"]) == HELD_OUT_CONFIG and p["model"] != HELD_OUT_MODEL for p in held)
    assert all(p["model"] != HELD_OUT_MODEL for p in points if in_fit(p))


def test_a_changed_constant_is_caught(saved):
    """The pin bites: a changed constant no longer matches the fit, and moves some point's prediction."""
    cpu = HARDWARE["cpu"]
    fitted = fit(saved["points"], saved["configs"])
    for k in CONSTANTS:
        changed = replace(cpu, **{k: getattr(cpu, k) + 1.0})
        assert {c: getattr(changed, c) for c in CONSTANTS} != fitted
        assert any(predict(p, saved["configs"][p["model"]], changed).total
                   > predict(p, saved["configs"][p["model"]]).total for p in saved["points"]), k
