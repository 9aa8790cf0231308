"""`llava-c`: parse the command line, hand it to one library function, turn user errors into one message."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_c_ray import console, packaged_jobs
from llava_c_ray.config import JobConfig, dump_job, load_job
from llava_c_ray.consolidate import command as consolidate_command
from llava_c_ray.errors import LlavaCError
from llava_c_ray.model import compose as compose_command
from llava_c_ray.search import command as search_command


def load(path: Path, overrides: list[str], *, check_files: bool = True) -> JobConfig:
    """A job (a file, or a packaged job's name) validated down to its method's parameters."""
    from llava_c_ray.methods import bind

    job = load_job(packaged_jobs.resolve_job(path), overrides, check_files=check_files)
    bind(job)
    return job


def config_show(args: argparse.Namespace) -> int:
    print(dump_job(load(args.job, args.overrides, check_files=not args.no_check_files)), end="")
    return 0


def run(args: argparse.Namespace) -> int:
    from llava_c_ray.evaluate.report import run_report
    from llava_c_ray.pipeline import default_run_dir, run_job

    job = load(args.job, args.overrides)
    results = run_job(job, args.run_dir, force_new=args.force_new)
    print(run_report(results, args.run_dir or default_run_dir(job)))
    return 0


def demo_methods(args: argparse.Namespace) -> list[str | None]:
    """The methods the demo runs: --methods, every registered one (--compare), or the job's own."""
    from llava_c_ray.methods import METHODS, get_method

    if args.methods:
        return [get_method(name.strip()).name for name in args.methods.split(",")]
    return list(METHODS) if args.compare else [None]


def demo(args: argparse.Namespace) -> int:
    """Build (or reuse) the built-in benchmark and base model, then run the packaged demo job."""
    from llava_c_ray.builtin import ensure_builtin
    from llava_c_ray.evaluate.report import comparison_table, run_report, seed_table
    from llava_c_ray.pipeline import default_run_dir, run_job

    methods = demo_methods(args)  # an unknown name fails here, before anything is built
    built = ensure_builtin(args.out / "builtin")
    paths = [
        f"benchmark.path={built.benchmark}",
        f"model.path={built.base_model}",
        f"storage.path={args.out}",
    ]
    chosen = [
        [
            *([f"method.name={m}", f"name=demo-{m}"] if m else []),
            *seed_overrides(m, seed, args.seeds),
        ]
        for m in methods
        for seed in range(args.seeds)
    ]
    jobs = [load(args.job, [*paths, *c, *args.overrides]) for c in chosen]  # all checked first
    runs = []
    for job in jobs:
        results = run_job(job, force_new=args.force_new)
        print(run_report(results, default_run_dir(job)), flush=True)
        runs.append(results)
    if args.seeds > 1:
        print("\n" + seed_table(runs))
    elif len(runs) > 1:
        print("\n" + comparison_table(runs))
    return 0


def seed_overrides(method: str | None, seed: int, seeds: int) -> list[str]:
    """With --seeds N > 1, run i of a method trains with seed i in its own run directory."""
    if seeds == 1:
        return []
    return [f"training.seed={seed}", f"name=demo-{method or 'job'}-s{seed}"]


def report(args: argparse.Namespace) -> int:
    from llava_c_ray.evaluate.plots import draw_run_plots
    from llava_c_ray.evaluate.report import comparison_table, load_results, run_report

    runs = [load_results(path) for path in args.run_dirs]
    for path, results in zip(args.run_dirs, runs, strict=True):
        print(run_report(results, path) + "\n")
        if results.accuracy_matrix:
            draw_run_plots(path, results)
    if len(runs) > 1:
        print(comparison_table(runs))
    return 0


def eval_tasks(args: argparse.Namespace) -> int:
    """Write a job's tasks and probe as lmms-eval tasks (local JSON, our scoring rule)."""
    from llava_c_ray.evaluate.lmms_tasks import job_tag, write_lmms_tasks

    job = load(args.job, args.overrides)
    for path in write_lmms_tasks(job, args.out, overwrite=args.overwrite):
        print(path)
    print(
        f"run: lmms-eval --model llava_c --model_args pretrained=CHECKPOINT "
        f"--include_path {args.out} --tasks {job_tag(job)}"
    )
    return 0


def eval_lmms(args: argparse.Namespace) -> int:
    """lmms-eval tasks on one checkpoint in Ray actors; the scores printed, the results to --out."""
    from dataclasses import replace

    from llava_c_ray.evaluate.evaluator import load_hf_model
    from llava_c_ray.evaluate.lmms_run import (
        LmmsSettings,
        LmmsTasks,
        check_lmms_tasks,
        run_lmms_eval,
    )
    from llava_c_ray.methods import bind
    from llava_c_ray.pipeline import lmms_settings

    job = load(args.job, args.overrides) if args.job else None
    if args.overrides and job is None:
        raise LlavaCError(
            f"key=value overrides ({' '.join(args.overrides)}) change a job: there is no --job",
            fix="pass --job JOB, or use --batch-size, --max-new-tokens, --template",
        )
    if not (args.checkpoint / "config.json").is_file():
        raise LlavaCError(
            "not a Hugging Face checkpoint directory (no config.json)",
            path=args.checkpoint,
            fix="pass a stage's model/ directory or a checkpoint written by `llava-c model`",
        )
    if args.out.exists() and not args.overwrite:
        raise LlavaCError("output exists", path=args.out, fix="choose a new --out or --overwrite")
    tasks = LmmsTasks([t for t in args.tasks.split(",") if t], args.include_path, args.limit)
    check_lmms_tasks(tasks, "--tasks")
    given = {k: getattr(args, k) for k in ("template", "batch_size", "max_new_tokens")}
    settings = replace(
        lmms_settings(job) if job else LmmsSettings(),
        **{k: v for k, v in given.items() if v is not None},
    )
    loader = bind(job).method.load_model if job else load_hf_model
    scores = run_lmms_eval(args.checkpoint.absolute(), tasks, settings, args.out, loader)
    for name, value in scores.items():
        print(f"{name}: {value:.2f}")
    print(f"wrote {args.out}")
    return 0


def figure_alpha_curves(args: argparse.Namespace) -> int:
    from llava_c_ray.search.alpha_curves import alpha_curves_figure

    out = args.out or args.run_dirs[0] / "plots" / "alpha_curves.png"
    print(f"wrote {alpha_curves_figure(args.run_dirs, out)}")
    return 0


def train(args: argparse.Namespace) -> int:
    from llava_c_ray.pipeline import apply_skipped, check_job_data, standalone_stage_spec
    from llava_c_ray.train.stage import run_stage

    job = load(args.job, args.overrides)
    reports = check_job_data(job, [args.task], evaluation=False)
    job = apply_skipped(job, reports, args.out)
    console.LOGS.open_in(args.out)
    result = run_stage(standalone_stage_spec(job, args.task, args.init, args.out))
    print(f"θ_t: {result.model_dir}\nadapter: {result.adapter_dir}\nsteps: {result.steps}")
    return 0


def data_validate(args: argparse.Namespace) -> int:
    from llava_c_ray.data.records import read_records
    from llava_c_ray.data.validate import validate_records

    report_ = validate_records(
        read_records(args.file), args.file, args.image_folder, max_pixels=args.max_image_pixels
    )
    print(report_.summary())
    if args.skipped_out:
        report_.write_skipped(args.skipped_out)
    return 1 if report_.problems else 0


def data_prepare(args: argparse.Namespace) -> int:
    from llava_c_ray.data.shards import prepare_shards

    out = prepare_shards(
        args.file,
        args.image_folder,
        args.out,
        mode=args.mode,
        overwrite=args.overwrite,
        max_pixels=args.max_image_pixels,
        skip_hint="pass --mode skip",
    )
    print(f"wrote {out}")
    return 0


def data_synth(args: argparse.Namespace) -> int:
    from llava_c_ray.data.synthetic.benchmark import generate_benchmark

    print(f"wrote {generate_benchmark(args.out, seed=args.seed, scale=args.scale)}")
    return 0


def model_tiny(args: argparse.Namespace) -> int:
    from llava_c_ray.builtin import build_tiny

    print(f"wrote {build_tiny(args.benchmark, args.out, args.seed)}")
    return 0


def methods_list(args: argparse.Namespace) -> int:
    from llava_c_ray.methods import METHODS

    for method in METHODS.values():
        print(f"{method.name:16s} {method.summary}  [consolidation: {method.consolidation}]")
        for line in method.parameter_lines():
            print(f"{'':18s}{line}")
    return 0


def jobs_list(args: argparse.Namespace) -> int:
    print(f"packaged jobs ({packaged_jobs.JOBS_DIR}):")
    for name in packaged_jobs.job_names():
        print(f"  {name:32s} {packaged_jobs.summary(packaged_jobs.packaged_job(name))}")
    return 0


def jobs_show(args: argparse.Namespace) -> int:
    print(packaged_jobs.packaged_job(args.name).read_text(), end="")
    return 0


def jobs_copy(args: argparse.Namespace) -> int:
    print(f"wrote {packaged_jobs.copy_job(args.name, args.dest, overwrite=args.overwrite)}")
    return 0


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", type=Path, help="job YAML, or a packaged job's name (llava-c jobs)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides anywhere after JOB, e.g. training.lr=1e-4"
    )


def add_pixel_limit(parser: argparse.ArgumentParser) -> None:
    from llava_c_ray.data.validate import MAX_IMAGE_PIXELS

    parser.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=MAX_IMAGE_PIXELS,
        metavar="N",
        help=f"largest valid image, width × height (default {MAX_IMAGE_PIXELS:,})",
    )


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print Ray's worker output and library logs too (always in RUN_DIR/logs/)",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-c", description="Continual visual instruction tuning of LLaVA models on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "run", help="run (or resume) a job: train, consolidate, evaluate every stage"
    )
    add_job_arguments(p)
    p.add_argument("--run-dir", type=Path, help="run directory (default: storage.path/name)")
    p.add_argument(
        "--force-new", action="store_true", help="move an existing run of another config aside"
    )
    add_verbose(p)
    p.set_defaults(handler=run)

    p = commands.add_parser("demo", help="the main job on the built-in tiny model and benchmark")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the packaged demo job")
    p.add_argument(
        "--out", type=Path, default=Path("runs"), help="where the builtin model and runs go"
    )
    p.add_argument(
        "--job", type=Path, default=packaged_jobs.JOBS_DIR / "demo.yaml", help=argparse.SUPPRESS
    )
    p.add_argument(
        "--compare", action="store_true", help="run every registered method and compare them"
    )
    p.add_argument(
        "--methods", metavar="A,B,...", help="run these methods (comma-separated) and compare them"
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        metavar="N",
        help="run each method with training seeds 0..N-1; the table shows mean ± std over them",
    )
    p.add_argument(
        "--force-new", action="store_true", help="move an existing run of another config aside"
    )
    add_verbose(p)
    p.set_defaults(handler=demo)

    p = commands.add_parser(
        "report", help="print a run's tables and redraw its plots; compare several runs"
    )
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.set_defaults(handler=report)

    p = commands.add_parser("train", help="train one stage on Ray Train")
    add_job_arguments(p)
    p.add_argument("--task", required=True, help="task name in the job")
    p.add_argument("--init", required=True, type=Path, help="start checkpoint (HF directory)")
    p.add_argument("--out", required=True, type=Path, help="output directory (model/, adapter/)")
    add_verbose(p)
    p.set_defaults(handler=train)

    evaluate = commands.add_parser("eval", help="evaluate with lmms-eval (docs/lmms-eval.md)")
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True)
    p = eval_commands.add_parser(
        "tasks", help="write a job's tasks and probe as lmms-eval tasks (local JSON, our scoring)"
    )
    add_job_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="directory for lmms-eval --include_path")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a directory this command wrote"
    )
    p.set_defaults(handler=eval_tasks)
    p = eval_commands.add_parser(
        "lmms", help="run lmms-eval tasks on one checkpoint in Ray actors (as eval.lmms_tasks does)"
    )
    p.add_argument("checkpoint", type=Path, help="a Hugging Face checkpoint directory")
    p.add_argument(
        "--tasks", required=True, help="lmms-eval task, group or tag names, comma-separated"
    )
    p.add_argument(
        "--include-path",
        type=Path,
        action="append",
        default=[],
        help="task directory beside lmms-eval's own (repeatable), e.g. from `llava-c eval tasks`",
    )
    p.add_argument("--limit", type=positive_int, help="documents per task (default: all)")
    p.add_argument(
        "--job",
        type=Path,
        help="take the template, batch size, generation cap and the method's model loader from a job",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of --job")
    p.add_argument(
        "--template", choices=["vicuna_v1", "plain"], help="default: the job's, vicuna_v1"
    )
    p.add_argument("--batch-size", type=positive_int, help="default: the job's eval, 16")
    p.add_argument("--max-new-tokens", type=positive_int, help="default: the job's eval, 32")
    p.add_argument("--out", required=True, type=Path, help="lmms-eval's results JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    add_verbose(p)
    p.set_defaults(handler=eval_lmms)

    figure = commands.add_parser("figure", help="figures over runs")
    figure_commands = figure.add_subparsers(dest="figure_command", required=True)
    p = figure_commands.add_parser(
        "alpha-curves",
        help="new-task and probe score against α (SAC / ModelMix, ± UIR), first and last task",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, help="run or search-alpha output directories")
    p.add_argument("--out", type=Path, help="PNG (default: RUN_DIRS[0]/plots/alpha_curves.png)")
    p.set_defaults(handler=figure_alpha_curves)

    consolidate_command.register(commands)
    search_command.register(commands)

    data = commands.add_parser("data", help="LLaVA data: validate, generate the built-in benchmark")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    p = data_commands.add_parser("validate", help="report every invalid record; exit 1 if any")
    p.add_argument("file", type=Path)
    p.add_argument("--image-folder", type=Path)
    p.add_argument("--skipped-out", type=Path, help="write the invalid ids and reasons here (JSON)")
    add_pixel_limit(p)
    p.set_defaults(handler=data_validate)
    p = data_commands.add_parser(
        "prepare", help="validated records + image bytes as Parquet shards"
    )
    p.add_argument("file", type=Path)
    p.add_argument("--image-folder", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--mode", choices=("strict", "skip"), default="strict")
    p.add_argument("--overwrite", action="store_true")
    add_pixel_limit(p)
    p.set_defaults(handler=data_prepare)
    p = data_commands.add_parser("synth", help="generate the built-in benchmark")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", choices=("test", "small", "full"), default="small")
    p.set_defaults(handler=data_synth)

    model = commands.add_parser("model", help="build models")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    p = model_commands.add_parser(
        "tiny", help="a tiny real LLaVA with a tokenizer trained on a benchmark"
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--benchmark", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=model_tiny)
    compose_command.register(model_commands)

    config = commands.add_parser("config", help="inspect job configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    p = config_commands.add_parser("show", help="print the resolved job config")
    add_job_arguments(p)
    p.add_argument("--no-check-files", action="store_true", help="do not require the data files")
    p.set_defaults(handler=config_show)

    p = commands.add_parser("methods", help="list the registered methods")
    p.set_defaults(handler=methods_list)

    jobs = commands.add_parser("jobs", help="the job YAMLs shipped with the package")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    p = jobs_commands.add_parser("list", help="list the packaged jobs")
    p.set_defaults(handler=jobs_list)
    p = jobs_commands.add_parser("show", help="print a packaged job")
    p.add_argument("name", help="packaged job name, e.g. demo")
    p.set_defaults(handler=jobs_show)
    p = jobs_commands.add_parser("copy", help="copy a packaged job to edit it")
    p.add_argument("name", help="packaged job name, e.g. demo")
    p.add_argument("dest", help="destination file, or a directory (existing, or ending in /)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DEST file")
    p.set_defaults(handler=jobs_copy)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with positionals and options intermixed, so overrides may follow or precede options.

    argparse's parse_intermixed_args refuses parsers with subcommands, so the subcommand words
    are followed down to the leaf command's parser, which then parses the rest intermixed.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    leaf, depth = parser, 0
    while (choices := subcommands(leaf)) and depth < len(argv) and argv[depth] in choices:
        leaf, depth = choices[argv[depth]], depth + 1
    if subcommands(leaf):  # no (or an unknown) subcommand: argparse's own usage error or help
        return parser.parse_args(argv)
    return leaf.parse_intermixed_args(argv[depth:])


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommand parsers by name (empty for a leaf command)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if hasattr(args, "verbose"):
        console.setup(verbose=args.verbose)
    try:
        return args.handler(args)
    except LlavaCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
