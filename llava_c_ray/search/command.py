"""`llava-c search-alpha`: the pipeline's α search for one stage, standalone."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `search-alpha` subcommand to a CLI's subparsers; its handler is `args.handler`."""
    parser = subparsers.add_parser(
        "search-alpha", help="search the consolidation strength α of one stage with Ray Tune"
    )
    parser.add_argument("--base", required=True, type=Path, help="stage-start checkpoint θ̃_{t-1}")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tuned", type=Path, help="tuned HF checkpoint θ_t")
    source.add_argument("--adapter", type=Path, help="peft LoRA adapter trained from the base")
    parser.add_argument("--job", required=True, type=Path, help="job YAML (tasks, search, eval)")
    parser.add_argument("--task", required=True, help="the stage's new task; earlier tasks = old")
    parser.add_argument(
        "--out", type=Path, help="output directory (default: search-<task> next to --base)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "overrides", nargs="*", help="key=value job overrides, e.g. search.asha=true"
    )
    parser.set_defaults(handler=run_search_alpha)
    return parser


def run_search_alpha(args: argparse.Namespace) -> int:
    """Handler of `llava-c search-alpha`; user errors surface as LlavaCError."""
    import shutil

    from llava_c_ray.config import load_job
    from llava_c_ray.errors import LlavaCError
    from llava_c_ray.evaluate.plots import alpha_plot
    from llava_c_ray.methods import bind
    from llava_c_ray.search.tune import search_alpha

    job = load_job(args.job, args.overrides)
    names = [t.name for t in job.tasks]
    job.task(args.task)  # an unknown task name fails here, listing the job's tasks
    method = bind(job)
    if not method.rule.consolidates:
        raise LlavaCError(
            f"method {job.method.name} does not consolidate, so it has no α to search",
            path=args.job,
            fix="set consolidation.method=sac (or modelmix)",
        )
    out = (args.out or args.base.parent / f"search-{args.task}").absolute()
    if out.exists() and not args.overwrite:
        raise LlavaCError(
            "the output directory exists", path=out, fix="pass another --out, or --overwrite"
        )
    for path in (args.base, args.tuned or args.adapter):
        if not path.is_dir():
            raise LlavaCError("not a directory", path=path, fix="pass a checkpoint directory")
    shutil.rmtree(out, ignore_errors=True)
    result = search_alpha(
        job,
        new=[args.task],
        old=names[: names.index(args.task)],
        base=args.base,
        factors=out / "factors",
        out=out,
        rule=method.rule.name,
        adapter=args.adapter,
        tuned=args.tuned,
        loader=method.method.load_model,
    )
    for trial in result.trials:
        print(f"α = {trial['alpha']:.3f}  objective {trial['objective']:6.2f}")
    plot = alpha_plot(
        {"rule": method.rule.name, "best_alpha": result.best_alpha, "trials": result.trials},
        out / f"alpha_{args.task}.png",
        f"α search — {args.task}",
    )
    print(f"best {result.choice} (trials: {out / 'trials.json'}, plot: {plot})")
    return 0
