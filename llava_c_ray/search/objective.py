"""The α-search objective and the choice of the best trial: pure functions, no Ray.

A candidate θ̃(α) is scored on validation subsets of three groups: the stage's new task(s), the
tasks learned before, and the general probe. The objective is the weighted mean of the group means
(`search.objective`), over the groups that exist at this stage (stage 1 has no old tasks).

With `search.general_floor = f` the choice is constrained: a candidate whose probe score falls
below f × the stage-start model's probe score (on the same validation records) is ranked after
every candidate that keeps it. Among those that keep it the objective decides; among those that do
not, the higher probe score does (the least damaging candidate, when none keeps the floor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

GROUPS = ("new", "old", "general")


def group_means(
    task_scores: Mapping[str, float], groups: Mapping[str, Sequence[str]]
) -> dict[str, float | None]:
    """Mean score of each group's tasks; None for a group without tasks."""
    means: dict[str, float | None] = {}
    for group in GROUPS:
        names = groups.get(group, ())
        means[group] = sum(task_scores[n] for n in names) / len(names) if names else None
    return means


def objective(means: Mapping[str, float | None], weights: Mapping[str, float]) -> float:
    """Σ_g w_g·mean_g / Σ_g w_g over the groups present; raises if no weighted group is present."""
    present = [g for g in GROUPS if means.get(g) is not None and weights[g] > 0]
    if not present:
        raise ValueError("no group with a positive objective weight has tasks to score")
    total = sum(weights[g] for g in present)
    return sum(
        weights[g] / total * means[g] for g in present
    )  # normalised first: tiny weights stay exact


def general_threshold(reference: float | None, floor: float | None) -> float | None:
    """The probe score a candidate must keep: floor × the stage-start probe score.

    None (no constraint) when no floor is set or the stage has no probe to measure.
    """
    if floor is None or reference is None:
        return None
    return floor * reference


def keeps_floor(trial: Mapping, threshold: float | None) -> bool:
    """True when the candidate's probe score is at least `threshold` (always, without one)."""
    general = trial.get("general")
    return threshold is None or general is None or general >= threshold - 1e-9


def rank_key(trial: Mapping, threshold: float | None) -> tuple:
    """Sort key, larger is better: candidates that keep the floor first, ranked by objective;
    the others after them, ranked by probe score; ties go to the smaller α."""
    if keeps_floor(trial, threshold):
        return (1, trial["objective"], -trial["alpha"])
    return (0, trial["general"], -trial["alpha"])


def subset_rungs(size: int, asha: bool) -> list[int]:
    """Records per task scored by each rung: [size], or ¼, ½ and all of it for ASHA."""
    if not asha:
        return [size]
    return sorted({max(1, math.ceil(size / 4)), max(1, math.ceil(size / 2)), size})


def best_trial(trials: Sequence[Mapping], threshold: float | None = None) -> Mapping:
    """The best trial (by `rank_key`) among those scored on the full subset.

    Without a threshold: the highest objective, ties to the smaller α — the candidate closer to
    the previous model.
    """
    if not trials:
        raise ValueError("no trials to choose from")
    final = max(t["rung"] for t in trials)
    complete = [t for t in trials if t["rung"] == final]
    return max(complete, key=lambda t: rank_key(t, threshold))
