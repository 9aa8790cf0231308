"""Properties of the α-search objective, the subset rungs and the choice of the best trial."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llava_c_ray.config import job_from_dict
from llava_c_ray.errors import LlavaCError
from llava_c_ray.search.objective import (
    best_trial,
    general_threshold,
    group_means,
    keeps_floor,
    objective,
    subset_rungs,
)

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


alpha = st.sampled_from([0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 1.0])
trial_lists = st.lists(
    st.builds(
        lambda a, o, g: {"alpha": a, "objective": o, "general": g, "rung": 4}, alpha, score, score
    ),
    min_size=1,
)


@given(trial_lists, st.floats(min_value=0, max_value=100))
def test_a_floor_kept_by_some_candidate_is_kept_by_the_choice(trials, threshold) -> None:
    best = best_trial(trials, threshold)
    keeping = [t for t in trials if keeps_floor(t, threshold)]
    if keeping:
        assert keeps_floor(best, threshold)
        assert best["objective"] == max(t["objective"] for t in keeping)
    else:  # nobody keeps it: the least damaging candidate
        assert best["general"] == max(t["general"] for t in trials)


@given(trial_lists, st.floats(min_value=0, max_value=100))
def test_a_floor_never_buys_a_higher_objective(trials, threshold) -> None:
    assert best_trial(trials, threshold)["objective"] <= best_trial(trials)["objective"]


@given(trial_lists)
def test_a_zero_floor_or_none_is_the_plain_argmax(trials) -> None:
    assert best_trial(trials, 0.0) == best_trial(trials, None) == best_trial(trials)


@given(trial_lists, st.floats(min_value=0, max_value=100))
def test_ties_under_a_floor_go_to_the_smaller_alpha(trials, threshold) -> None:
    best = best_trial(trials, threshold)
    same = [
        t
        for t in trials
        if keeps_floor(t, threshold) == keeps_floor(best, threshold)
        and t["objective" if keeps_floor(best, threshold) else "general"]
        == best["objective" if keeps_floor(best, threshold) else "general"]
    ]
    assert best["alpha"] == min(t["alpha"] for t in same)


def test_the_floor_is_a_fraction_of_the_stage_start_probe() -> None:
    assert general_threshold(80.0, 0.9) == pytest.approx(72.0)
    assert general_threshold(None, 0.9) is None  # no probe at this stage
    assert general_threshold(80.0, None) is None  # no floor set
    assert keeps_floor({"general": None}, 50.0)  # nothing to hold a candidate to
    assert keeps_floor({"general": 71.9999999999}, 72.0)  # float noise is not a violation


def test_the_floor_outranks_the_objective() -> None:
    trials = [
        {"alpha": 0.2, "objective": 40.0, "general": 85.0, "rung": 4},
        {"alpha": 0.5, "objective": 60.0, "general": 70.0, "rung": 4},
        {"alpha": 1.0, "objective": 55.0, "general": 40.0, "rung": 4},
    ]
    assert best_trial(trials)["alpha"] == 0.5
    assert best_trial(trials, 0.9 * 80.0)["alpha"] == 0.2
    assert best_trial(trials, 0.8 * 80.0)["alpha"] == 0.5
    assert best_trial(trials, 90.0)["alpha"] == 0.2  # none keeps it: the highest probe


def floor_job(root: Path, floor, probe_val: bool = True):
    for name in ("a.json", "v.json", "t.json", "probe.json", "probe_val.json"):
        (root / name).write_text("[]")
    probe = {"path": str(root / "probe.json")}
    if probe_val:
        probe["val"] = str(root / "probe_val.json")
    task = {
        "name": "a",
        "train": str(root / "a.json"),
        "val": str(root / "v.json"),
        "test": str(root / "t.json"),
    }
    return job_from_dict(
        {
            "tasks": [task],
            "general_probe": probe,
            "search": {
                "enabled": True,
                "general_floor": floor,
                "objective": {"new": 1, "old": 1, "general": 0},
            },
        }
    )


@pytest.mark.parametrize("floor", [-0.1, 1.5, float("nan")])
def test_a_floor_outside_zero_one_fails_at_load_time(tmp_path: Path, floor) -> None:
    with pytest.raises(LlavaCError, match="general_floor"):
        floor_job(tmp_path, floor)


def test_a_floor_needs_the_probe_validation_split(tmp_path: Path) -> None:
    assert floor_job(tmp_path, 0.9).search.general_floor == 0.9
    with pytest.raises(LlavaCError, match="general_floor"):
        floor_job(tmp_path, 0.9, probe_val=False)
    assert floor_job(tmp_path, None, probe_val=False).search.general_floor is None
