"""The α-curve figure: curves from α-search records (pure), and one PNG from run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_c_ray.errors import LlavaCError
from llava_c_ray.search.alpha_curves import (
    AlphaCurve,
    alpha_curves_figure,
    curves_from_search,
    first_and_last,
)


def search_record(rule: str = "sac", modelmix: bool = True, old: bool = False) -> dict:
    trials = []
    for alpha in (1.0, 0.1, 0.5):  # out of order, as Tune may record them
        entry = {"new": 100 * alpha, "old": 50.0 if old else None, "general": 90 - 50 * alpha}
        trial = {"alpha": alpha, "rung": 8, "objective": 0.0, **entry}
        if modelmix:
            trial["modelmix"] = {**entry, "new": 80 * alpha}
        trials.append(trial)
    return {"rule": rule, "best_alpha": 0.5, "trials": trials}


def test_the_searched_rule_and_modelmix_become_two_curves_sorted_by_alpha() -> None:
    sac, mix = curves_from_search(search_record(), stage=1, task="icon_count", uir=True)
    assert (sac.label, mix.label) == ("SAC + UIR", "ModelMix + UIR")
    assert sac.alphas == mix.alphas == [0.1, 0.5, 1.0]
    assert sac.new == [10.0, 50.0, 100.0]
    assert mix.new == [8.0, 40.0, 80.0]
    assert sac.general == mix.general == [85.0, 65.0, 40.0]
    assert (sac.chosen, mix.chosen) == (0.5, None)


def test_without_compare_modelmix_there_is_one_curve() -> None:
    (curve,) = curves_from_search(search_record(modelmix=False), stage=2, task="a", uir=False)
    assert curve.label == "SAC"
    assert curve.old == [None, None, None]


def test_first_and_last_stage_are_picked_once_each() -> None:
    def curve(stage: int) -> AlphaCurve:
        return AlphaCurve("SAC", stage, f"t{stage}", [0.1], [1.0], [None], [1.0])

    assert first_and_last([curve(3), curve(1), curve(5), curve(1)]) == [(1, "t1"), (5, "t5")]
    assert first_and_last([curve(2)]) == [(2, "t2")]
    assert first_and_last([]) == []


def fake_run(root: Path, method: str) -> Path:
    """A run directory holding only what the figure reads: manifest, results, trials."""
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"method": method}))
    (root / "results.json").write_text(json.dumps({"chance": {"a": 25.0, "c": 50.0}}))
    for index, task in ((1, "a"), (2, "b"), (3, "c")):
        stage = root / "stages" / f"0{index}-{task}" / "search"
        stage.mkdir(parents=True)
        (stage / "trials.json").write_text(json.dumps(search_record(old=index > 1)))
    return root


def test_the_figure_draws_one_png_from_several_runs(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "uir", "llava_c"), fake_run(tmp_path / "plain", "sac")]
    out = alpha_curves_figure(runs, tmp_path / "figure" / "alpha_curves.png")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_a_run_without_search_records_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(LlavaCError, match="search.enabled=true"):
        alpha_curves_figure([tmp_path], tmp_path / "x.png")


def test_the_command_writes_into_the_first_runs_plots(tmp_path: Path, capsys) -> None:
    from llava_c_ray.cli import main

    runs = [fake_run(tmp_path / "uir", "llava_c"), fake_run(tmp_path / "plain", "sac")]
    assert main(["figure", "alpha-curves", *map(str, runs)]) == 0
    assert (runs[0] / "plots" / "alpha_curves.png").read_bytes().startswith(b"\x89PNG")
    assert main(["figure", "alpha-curves", str(tmp_path / "nothing")]) == 2
    assert "search.enabled=true" in capsys.readouterr().err
