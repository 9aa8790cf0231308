"""Properties of the α-search objective, the subset rungs and the choice of the best trial."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llava_c_ray.search.objective import best_trial, group_means, objective, subset_rungs

score = st.floats(min_value=0, max_value=100)
weight = st.floats(min_value=0, max_value=10)


@given(score, score, score, weight, weight, weight)
def test_objective_is_a_weighted_mean_between_the_group_means(new, old, gen, wn, wo, wg) -> None:
    weights = {"new": wn, "old": wo, "general": wg}
    means = {"new": new, "old": old, "general": gen}
    if wn == wo == wg == 0:
        with pytest.raises(ValueError):
            objective(means, weights)
        return
    value = objective(means, weights)
    weighted = [means[g] for g in means if weights[g] > 0]
    assert min(weighted) - 1e-9 <= value <= max(weighted) + 1e-9


def test_a_group_without_tasks_drops_out_of_the_mean() -> None:
    means = group_means({"a": 80.0, "p": 20.0}, {"new": ["a"], "old": [], "general": ["p"]})
    assert means == {"new": 80.0, "old": None, "general": 20.0}
    assert objective(means, {"new": 1, "old": 5, "general": 1}) == pytest.approx(50.0)
    assert objective(means, {"new": 3, "old": 0, "general": 1}) == pytest.approx(65.0)


def test_only_weighted_groups_without_tasks_is_an_error() -> None:
    with pytest.raises(ValueError, match="positive objective weight"):
        objective({"new": 10.0, "old": None, "general": None}, {"new": 0, "old": 1, "general": 1})


@given(st.integers(min_value=1, max_value=10_000), st.booleans())
def test_rungs_grow_and_end_at_the_subset_size(size: int, asha: bool) -> None:
    rungs = subset_rungs(size, asha)
    assert rungs[-1] == size
    assert rungs == sorted(set(rungs))
    assert all(r >= 1 for r in rungs)
    assert len(rungs) == 1 or asha


@given(st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]), score), min_size=1))
def test_best_trial_is_the_argmax_with_ties_to_the_smaller_alpha(pairs) -> None:
    trials = [{"alpha": a, "objective": o, "rung": 4} for a, o in pairs]
    best = best_trial(trials)
    top = max(o for _, o in pairs)
    assert best["objective"] == top
    assert best["alpha"] == min(a for a, o in pairs if o == top)


def test_trials_stopped_early_are_not_chosen() -> None:
    trials = [
        {"alpha": 0.1, "objective": 90.0, "rung": 1},
        {"alpha": 0.2, "objective": 40.0, "rung": 4},
        {"alpha": 0.5, "objective": 30.0, "rung": 4},
    ]
    assert best_trial(trials)["alpha"] == 0.2
