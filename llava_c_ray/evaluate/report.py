"""Plain-text tables of a run's results and a side-by-side comparison of several runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_c_ray.errors import LlavaCError

METRICS = ("avg", "last", "maa", "bwt", "forgetting", "general_final", "general_retention")


def load_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise LlavaCError(
            "no results.json", path=run_dir, fix="pass a run directory written by `llava-c run`"
        )
    return json.loads(path.read_text())


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def matrix_table(results: dict[str, Any]) -> str:
    """Rows = stages, columns = tasks + the general probe."""
    tasks = results["tasks"]
    width = max(10, *(len(t) for t in tasks))
    header = (
        f"{'after stage':<16}"
        + "".join(f"{t:>{width + 1}}" for t in tasks)
        + f"{'general':>{width + 1}}"
    )
    lines = [header]
    for name, row, general in zip(
        results["stages"], results["accuracy_matrix"], results["general"], strict=False
    ):
        cells = "".join(f"{fmt(v):>{width + 1}}" for v in row)
        lines.append(f"{name:<16}{cells}{fmt(general):>{width + 1}}")
    return "\n".join(lines)


def metrics_table(results: dict[str, Any]) -> str:
    metrics = results.get("metrics") or {}
    digits = {"general_retention": 3}
    return "  ".join(f"{m}={fmt(metrics.get(m), digits.get(m, 1))}" for m in METRICS)


def run_report(results: dict[str, Any]) -> str:
    title = f"{results['job']} — method {results['method']}"
    status = "" if results.get("finished") else "  (unfinished)"
    return f"{title}{status}\n{matrix_table(results)}\n{metrics_table(results)}"


def comparison_table(runs: list[dict[str, Any]]) -> str:
    """One row per run: the method and its metrics."""
    header = f"{'method':<12}" + "".join(f"{m:>18}" for m in METRICS)
    lines = [header]
    for results in runs:
        metrics = results.get("metrics") or {}
        digits = {"general_retention": 3}
        lines.append(
            f"{results['method']:<12}"
            + "".join(f"{fmt(metrics.get(m), digits.get(m, 1)):>18}" for m in METRICS)
        )
    return "\n".join(lines)
