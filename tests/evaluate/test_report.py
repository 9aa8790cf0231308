"""`llava-c report`'s text and plots: one flag line per task scored below chance right after its
own stage; a routed run's routing matrix drawn per stage and its own-expert shares printed; a
plain run gets neither."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import EvalResult, write_eval
from llava_c_ray.evaluate.plots import draw_run_plots
from llava_c_ray.evaluate.report import below_chance, load_results, run_report, stage_routing
from llava_c_ray.files import write_json_atomic
from llava_c_ray.run_records import Results, Routing, TaskRouting

TASKS = ["icon_count", "attributes", "line_plot"]


def results(matrix, chance, stages=("initial", *TASKS), finished=True) -> Results:
    return Results(
        job="j",
        method="hide",
        tasks=TASKS[: len(matrix[0])],
        stages=list(stages)[: len(matrix)],
        accuracy_matrix=matrix,
        general=[None] * len(matrix),
        finished=finished,
        chance=chance,
    )


def test_each_task_below_chance_right_after_its_own_stage_gets_one_line() -> None:
    run = results(
        [
            [0.0, 0.0, 0.0],
            [10.0, 0.0, 0.0],  # icon_count below its chance 25 right after its stage: flagged
            [30.0, 21.875, 0.0],  # attributes at its chance (21.875 recorded as 21.88): not
            [0.0, 0.0, 60.0],  # later drops below chance are forgetting, not flagged
        ],
        {"icon_count": 25.0, "attributes": 21.88, "line_plot": 50.0},
    )
    assert below_chance(run) == [
        "BELOW CHANCE: icon_count scores 10.0 after its own stage (icon_count), chance 25.0"
    ]
    assert run_report(run).splitlines()[-1] == below_chance(run)[0]


def test_the_flag_needs_the_tasks_own_stage_and_its_chance() -> None:
    unfinished = results([[0.0] * 3, [50.0, 0.0, 0.0]], {t: 25.0 for t in TASKS}, finished=False)
    assert below_chance(unfinished) == []  # attributes, line_plot: their stages have not run
    no_chance = results([[0.0] * 3, [5.0, 0.0, 0.0]], {"icon_count": None})
    assert below_chance(no_chance) == []


def test_a_one_stage_run_flags_against_its_only_stage() -> None:
    joint = results(
        [[0.0, 0.0], [10.0, 90.0]], {"icon_count": 25.0, "attributes": 50.0}, ("initial", "joint")
    )
    assert below_chance(joint) == [
        "BELOW CHANCE: icon_count scores 10.0 after its own stage (joint), chance 25.0"
    ]


def routing(experts: list[str], own: dict[str, float | None]) -> Routing:
    return Routing(
        experts=experts,
        tasks={
            t: TaskRouting(rows=4, mean_weights=[1 / len(experts)] * len(experts), own_expert=o)
            for t, o in own.items()
        },
    )


def write_run(run_dir: Path, stage_routing: list[Routing | None]) -> Results:
    """A finished three-stage run whose stage i's eval.json holds `stage_routing[i]`."""
    run = results([[0.0] * 3, [50.0] * 3, [50.0] * 3, [50.0] * 3], {})
    write_json_atomic(run_dir / "results.json", run.model_dump(mode="json"))
    for i, (stage, record) in enumerate(zip(run.stages, stage_routing, strict=True)):
        scores = dict.fromkeys(TASKS, 50.0)
        eval_json = run_dir / "stages" / f"{i:02d}-{stage}" / "eval.json"
        eval_json.parent.mkdir(parents=True)
        write_eval(eval_json, run_dir, EvalResult(scores, {}, record))
    return load_results(run_dir)


def test_a_routed_run_gets_a_routing_matrix_per_stage_and_its_own_expert_shares(
    tmp_path: Path,
) -> None:
    own = {"icon_count": 100.0, "attributes": None, "line_plot": None, "general_probe": None}
    per_stage = [
        None,  # stage 0: the initial model is a plain checkpoint
        routing(TASKS[:1], own),
        routing(TASKS[:2], {**own, "attributes": 87.5}),
        routing(TASKS, {**own, "attributes": 87.5, "line_plot": 62.5}),
    ]
    run = write_run(tmp_path, per_stage)
    drawn = draw_run_plots(tmp_path, run)
    routing_plots = [p for p in drawn if p.name.startswith("routing_")]
    assert [p.name for p in routing_plots] == [
        "routing_01-icon_count.png",
        "routing_02-attributes.png",
        "routing_03-line_plot.png",
    ]
    assert all(p.stat().st_size > 0 for p in routing_plots)
    report = run_report(run, tmp_path).splitlines()
    table = report[report.index("routed to own expert (% of each task's questions):") + 2 :]
    assert [line.split() for line in table] == [
        ["icon_count", "100.0", "-", "-"],
        ["attributes", "100.0", "87.5", "-"],
        ["line_plot", "100.0", "87.5", "62.5"],
    ]


def test_a_plain_run_gets_no_routing_plot_or_table(tmp_path: Path) -> None:
    run = write_run(tmp_path, [None] * 4)
    assert not [p for p in draw_run_plots(tmp_path, run) if p.name.startswith("routing_")]
    assert "routed to own expert" not in run_report(run, tmp_path)
    assert stage_routing(tmp_path) == []


def test_an_eval_json_that_is_not_one_names_its_file(tmp_path: Path) -> None:
    bad = tmp_path / "stages" / "01-a" / "eval.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"model": "m", "scores": {"a": "high"}}')
    with pytest.raises(LlavaCError, match="eval.json"):
        stage_routing(tmp_path)


def test_the_seed_table_gives_mean_and_std_and_calls_small_differences_noise() -> None:
    from llava_c_ray.evaluate.report import seed_table

    def run(method: str, avg: float, retention: float) -> Results:
        metrics = {"avg": avg, "general_retention": retention}
        return Results(
            job="j",
            method=method,
            tasks=["a"],
            stages=[],
            accuracy_matrix=[],
            general=[],
            finished=True,
            metrics=metrics,
        )

    runs = [run("finetune", a, 0.0) for a in (10.0, 12.0, 14.0)]
    runs += [run("sac", a, r) for a, r in ((13.0, 0.5), (14.0, 0.6), (15.0, 0.7))]
    runs += [run("joint", 40.0, 0.1)]
    table = seed_table(runs).splitlines()
    assert table[1].split()[:5] == ["finetune", "3", "12.0", "±", "2.0"]
    assert table[2].split()[:5] == ["sac", "3", "14.0", "±", "1.0"]
    assert table[3].split()[:3] == ["joint", "1", "40.0"]
    # Δavg = 2.0 < 2·√(1/3 + 4/3) = 2.58: noise; Δretention = 0.6 > 2·√(0.01/3) = 0.115: beyond
    assert table[4] == (
        "sac vs finetune: avg +2.0 (2 SE 2.6: within noise); "
        "general_retention +0.600 (2 SE 0.115: beyond noise)"
    )
    assert "one seed: noise unknown" in table[5]
