"""The built-in default's folder: a world of another version is refused, never silently reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_c_ray.builtin import WORLD_VERSION, Builtin, check_world_version
from llava_c_ray.errors import LlavaCError


def built(root: Path) -> Builtin:
    return Builtin(root, root / "benchmark", root / "tiny", root / "vision", root / "base")


def test_a_new_folder_is_marked_with_this_version(tmp_path: Path) -> None:
    check_world_version(built(tmp_path / "builtin"))
    marker = tmp_path / "builtin" / "world.json"
    assert json.loads(marker.read_text()) == {"version": WORLD_VERSION}
    check_world_version(built(tmp_path / "builtin"))  # this version's folder: reused


@pytest.mark.parametrize("marker", [None, {"version": 1}])
def test_an_earlier_world_is_refused_and_left_as_it_is(tmp_path: Path, marker) -> None:
    root = tmp_path / "builtin"
    (root / "benchmark").mkdir(parents=True)
    (root / "benchmark" / "benchmark.json").write_text("{}")
    if marker is not None:
        (root / "world.json").write_text(json.dumps(marker))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(LlavaCError, match="version 1") as error:
        check_world_version(built(root))
    assert "--out" in str(error.value)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
