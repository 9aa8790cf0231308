"""The methods registry: each method's stages, loss terms, consolidation rule and parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_c_ray.config import job_from_dict
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods import METHODS, StageContext, bind, get_method

TASKS = ["icon", "super", "math"]


def job(**overrides: object):
    data = {
        "tasks": [{"name": t, "train": "x", "test": "y"} for t in TASKS],
        "inquiry": {"path": "q.json"},
        **overrides,
    }
    return job_from_dict(data, check_files=False)


def context(name: str, config=None) -> StageContext:
    config = config or job(method={"name": name})
    bound = bind(config)
    stages = tuple(bound.stages(TASKS))
    return StageContext(config, bound.params, stages[0], stages, Path("s"), Path("d"), Path("m"))


@pytest.mark.parametrize(
    ("name", "terms", "rule", "stages"),
    [
        ("finetune", {}, "none", 3),
        ("joint", {}, "none", 1),
        ("modelmix", {}, "modelmix", 3),
        ("sac", {}, "sac", 3),
        ("uir", {"uir_loss": 1.0}, "none", 3),
        ("llava_c", {"uir_loss": 1.0}, "sac", 3),
    ],
)
def test_method_decisions(name: str, terms: dict, rule: str, stages: int) -> None:
    bound = bind(job(method={"name": name}))
    parts = get_method(name).training(context(name))
    assert {t.name: t.weight for t in parts.losses} == terms
    assert bound.rule.name == rule
    planned = bound.stages(TASKS)
    assert len(planned) == stages
    assert sorted(t for s in planned for t in s.tasks) == sorted(TASKS)


def test_uir_weight_comes_from_the_job_and_zero_drops_the_term() -> None:
    assert (
        get_method("uir").training(context("uir", job(uir={"weight": 0.5}))).losses[0].weight == 0.5
    )
    assert get_method("uir").training(context("uir", job(uir={"weight": 0}))).losses == ()


def test_stage_dirnames_are_ordered() -> None:
    names = [s.dirname for s in bind(job(method={"name": "sac"})).stages(TASKS)]
    assert names == ["01-icon", "02-super", "03-math"]


def test_explicit_consolidation_overrides_method() -> None:
    config = job(method={"name": "finetune"}, consolidation={"method": "modelmix"})
    assert bind(config).rule.name == "modelmix"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"method": {"name": "nope"}}, "(?s)unknown method 'nope'.*llava_c"),
        ({"consolidation": {"method": "ties"}}, "(?s)unknown consolidation rule 'ties'.*sac"),
        ({"method": {"name": "sac", "params": {"alpha": 1}}}, r"method\.params\.alpha: unknown"),
    ],
)
def test_bad_names_and_params_are_named(overrides: dict, match: str) -> None:
    with pytest.raises(LlavaCError, match=match):
        bind(job(**overrides))


def test_every_method_lists_its_parameters_with_defaults() -> None:
    for method in METHODS.values():
        defaults = method.params().model_dump()
        assert [line.split(" = ")[0] for line in method.parameter_lines()] == list(defaults)
