"""The README's method table lists every registered method, as the registry describes it."""

from __future__ import annotations

from pathlib import Path

from llava_c_ray.methods import METHODS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_has_every_method_and_no_other() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    listed = {row.split("`")[1]: row for row in rows}
    assert set(listed) == set(METHODS)
    for name, method in METHODS.items():
        cells = [c.strip() for c in listed[name].strip("|").split("|")]
        assert cells[1:] == [method.summary, method.adds, method.consolidation, method.source]
