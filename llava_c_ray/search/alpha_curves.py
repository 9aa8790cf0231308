"""The α curves (the paper's Figure 4 at our scale) from the α search's records.

Each stage's `search/trials.json` holds, per candidate α, the validation scores of the new task,
the old tasks and the general probe under the job's rule — and under ModelMix when the search ran
with `search.compare_modelmix`. A run of `llava_c` gives SAC and ModelMix on deltas trained with
UIR, a run of `sac` the same without UIR. `alpha_curves_figure` draws, for the first and the last
task, the new-task score and the probe score against α for every series found: one PNG.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.plots import plt, save_figure
from llava_c_ray.methods import get_method
from llava_c_ray.methods.uir import uir_training

RULE_LABELS = {"sac": "SAC", "modelmix": "ModelMix"}
TRIALS_GLOB = "stages/*/search/trials.json"


@dataclass(frozen=True)
class AlphaCurve:
    """One rule's validation scores against α at one stage."""

    label: str
    """The series, e.g. "SAC + UIR": the rule, and whether the stage was trained with UIR."""
    stage: int
    task: str
    alphas: list[float]
    new: list[float | None]
    old: list[float | None]
    general: list[float | None]
    chosen: float | None = None
    """The α the search chose (only on the searched rule's curve)."""


def series_label(rule: str, uir: bool) -> str:
    return RULE_LABELS.get(rule, rule) + (" + UIR" if uir else "")


def curves_from_search(
    search: Mapping[str, Any], *, stage: int, task: str, uir: bool
) -> list[AlphaCurve]:
    """The searched rule's curve, and ModelMix's when every trial also scored it (pure)."""
    trials = sorted(search["trials"], key=lambda t: t["alpha"])
    alphas = [t["alpha"] for t in trials]
    series = [(search["rule"], trials, search.get("best_alpha"))]
    if search["rule"] != "modelmix" and trials and all(t.get("modelmix") for t in trials):
        series.append(("modelmix", [t["modelmix"] for t in trials], None))
    return [
        AlphaCurve(
            series_label(rule, uir),
            stage,
            task,
            alphas,
            [e.get("new") for e in entries],
            [e.get("old") for e in entries],
            [e.get("general") for e in entries],
            chosen,
        )
        for rule, entries, chosen in series
    ]


def first_and_last(curves: Sequence[AlphaCurve]) -> list[tuple[int, str]]:
    """(stage, task) of the first and the last searched stage (one entry when they coincide)."""
    stages = sorted({(c.stage, c.task) for c in curves})
    return list(dict.fromkeys([stages[0], stages[-1]])) if stages else []


def trained_with_uir(method: str) -> bool:
    """True when the method's training adds the UIR loss (llava_c, uir)."""
    return get_method(method).training is uir_training


def load_run_curves(run_dir: Path) -> tuple[list[AlphaCurve], dict[str, float]]:
    """Every stage's α curves in a run directory (or one `llava-c search-alpha` output
    directory), and the tasks' chance levels when the run recorded them."""
    if (run_dir / "trials.json").is_file():
        search = json.loads((run_dir / "trials.json").read_text())
        return curves_from_search(
            search,
            stage=len(search["old"]) + 1,
            task="+".join(search["new"]),
            uir=trained_with_uir(search["method"]),
        ), {}
    files = sorted(run_dir.glob(TRIALS_GLOB))
    if not files:
        raise LlavaCError(
            "no α-search records in this directory",
            path=run_dir,
            fix="pass run directories of jobs run with search.enabled=true (and "
            "search.compare_modelmix=true for the ModelMix curves)",
        )
    manifest = json.loads((run_dir / "manifest.json").read_text())
    uir = trained_with_uir(manifest["method"])
    curves = []
    for path in files:
        index, task = path.parent.parent.name.split("-", 1)
        search = json.loads(path.read_text())
        curves += curves_from_search(search, stage=int(index), task=task, uir=uir)
    results = run_dir / "results.json"
    chance = json.loads(results.read_text()).get("chance", {}) if results.is_file() else {}
    return curves, chance


def plot_alpha_curves(
    curves: Sequence[AlphaCurve], path: Path, chance: Mapping[str, float] | None = None
) -> Path:
    """New-task and probe score against α (columns) for the first and last task (rows)."""
    rows = first_and_last(curves)
    labels = list(dict.fromkeys(c.label for c in curves))
    colours = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.6 * len(rows)), squeeze=False)
    for (stage, task), row in zip(rows, axes, strict=True):
        for curve in (c for c in curves if (c.stage, c.task) == (stage, task)):
            style = "--" if curve.label.startswith("ModelMix") else "-"
            for ax, values in ((row[0], curve.new), (row[1], curve.general)):
                ax.plot(
                    curve.alphas,
                    values,
                    style,
                    marker="o",
                    ms=3,
                    color=colours[curve.label],
                    label=curve.label,
                )
                if curve.chosen is not None:
                    ax.axvline(curve.chosen, color=colours[curve.label], linestyle=":", lw=1)
        if chance and task in chance:
            row[0].axhline(chance[task], color="grey", lw=1, label="chance (test split)")
        row[0].set_title(f"stage {stage}: new task {task}")
        row[1].set_title(f"stage {stage}: general probe")
        for ax in row:
            ax.set_xlabel("α")
            ax.set_ylabel("validation score")
            ax.set_ylim(-2, 102)
        row[0].legend(fontsize=7)
    fig.suptitle("α curves on validation data (dotted: the α the search chose)")
    return save_figure(fig, path)


def alpha_curves_figure(run_dirs: Sequence[Path], out: Path) -> Path:
    """`llava-c figure alpha-curves RUN_DIR...`: one PNG of every run's α curves at `out`."""
    curves: list[AlphaCurve] = []
    chance: dict[str, float] = {}
    for run_dir in run_dirs:
        found, run_chance = load_run_curves(Path(run_dir))
        seen = {(c.label, c.stage) for c in curves}
        name = Path(run_dir).name
        curves += [  # two runs of one kind at one stage: name the run in the later one's label
            replace(c, label=f"{c.label} ({name})") if (c.label, c.stage) in seen else c
            for c in found
        ]
        chance |= run_chance
    return plot_alpha_curves(curves, out, chance)
