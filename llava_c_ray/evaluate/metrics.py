"""Continual-learning metrics from the accuracy matrix (SPEC.md §3), pure Python.

a[i][j] = score on task j after stage i; rows are stages 0..T (0 = the initial model), columns the T
tasks. Entries may be None where a task was not evaluated; means skip them.

Avg = mean_j a[T][j];  Last = a[T][T];  MAA = mean_{i≥1} mean_{j≤i} a[i][j];
BWT = mean_{j<T} (a[T][j] − a[j][j]);  Forgetting = mean_{j<T} (max_{i<T} a[i][j] − a[T][j]);
general retention = general[T] / general[0].
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def average(matrix: Matrix) -> float | None:
    return mean(matrix[-1])


def last(matrix: Matrix) -> float | None:
    return matrix[-1][-1]


def maa(matrix: Matrix) -> float | None:
    return mean(mean(matrix[i][:i]) for i in range(1, len(matrix)))


def bwt(matrix: Matrix) -> float | None:
    t = len(matrix) - 1
    return mean(_diff(matrix[t][j - 1], matrix[j][j - 1]) for j in range(1, t))


def forgetting(matrix: Matrix) -> float | None:
    t = len(matrix) - 1
    return mean(
        _diff(_max(matrix[i][j - 1] for i in range(t)), matrix[t][j - 1]) for j in range(1, t)
    )


def retention(general: Sequence[float | None]) -> float | None:
    if len(general) < 2 or not general[0] or general[-1] is None:
        return None
    return general[-1] / general[0]


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _max(values) -> float | None:
    kept = [v for v in values if v is not None]
    return max(kept) if kept else None


def continual_metrics(matrix: Matrix, general: Sequence[float | None] | None = None) -> dict:
    """All metrics of a finished run. A non-square run (joint: one stage) gets Avg and retention only."""
    sequential = len(matrix) == len(matrix[0]) + 1
    metrics = {"avg": average(matrix), "last": None, "maa": None, "bwt": None, "forgetting": None}
    if sequential:
        metrics |= {
            "last": last(matrix),
            "maa": maa(matrix),
            "bwt": bwt(matrix),
            "forgetting": forgetting(matrix),
        }
    metrics["general_final"] = general[-1] if general else None
    metrics["general_retention"] = retention(general) if general else None
    return metrics
