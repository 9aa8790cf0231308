"""Is the built-in benchmark fit for purpose? (issue 3) Prints figures, asserts nothing.

    .venv/bin/python bench/benchmark_quality.py [--root DIR] [--max-samples N]

A --root that already holds a build reuses its benchmark and base model (then the time in 1. is
only the check).

1. Pre-training the tiny base from scratch on the six general domains (time on this machine), and
   its test scores on every general domain and the general probe beside each chance level.
2. Zero-shot scores of the base on the five continual tasks (new domains should be new).
3. Plain sequential LoRA (`finetune`, the demo's settings) through the five tasks: the accuracy
   matrix, BWT / Forgetting, and the general probe before and after — the forgetting and the base
   degradation that LLaVA-c exists to prevent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def general_tasks(benchmark: Path, setting: str) -> tuple[list, dict, dict]:
    """The test splits of a setting's tasks (their suffixes are already in every question)."""
    from llava_c_ray.evaluate.evaluator import EvalTask

    index = json.loads((benchmark / "benchmark.json").read_text())
    tasks = [
        EvalTask(
            t["name"],
            benchmark / t["test"],
            benchmark / t["image_folder"],
            t["scoring"],
        )
        for t in index[setting]
    ]
    chance = {t["name"]: t.get("chance") for t in index[setting]}
    return tasks, chance, index


def score_table(title: str, scores: dict, chance: dict) -> None:
    print(title)
    for name, value in scores.items():
        level = chance.get(name)
        print(f"  {name:<14} {value:6.1f}   chance {level if level is None else f'{level:.1f}'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="build here (default: a temporary directory)")
    parser.add_argument("--max-samples", type=int, default=64, help="test records per task")
    args = parser.parse_args()

    from llava_c_ray.builtin import ensure_builtin
    from llava_c_ray.config import load_job
    from llava_c_ray.evaluate.evaluator import EvalTask, evaluate_checkpoint
    from llava_c_ray.pipeline import run_job
    from llava_c_ray.ray_session import ensure_ray

    ensure_ray()
    root = args.root or Path(tempfile.mkdtemp(prefix="benchq-"))
    started = time.perf_counter()
    built = ensure_builtin(root / "builtin")
    build_seconds = time.perf_counter() - started
    print(f"1. benchmark + tiny model + base pre-training: {build_seconds / 60:.1f} min (2 cores)")

    general, chance, index = general_tasks(built.benchmark, "general")
    probe = index["general_probe"]
    general.append(
        EvalTask(
            "general_probe",
            built.benchmark / probe["test"],
            built.benchmark / probe["image_folder"],
            probe["scoring"],
        )
    )
    chance["general_probe"] = probe.get("chance")

    def evaluate(tasks: list) -> dict[str, float]:
        return evaluate_checkpoint(
            built.base_model, tasks, num_actors=2, batch_size=32, max_samples=args.max_samples
        ).scores

    score_table("   base model, test split:", evaluate(general), chance)

    continual, chance_new, _ = general_tasks(built.benchmark, "continual")
    score_table("2. zero-shot on the continual tasks:", evaluate(continual), chance_new)

    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [
            "name=quality-finetune",
            "method.name=finetune",
            f"model.path={built.base_model}",
            f"benchmark.path={built.benchmark}",
            f"storage.path={root / 'runs'}",
        ],
    )
    results = run_job(job)
    print("3. sequential LoRA (finetune) through the five tasks:")
    print("   stage          " + " ".join(f"{t[:10]:>10}" for t in results.tasks) + "   probe")
    for stage, row, gen in zip(
        results.stages, results.accuracy_matrix, results.general, strict=True
    ):
        print(f"   {stage:<14} " + " ".join(f"{v:10.1f}" for v in row) + f"  {gen:6.1f}")
    m = results.metrics
    print(
        f"   BWT {m['bwt']:.1f}, Forgetting {m['forgetting']:.1f}, general probe "
        f"{results.general[0]:.1f} -> {results.general[-1]:.1f} "
        f"(retention {m['general_retention']:.2f})"
    )
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
