"""The methods registry: each method's stages, UIR weight and consolidation."""

from __future__ import annotations

import pytest

from llava_c_ray.config import job_from_dict
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods import METHODS, get_method

TASKS = ["icon", "super", "math"]


def job(**overrides: object):
    data = {"tasks": [{"name": t, "train": "x", "test": "y"} for t in TASKS], **overrides}
    return job_from_dict(data, check_files=False)


def test_first_six_methods_registered() -> None:
    assert {"finetune", "joint", "modelmix", "sac", "uir", "llava_c"} <= set(METHODS)


@pytest.mark.parametrize(
    ("name", "uir", "consolidation", "stages"),
    [
        ("finetune", 0.0, "none", 3),
        ("joint", 0.0, "none", 1),
        ("modelmix", 0.0, "modelmix", 3),
        ("sac", 0.0, "sac", 3),
        ("uir", 1.0, "none", 3),
        ("llava_c", 1.0, "sac", 3),
    ],
)
def test_method_decisions(name: str, uir: float, consolidation: str, stages: int) -> None:
    method, config = get_method(name), job()
    assert method.uir_weight(config) == uir
    assert method.consolidation_for(config) == consolidation
    planned = method.stages(TASKS)
    assert len(planned) == stages
    assert sorted(t for s in planned for t in s.tasks) == sorted(TASKS)


def test_stage_dirnames_are_ordered() -> None:
    names = [s.dirname for s in get_method("sac").stages(TASKS)]
    assert names == ["01-icon", "02-super", "03-math"]


def test_explicit_consolidation_overrides_method() -> None:
    config = job(consolidation={"method": "modelmix"})
    assert get_method("finetune").consolidation_for(config) == "modelmix"


def test_unknown_method_lists_known() -> None:
    with pytest.raises(LlavaCError, match="llava_c"):
        get_method("nope")
