"""PNG plots of a run: accuracy heatmap, per-task curves, general score, SAC spectra, α search,
and a routed method's routing matrix per stage (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

from llava_c_ray.evaluate.report import stage_routing
from llava_c_ray.run_records import Results, Routing

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(results: Results, path: Path) -> Path:
    matrix = [[float("nan") if v is None else v for v in row] for row in results.accuracy_matrix]
    fig, ax = plt.subplots(figsize=(1.2 * len(results.tasks) + 2, 0.6 * len(matrix) + 1.5))
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(results.tasks)), results.tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), results.stages)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value == value:
                ax.text(
                    j,
                    i,
                    f"{value:.0f}",
                    ha="center",
                    va="center",
                    color="white" if value < 60 else "black",
                )
    ax.set_xlabel("task")
    ax.set_ylabel("after stage")
    ax.set_title(f"accuracy — {results.method}")
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


def task_curves(results: Results, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    stages = range(len(results.accuracy_matrix))
    for j, task in enumerate(results.tasks):
        ax.plot(stages, [row[j] for row in results.accuracy_matrix], marker="o", label=task)
    ax.set_xticks(list(stages), results.stages, rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_title(f"per-task score across stages — {results.method}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def general_curve(results: Results, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(results.general)), results.general, marker="o", color="black")
    ax.set_xticks(range(len(results.general)), results.stages, rotation=30, ha="right")
    ax.set_ylabel("general probe score")
    ax.set_title(f"general ability — {results.method}")
    return save_figure(fig, path)


def lmms_curves(results: Results, path: Path) -> Path:
    """Each lmms-eval task's headline score over the stages (the general benchmarks' retention)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, scores in results.lmms.items():
        stages = range(len(scores))
        ax.plot(stages, [float("nan") if v is None else v for v in scores], marker="o", label=name)
    ax.set_xticks(range(len(results.stages)), results.stages, rotation=30, ha="right")
    ax.set_ylabel("lmms-eval score")
    ax.set_title(f"lmms-eval tasks across stages — {results.method}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def spectra(stats_file: Path, path: Path, count: int = 4) -> Path | None:
    """σ and σ̃ of the first few consolidated matrices (like the paper's Figure 5)."""
    tensors = [t for t in json.loads(stats_file.read_text())["tensors"] if "sigma" in t]
    if not tensors:
        return None
    picked = tensors[:: max(1, len(tensors) // count)][:count]
    fig, axes = plt.subplots(1, len(picked), figsize=(3.2 * len(picked), 3), squeeze=False)
    for ax, t in zip(axes[0], picked, strict=True):
        ax.semilogy(t["sigma"], label="σ (Δ)")
        ax.semilogy(t["sigma_tilde"], label="σ̃ (SAC)")
        ax.set_title(t["name"].split(".", 2)[-1][-32:], fontsize=8)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def alpha_plot(search: dict[str, Any], path: Path, title: str) -> Path:
    """New-task, old-task and general validation scores against α (like the paper's Figure 4),
    from a search's trials.json: the searched rule solid, ModelMix dashed when it was compared."""
    trials = sorted(search["trials"], key=lambda t: t["alpha"])
    alphas = [t["alpha"] for t in trials]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    series = [(search["rule"], "-", trials)]
    if all(t.get("modelmix") for t in trials):
        series.append(("modelmix", "--", [t["modelmix"] for t in trials]))
    for rule, style, entries in series:
        for group, colour in (("new", "tab:blue"), ("old", "tab:orange"), ("general", "tab:green")):
            values = [e.get(group) for e in entries]
            if any(v is not None for v in values):
                ax.plot(alphas, values, style, marker="o", color=colour, label=f"{group} ({rule})")
    ax.axvline(search["best_alpha"], color="grey", linestyle=":", label="chosen α")
    ax.set_xlabel("α")
    ax.set_ylabel("validation score")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def routing_matrix(routing: Routing, path: Path, title: str) -> Path:
    """Rows = the evaluated tasks (each labelled with its percent routed to its own expert),
    columns = the experts, cells = the mean routing weight; the own expert's cell outlined."""
    tasks = list(routing.tasks)
    matrix = [routing.tasks[t].mean_weights for t in tasks]
    fig, ax = plt.subplots(
        figsize=(1.1 * len(routing.experts) + 3.5, 0.5 * len(tasks) + 1.8), squeeze=True
    )
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(routing.experts)), routing.experts, rotation=30, ha="right")
    labels = [
        t if (own := routing.tasks[t].own_expert) is None else f"{t} ({own:.1f}% own)"
        for t in tasks
    ]
    ax.set_yticks(range(len(tasks)), labels)
    for i, (task, row) in enumerate(zip(tasks, matrix, strict=True)):
        for j, value in enumerate(row):
            colour = "white" if value > 0.6 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
            if task in routing.experts[j].split("+"):
                ax.add_patch(
                    plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5)
                )
    ax.set_xlabel("expert")
    ax.set_ylabel("task of the question")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="mean routing weight")
    return save_figure(fig, path)


def draw_run_plots(run_dir: Path, results: Results) -> list[Path]:
    plots = run_dir / "plots"
    drawn = [
        heatmap(results, plots / "accuracy_heatmap.png"),
        task_curves(results, plots / "task_curves.png"),
        general_curve(results, plots / "general_curve.png"),
    ]
    if results.lmms:
        drawn.append(lmms_curves(results, plots / "lmms_tasks.png"))
    for stats in sorted(run_dir.glob("stages/*/sac_stats.json")):
        spectrum = spectra(stats, plots / f"spectra_{stats.parent.name}.png")
        if spectrum:
            drawn.append(spectrum)
    for trials in sorted(run_dir.glob("stages/*/search/trials.json")):
        task = trials.parent.parent.name.split("-", 1)[1]
        search = json.loads(trials.read_text())
        drawn.append(alpha_plot(search, plots / f"alpha_{task}.png", f"α search — {task}"))
    for stage, routing in stage_routing(run_dir):
        title = f"routing after {stage} — {results.method}"
        drawn.append(routing_matrix(routing, plots / f"routing_{stage}.png", title))
    return drawn
