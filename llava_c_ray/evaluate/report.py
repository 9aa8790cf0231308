"""Plain-text tables of a run's results and a side-by-side comparison of several runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from llava_c_ray.errors import LlavaCError
from llava_c_ray.run_records import Results

METRICS = ("avg", "last", "maa", "bwt", "forgetting", "general_final", "general_retention")


def load_results(run_dir: Path) -> Results:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise LlavaCError(
            "no results.json", path=run_dir, fix="pass a run directory written by `llava-c run`"
        )
    try:
        return Results.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise LlavaCError(
            f"results.json is not a llava-c results file: {exc.errors()[0]['msg']}",
            path=path,
            fix="rerun `llava-c run` on the job to rewrite it",
        ) from None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def matrix_table(results: Results) -> str:
    """Rows = stages, columns = tasks + the general probe; the last row is each task's chance
    level (the majority answer), so a score can be read against it."""
    tasks = results.tasks
    width = max(10, *(len(t) for t in tasks))
    header = (
        f"{'after stage':<16}"
        + "".join(f"{t:>{width + 1}}" for t in tasks)
        + f"{'general':>{width + 1}}"
    )
    lines = [header]
    for name, row, general in zip(
        results.stages, results.accuracy_matrix, results.general, strict=False
    ):
        cells = "".join(f"{fmt(v):>{width + 1}}" for v in row)
        lines.append(f"{name:<16}{cells}{fmt(general):>{width + 1}}")
    if any(v is not None for v in results.chance.values()):
        cells = "".join(f"{fmt(results.chance.get(t)):>{width + 1}}" for t in tasks)
        lines.append(f"{'(chance)':<16}{cells}{'-':>{width + 1}}")
    return "\n".join(lines)


def metrics_table(results: Results) -> str:
    metrics = results.metrics
    digits = {"general_retention": 3}
    return "  ".join(f"{m}={fmt(metrics.get(m), digits.get(m, 1))}" for m in METRICS)


def run_report(results: Results) -> str:
    title = f"{results.job} — method {results.method}"
    status = "" if results.finished else "  (unfinished)"
    return f"{title}{status}\n{matrix_table(results)}\n{metrics_table(results)}"


def comparison_table(runs: list[Results]) -> str:
    """One row per run: the method and its metrics."""
    width = max(12, *(len(r.method) + 2 for r in runs))
    header = f"{'method':<{width}}" + "".join(f"{m:>18}" for m in METRICS)
    lines = [header]
    for results in runs:
        metrics = results.metrics
        digits = {"general_retention": 3}
        lines.append(
            f"{results.method:<{width}}"
            + "".join(f"{fmt(metrics.get(m), digits.get(m, 1)):>18}" for m in METRICS)
        )
    return "\n".join(lines)
