"""Plain-text tables of a run's results and a side-by-side comparison of several runs; flags for
tasks scored below chance; a routed method's routing (eval.json) read back per stage."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from llava_c_ray.errors import LlavaCError
from llava_c_ray.run_records import EvalOutput, Results, Routing

R = TypeVar("R", bound=BaseModel)
METRICS = ("avg", "last", "maa", "bwt", "forgetting", "general_final", "general_retention")


def load_results(run_dir: Path) -> Results:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise LlavaCError(
            "no results.json", path=run_dir, fix="pass a run directory written by `llava-c run`"
        )
    return read_record(Results, path)


def read_record(record: type[R], path: Path) -> R:
    """A run record read back and validated; a file that is not one names itself."""
    try:
        return record.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise LlavaCError(
            f"{path.name} is not a llava-c {record.__name__} record: {exc.errors()[0]['msg']}",
            path=path,
            fix="rerun `llava-c run` on the job to rewrite it",
        ) from None


def stage_routing(run_dir: Path) -> list[tuple[str, Routing]]:
    """(stage directory name, routing record) of every stage whose eval.json has one, in order."""
    evals = sorted(Path(run_dir).glob("stages/*/eval.json"))
    routed = [(path.parent.name, read_record(EvalOutput, path).routing) for path in evals]
    return [(stage, routing) for stage, routing in routed if routing is not None]


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


# A chance level is recorded to 2 decimals: a score within its rounding is at chance, not below.
CHANCE_ROUNDING = 0.005


def own_stage_row(results: Results, task: str) -> int | None:
    """The accuracy-matrix row right after the stage that trained `task`: the stage named after
    it, or the only training stage of a one-stage run (joint); None if not evaluated yet."""
    if task in results.stages[1:]:
        return results.stages.index(task, 1)
    if results.finished and len(results.accuracy_matrix) == 2:
        return 1
    return None


def below_chance(results: Results) -> list[str]:
    """One line per task whose score right after its own stage is below its chance level."""
    lines = []
    for j, task in enumerate(results.tasks):
        row, chance = own_stage_row(results, task), results.chance.get(task)
        score = None if row is None else results.accuracy_matrix[row][j]
        if score is not None and chance is not None and score < chance - CHANCE_ROUNDING:
            lines.append(
                f"BELOW CHANCE: {task} scores {fmt(score)} after its own stage "
                f"({results.stages[row]}), chance {fmt(chance)}"
            )
    return lines


def routing_table(routing: list[tuple[str, Routing]], tasks: list[str]) -> str:
    """Rows = routed stages, columns = tasks: percent of the task's questions whose largest
    routing weight is their own task's expert ('-': no expert for the task yet)."""
    width = max(10, *(len(t) for t in tasks))
    lines = [
        "routed to own expert (% of each task's questions):",
        f"{'after stage':<16}" + "".join(f"{t:>{width + 1}}" for t in tasks),
    ]
    for stage, record in routing:
        own = [record.tasks[t].own_expert if t in record.tasks else None for t in tasks]
        name = stage.split("-", 1)[-1]  # the stage's name, as in the accuracy matrix
        lines.append(f"{name:<16}" + "".join(f"{fmt(v):>{width + 1}}" for v in own))
    return "\n".join(lines)


def lmms_table(results: Results) -> str:
    """Rows = stages, columns = the lmms-eval tasks' headline scores, and each task's retention:
    its last score over its stage-0 score (the paper's general-knowledge table)."""
    names = list(results.lmms)
    width = max(10, *(len(n) for n in names))
    lines = [
        "lmms-eval tasks:",
        f"{'after stage':<16}" + "".join(f"{n:>{width + 1}}" for n in names),
    ]
    for i, stage in enumerate(results.stages):
        cells = [results.lmms[n][i] if i < len(results.lmms[n]) else None for n in names]
        lines.append(f"{stage:<16}" + "".join(f"{fmt(v):>{width + 1}}" for v in cells))
    retention = [retained(results.lmms[n]) for n in names]
    lines.append(f"{'(retention)':<16}" + "".join(f"{fmt(v, 3):>{width + 1}}" for v in retention))
    return "\n".join(lines)


def retained(scores: list[float | None]) -> float | None:
    """The last score over the first (None while either is missing or the first is 0)."""
    if len(scores) < 2 or not scores[0] or scores[-1] is None:
        return None
    return scores[-1] / scores[0]


def run_report(results: Results, run_dir: Path | None = None) -> str:
    """The accuracy matrix, metrics and below-chance flags, the lmms-eval tasks' scores; with
    `run_dir`, the routing of a routed method's stages too."""
    title = f"{results.job} — method {results.method}"
    status = "" if results.finished else "  (unfinished)"
    parts = [f"{title}{status}", matrix_table(results), metrics_table(results)]
    parts += below_chance(results)
    if results.lmms:
        parts.append(lmms_table(results))
    routing = stage_routing(run_dir) if run_dir is not None else []
    if routing:
        parts.append(routing_table(routing, results.tasks))
    return "\n".join(parts)


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


def seed_table(runs: list[Results]) -> str:
    """One row per method over its seeds: each metric's mean ± sample std (n = the runs of that
    method), then each method's Avg and retention against the first method's, called "within
    noise" when the difference is under two standard errors, √(s₁²/n₁ + s₂²/n₂)."""
    by_method: dict[str, list[Results]] = {}
    for results in runs:
        by_method.setdefault(results.method, []).append(results)
    width = max(12, *(len(m) + 2 for m in by_method))
    lines = [f"{'method':<{width}}{'seeds':>6}" + "".join(f"{m:>18}" for m in METRICS)]
    stats = {
        m: {k: spread(r.metrics.get(k) for r in rs) for k in METRICS} for m, rs in by_method.items()
    }
    for method, rs in by_method.items():
        cells = "".join(
            f"{pm(stats[method][k], 3 if k == 'general_retention' else 1):>18}" for k in METRICS
        )
        lines.append(f"{method:<{width}}{len(rs):>6}{cells}")
    first, *others = by_method
    for method in others:
        lines.append(
            f"{method} vs {first}: "
            + "; ".join(
                difference(stats[method][k], stats[first][k], k)
                for k in ("avg", "general_retention")
            )
        )
    return "\n".join(lines)


Spread = tuple[float, float, int] | None
"""Mean, sample standard deviation and count of a metric over seeds (None: no values)."""


def spread(values) -> Spread:
    present = [v for v in values if v is not None]
    if not present:
        return None
    mean = sum(present) / len(present)
    var = sum((v - mean) ** 2 for v in present) / (len(present) - 1) if len(present) > 1 else 0.0
    return mean, var**0.5, len(present)


def pm(value: Spread, digits: int) -> str:
    """`23.4 ± 1.2` (a single seed: the mean alone)."""
    if value is None:
        return "-"
    mean, std, n = value
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def difference(a: Spread, b: Spread, metric: str) -> str:
    if a is None or b is None:
        return f"{metric} -"
    delta = a[0] - b[0]
    noise = 2 * (a[1] ** 2 / a[2] + b[1] ** 2 / b[2]) ** 0.5
    digits = 3 if metric == "general_retention" else 1
    if min(a[2], b[2]) < 2:
        return f"{metric} {delta:+.{digits}f} (one seed: noise unknown)"
    verdict = "within noise" if abs(delta) < noise else "beyond noise"
    return f"{metric} {delta:+.{digits}f} (2 SE {noise:.{digits}f}: {verdict})"
