"""Balanced local steps (``dtrain.control.work_plan``): the assignment is deterministic, monotone in the
rate, bounded, and gives everyone H when speeds are equal."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.control.work_plan import WorkPlan, assign_local_steps

rates_st = st.dictionaries(
    st.sampled_from([f"p{i}" for i in range(8)]), st.floats(min_value=0.0, max_value=1e4, allow_nan=False), min_size=1
)
plan_st = st.builds(
    lambda h, m, tol: WorkPlan(h, min(m, h), True, tol),
    st.integers(1, 500),
    st.integers(0, 50),
    st.floats(min_value=0.0, max_value=0.5),
)


@settings(max_examples=300, deadline=None)
@given(rates_st, plan_st)
def test_assignment_is_bounded_deterministic_and_follows_the_fastest(rates, plan):
    got = assign_local_steps(rates, plan)
    assert got == assign_local_steps(dict(reversed(list(rates.items()))), plan)  # order of members is irrelevant
    assert set(got) == set(rates)
    for steps in got.values():
        assert 0 <= steps <= plan.sync_every
        assert steps == 0 or steps >= max(1, plan.min_steps)
    fastest = max(rates.values())
    for pid, rate in rates.items():
        if rate <= 0 or fastest <= 0:
            assert got[pid] == min(plan.sync_every, max(2, plan.min_steps))  # not measured yet: a probe round
        elif rate == fastest:
            assert got[pid] == plan.sync_every
        elif got[pid]:  # a member that trains finishes when the fastest does H steps (within the tolerance)
            assert got[pid] / rate <= plan.sync_every / (fastest * (1 - plan.tolerance)) * (1 + 1e-9)


@settings(max_examples=300, deadline=None)
@given(
    plan_st,
    st.floats(min_value=1e-3, max_value=1e3),
    st.floats(min_value=1e-3, max_value=1e3),
    st.floats(min_value=1e-3, max_value=1e3),
)
def test_assignment_is_monotone_in_the_rate(plan, fastest, slow, slower):
    lo, hi = sorted((slow, slower))
    fastest = max(fastest, hi)
    got = assign_local_steps({"f": fastest, "a": lo, "b": hi}, plan)
    assert got["a"] <= got["b"] <= got["f"] == plan.sync_every


@pytest.mark.parametrize("noise", [0.0, 0.02, 0.09])
def test_equal_speeds_give_todays_rounds(noise):
    plan = WorkPlan(25, 5, True)
    rates = {"a": 10.0, "b": 10.0 * (1 - noise), "c": 10.0 * (1 - noise / 2)}
    assert assign_local_steps(rates, plan) == {"a": 25, "b": 25, "c": 25}


def test_proportional_steps_and_sitting_out():
    plan = WorkPlan(40, 8, True)
    got = assign_local_steps({"a": 8.0, "b": 8.0, "c": 4.0, "d": 2.0, "e": 1.0, "new": 0.0}, plan)
    assert got == {"a": 40, "b": 40, "c": 20, "d": 10, "e": 0, "new": 8}  # e: 5 < 8 sits out; new: probe


def test_fixed_plans_give_everyone_h():
    assert assign_local_steps({"a": 10.0, "b": 0.5}, WorkPlan(30, 5, False)) == {"a": 30, "b": 30}


def test_non_finite_rates_count_as_unmeasured():
    got = assign_local_steps({"a": math.inf, "b": math.nan, "c": 2.0}, WorkPlan(10, 1, True))
    assert got == {"a": 2, "b": 2, "c": 10}


def test_bad_plans_are_refused():
    for bad in (dict(sync_every=0), dict(sync_every=5, min_steps=6), dict(tolerance=1.0)):
        with pytest.raises(ValueError):
            WorkPlan(**bad)
