"""α-search cost figures (issue 7), measured side by side in one run. Prints ratios, asserts nothing.

    .venv/bin/python bench/alpha_search.py [--grid 5] [--actors 2] [--subset 16] [--wide]

1. Time to build a candidate θ̃(α) in an evaluation actor (rescaling the low-rank side paths,
   rebuilding the dense tensors) ÷ the time to evaluate it, per candidate. Target ≤ 0.05.
2. Wall time of the N-point grid through Ray Tune with P actors (factors computed once, base loaded
   once per actor) ÷ N sequential naive cycles: consolidate + save, then load + evaluate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def build_inputs(root: Path, scale: str, wide: bool, rank: int):
    from llava_c_ray.builtin import build_tiny
    from llava_c_ray.data.synthetic.benchmark import generate_benchmark
    from llava_c_ray.model.tiny import TinyDims, random_lora_adapter

    bench = generate_benchmark(root / "benchmark", seed=0, scale=scale)
    dims = TinyDims(text_hidden=512, text_layers=4, text_intermediate=1024) if wide else None
    base = build_tiny(bench, root / "base", seed=0, dims=dims)
    adapter, _ = random_lora_adapter(base, root / "stage", rank=rank)
    return bench, base, adapter


def bench_job(bench: Path, base: Path, grid: list[float], actors: int, subset: int):
    from llava_c_ray.config import job_from_dict

    return job_from_dict(
        {
            "name": "bench",
            "model": {"path": str(base)},
            "benchmark": {"path": str(bench)},
            "search": {"enabled": True, "space": grid, "subset_size": subset, "num_actors": actors},
            "eval": {"max_new_tokens": 16, "batch_size": 8},
            "training": {"per_device_batch": 1, "global_batch": 2},
        }
    )


def naive_cycles(job, base: Path, adapter: Path, tasks: list, root: Path) -> float:
    """Per α: consolidate and save a full checkpoint, then load it in an actor and evaluate."""
    from llava_c_ray.consolidate.engine import consolidate_checkpoint
    from llava_c_ray.evaluate.evaluator import evaluate_checkpoint

    started = time.perf_counter()
    for i, alpha in enumerate(job.search.space):
        out = root / f"naive-{i}"
        consolidate_checkpoint(base, out, adapter=adapter, alpha=alpha, progress=False)
        evaluate_checkpoint(
            out,
            tasks,
            num_actors=1,
            batch_size=job.eval.batch_size,
            max_new_tokens=job.eval.max_new_tokens,
            max_samples=job.search.subset_size,
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=5, help="grid points N")
    parser.add_argument("--actors", type=int, default=2, help="evaluation actors P")
    parser.add_argument("--subset", type=int, default=16, help="validation records per task")
    parser.add_argument("--scale", default="small", choices=("test", "small"))
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the stage's adapter")
    parser.add_argument("--wide", action="store_true", help="language model 512 wide, 4 layers")
    args = parser.parse_args()

    from llava_c_ray.evaluate.evaluator import EvalTask
    from llava_c_ray.ray_session import ensure_ray
    from llava_c_ray.search.tune import GENERAL, search_alpha

    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench, base, adapter = build_inputs(root, args.scale, args.wide, args.rank)
        grid = [round(0.05 + i * 0.45 / max(1, args.grid - 1), 4) for i in range(args.grid)]
        job = bench_job(bench, base, grid, args.actors, args.subset)
        old, new = job.tasks[0], job.tasks[1]

        started = time.perf_counter()
        result = search_alpha(
            job,
            new=[new.name],
            old=[old.name],
            base=base,
            factors=root / "factors",
            out=root / "search",
            adapter=adapter,
        )
        tune_seconds = time.perf_counter() - started

        tasks = [
            EvalTask(t.name, t.val, t.image_folder, t.scoring, t.instruction) for t in (new, old)
        ]
        probe = job.general_probe
        tasks.append(EvalTask(GENERAL, probe.val, probe.image_folder, probe.scoring))
        naive_seconds = naive_cycles(job, base, adapter, tasks, root)

    build = sum(t["build_seconds"] for t in result.trials) / len(result.trials)
    evaluate = sum(t["eval_seconds"] for t in result.trials) / len(result.trials)
    model = "wide (512 × 4 layers)" if args.wide else "tiny"
    print(
        f"model {model}, LoRA r={args.rank}, grid N={args.grid}, actors P={args.actors}, "
        f"{args.subset} validation records per task (3 groups)"
    )
    print(
        f"1. build θ̃(α) in the actor: {1000 * build:.1f} ms; evaluate it: {evaluate:.2f} s; "
        f"build ÷ evaluate = {build / evaluate:.4f} (target ≤ 0.05)"
    )
    print(
        f"2. Tune grid with {args.actors} actors: {tune_seconds:.1f} s; "
        f"{args.grid} naive merge+save+load+eval cycles: {naive_seconds:.1f} s; "
        f"grid ÷ naive = {tune_seconds / naive_seconds:.2f}"
    )
    print(f"   best α = {result.best_alpha}")


if __name__ == "__main__":
    main()
