"""`llava-c`: parse the command line, hand it to one library function, turn user errors into one message."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_c_ray.config import dump_job, load_job
from llava_c_ray.consolidate import command as consolidate_command
from llava_c_ray.errors import LlavaCError
from llava_c_ray.model import compose as compose_command
from llava_c_ray.search import command as search_command

DEMO_JOB = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"
COMPARE_METHODS = ("finetune", "sac", "uir", "llava_c", "joint")


def config_show(args: argparse.Namespace) -> int:
    print(dump_job(load_job(args.job, args.overrides, check_files=not args.no_check_files)), end="")
    return 0


def run(args: argparse.Namespace) -> int:
    from llava_c_ray.evaluate.report import run_report
    from llava_c_ray.pipeline import run_job

    job = load_job(args.job, args.overrides)
    print(run_report(run_job(job, args.run_dir, force_new=args.force_new)))
    return 0


def demo(args: argparse.Namespace) -> int:
    """Build (or reuse) the built-in benchmark and base model, then run jobs/demo.yaml on them."""
    from llava_c_ray.builtin import ensure_builtin
    from llava_c_ray.evaluate.report import comparison_table, run_report
    from llava_c_ray.pipeline import run_job

    built = ensure_builtin(args.out / "builtin")
    paths = [
        f"benchmark.path={built.benchmark}",
        f"model.path={built.base_model}",
        f"storage.path={args.out}",
    ]
    methods = COMPARE_METHODS if args.compare else (None,)
    runs = []
    for method in methods:
        chosen = [f"method.name={method}", f"name=demo-{method}"] if method else []
        job = load_job(args.job, [*paths, *chosen, *args.overrides])
        results = run_job(job, force_new=args.force_new)
        print(run_report(results), flush=True)
        runs.append(results)
    if args.compare:
        print("\n" + comparison_table(runs))
    return 0


def report(args: argparse.Namespace) -> int:
    from llava_c_ray.evaluate.plots import draw_run_plots
    from llava_c_ray.evaluate.report import comparison_table, load_results, run_report

    runs = [load_results(path) for path in args.run_dirs]
    for path, results in zip(args.run_dirs, runs, strict=True):
        print(run_report(results) + "\n")
        if results.get("accuracy_matrix"):
            draw_run_plots(path, results)
    if len(runs) > 1:
        print(comparison_table(runs))
    return 0


def train(args: argparse.Namespace) -> int:
    from llava_c_ray.methods import get_method
    from llava_c_ray.train.spec import StageSpec
    from llava_c_ray.train.stage import run_stage

    job = load_job(args.job, args.overrides)
    spec = StageSpec.from_job(
        job,
        tasks=[job.task(args.task)],
        init=args.init,
        out=args.out,
        uir_weight=get_method(job.method.name).uir_weight(job),
    )
    result = run_stage(spec)
    print(f"θ_t: {result.model_dir}\nadapter: {result.adapter_dir}\nsteps: {result.steps}")
    return 0


def data_validate(args: argparse.Namespace) -> int:
    from llava_c_ray.data.records import read_records
    from llava_c_ray.data.validate import validate_records

    report_ = validate_records(read_records(args.file), args.file, args.image_folder)
    print(report_.summary())
    if args.skipped_out:
        report_.write_skipped(args.skipped_out)
    return 1 if report_.problems else 0


def data_prepare(args: argparse.Namespace) -> int:
    from llava_c_ray.data.shards import prepare_shards

    out = prepare_shards(
        args.file, args.image_folder, args.out, mode=args.mode, overwrite=args.overwrite
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
        print(f"{method.name:10s} {method.summary}")
    return 0


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", type=Path, help="job YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-4")


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
    p.set_defaults(handler=run)

    p = commands.add_parser("demo", help="the main job on the built-in tiny model and benchmark")
    p.add_argument("overrides", nargs="*", help="key=value overrides of jobs/demo.yaml")
    p.add_argument(
        "--out", type=Path, default=Path("runs"), help="where the builtin model and runs go"
    )
    p.add_argument("--job", type=Path, default=DEMO_JOB, help=argparse.SUPPRESS)
    p.add_argument(
        "--compare", action="store_true", help=f"run {', '.join(COMPARE_METHODS)} and compare"
    )
    p.add_argument(
        "--force-new", action="store_true", help="move an existing run of another config aside"
    )
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
    p.set_defaults(handler=train)

    consolidate_command.register(commands)
    search_command.register(commands)

    data = commands.add_parser("data", help="LLaVA data: validate, generate the built-in benchmark")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    p = data_commands.add_parser("validate", help="report every invalid record; exit 1 if any")
    p.add_argument("file", type=Path)
    p.add_argument("--image-folder", type=Path)
    p.add_argument("--skipped-out", type=Path, help="write the invalid ids and reasons here (JSON)")
    p.set_defaults(handler=data_validate)
    p = data_commands.add_parser(
        "prepare", help="validated records + image bytes as Parquet shards"
    )
    p.add_argument("file", type=Path)
    p.add_argument("--image-folder", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--mode", choices=("strict", "skip"), default="strict")
    p.add_argument("--overwrite", action="store_true")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
