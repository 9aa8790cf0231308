"""`llava-c` parsing: key=value overrides anywhere after the job file, and what `demo` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llava_c_ray.builtin import Builtin
from llava_c_ray.cli import build_parser, main, parse_args, subcommands
from llava_c_ray.methods import METHODS
from llava_c_ray.packaged_jobs import JOBS_DIR


def leaf_commands(parser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for every runnable command."""
    for name, sub in subcommands(parser).items():
        if subcommands(sub):
            yield from leaf_commands(sub, (*prefix, name))
        else:
            yield (*prefix, name), sub


# One valid argv per command that takes overrides, the overrides split around its options.
OVERRIDE_COMMANDS = {
    ("run",): ["run", "job.yaml", "a=1", "--run-dir", "r", "b=2", "--force-new"],
    ("demo",): ["demo", "a=1", "--out", "o", "b=2", "--compare"],
    ("train",): ["train", "job.yaml", "--task", "t", "a=1", "--init", "i", "--out", "o", "b=2"],
    ("search-alpha",): [
        *("search-alpha", "--base", "b", "--adapter", "d", "a=1", "--job", "job.yaml"),
        *("--task", "t", "b=2", "--out", "o"),
    ],
    ("config", "show"): ["config", "show", "job.yaml", "a=1", "--no-check-files", "b=2"],
    ("eval", "tasks"): ["eval", "tasks", "job.yaml", "a=1", "--out", "o", "b=2", "--overwrite"],
    ("eval", "lmms"): [
        *("eval", "lmms", "ckpt", "--job", "job.yaml", "a=1", "--tasks", "mme"),
        *("--out", "o.json", "b=2", "--limit", "3"),
    ],
}


def test_every_command_that_takes_overrides_is_covered() -> None:
    takes_overrides = {
        words
        for words, parser in leaf_commands(build_parser())
        if any(action.dest == "overrides" for action in parser._actions)
    }
    assert takes_overrides == set(OVERRIDE_COMMANDS)


@pytest.mark.parametrize("argv", OVERRIDE_COMMANDS.values(), ids=lambda a: a[0])
def test_overrides_are_accepted_before_and_after_options(argv: list[str]) -> None:
    args = parse_args(build_parser(), argv)
    assert args.overrides == ["a=1", "b=2"]
    assert callable(args.handler)


def test_train_with_overrides_after_its_options() -> None:
    """The issue's example, which argparse alone rejected with "unrecognized arguments"."""
    argv = ["train", "J", "--task", "T", "--init", "I", "--out", "O", "training.max_steps=20"]
    args = parse_args(build_parser(), argv)
    assert (args.job, args.task, args.init, args.out) == (Path("J"), "T", Path("I"), Path("O"))
    assert args.overrides == ["training.max_steps=20"]


def test_unknown_options_and_missing_commands_are_still_usage_errors(capsys) -> None:
    for argv in (["config", "show", "job.yaml", "--bogus"], ["config"], [], ["nope"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize(
    "order",
    [
        ["training.lr=0.5", "--no-check-files", "training.epochs=3"],
        ["--no-check-files", "training.lr=0.5", "training.epochs=3"],
        ["training.lr=0.5", "training.epochs=3", "--no-check-files"],
    ],
)
def test_config_show_applies_overrides_around_options(
    order: list[str], tiny_benchmark: Path, capsys
) -> None:
    job = JOBS_DIR / "demo.yaml"
    assert main(["config", "show", str(job), f"benchmark.path={tiny_benchmark}", *order]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["training"]["lr"] == 0.5 and shown["training"]["epochs"] == 3


def test_a_bare_name_is_a_packaged_job(tiny_benchmark: Path, capsys) -> None:
    argv = ["config", "show", "demo", "--no-check-files", f"benchmark.path={tiny_benchmark}"]
    assert main(argv) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "demo"


@pytest.fixture
def fake_demo(monkeypatch, tiny_benchmark: Path, tiny_checkpoint: Path) -> list[Any]:
    """`demo` with the built-in default and the pipeline replaced: records the jobs it runs."""
    ran: list[Any] = []

    def ensure_builtin(root: Path) -> Builtin:
        return Builtin(root, tiny_benchmark, tiny_checkpoint, tiny_checkpoint, tiny_checkpoint)

    def run_job(job, force_new: bool = False) -> dict[str, Any]:
        ran.append(job)
        return {"job": job.name, "method": job.method.name}

    monkeypatch.setattr("llava_c_ray.builtin.ensure_builtin", ensure_builtin)
    monkeypatch.setattr("llava_c_ray.pipeline.run_job", run_job)
    monkeypatch.setattr("llava_c_ray.evaluate.report.run_report", lambda results, run_dir: "")
    monkeypatch.setattr("llava_c_ray.evaluate.report.comparison_table", lambda runs: "")
    monkeypatch.setattr("llava_c_ray.evaluate.report.seed_table", lambda runs: "")
    return ran


def test_demo_compare_runs_every_registered_method_in_order(fake_demo, tmp_path: Path) -> None:
    assert main(["demo", "--compare", "--out", str(tmp_path), "training.max_steps=2"]) == 0
    assert [job.method.name for job in fake_demo] == list(METHODS)
    assert all(job.name == f"demo-{job.method.name}" for job in fake_demo)
    assert all(job.training.max_steps == 2 for job in fake_demo)


def test_demo_methods_selects_and_plain_demo_runs_the_jobs_method(fake_demo, tmp_path) -> None:
    assert main(["demo", "--methods", "sac, finetune", "--out", str(tmp_path)]) == 0
    assert [(job.name, job.method.name) for job in fake_demo] == [
        ("demo-sac", "sac"),
        ("demo-finetune", "finetune"),
    ]
    fake_demo.clear()
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert [(job.name, job.method.name) for job in fake_demo] == [("demo", "llava_c")]


def test_demo_seeds_runs_each_method_once_per_seed_in_its_own_run(fake_demo, tmp_path) -> None:
    assert main(["demo", "--methods", "sac,finetune", "--seeds", "2", "--out", str(tmp_path)]) == 0
    assert [(job.name, job.method.name, job.training.seed) for job in fake_demo] == [
        ("demo-sac-s0", "sac", 0),
        ("demo-sac-s1", "sac", 1),
        ("demo-finetune-s0", "finetune", 0),
        ("demo-finetune-s1", "finetune", 1),
    ]


def test_demo_unknown_method_fails_before_any_work(monkeypatch, tmp_path, capsys) -> None:
    def ensure_builtin(root: Path) -> Builtin:
        raise AssertionError("the built-in default was built before the names were checked")

    monkeypatch.setattr("llava_c_ray.builtin.ensure_builtin", ensure_builtin)
    assert main(["demo", "--methods", "sac,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "llava_c" in err
