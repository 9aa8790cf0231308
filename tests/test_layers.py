"""The import layers of llava_c_ray: a module imports only its own unit and the layers below it.

`LAYERS` is the architecture, bottom first; a unit is a subpackage (`data`, with `data/synthetic`)
or a top-level module (`rundir`). Every `import` counts: top-level, inside functions and inside
`if TYPE_CHECKING:`. Inside one layer units are independent except for the edges in `SAME_LAYER`.
A new module must be placed here before the suite passes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

import llava_c_ray

PACKAGE = "llava_c_ray"
ROOT = Path(llava_c_ray.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    # the error type, atomic writes, the console and log files; `llava_c_ray` is __init__.py
    (PACKAGE, "errors", "files", "console"),
    ("config", "packaged_jobs", "run_records"),  # job schema, shipped job YAMLs, run records
    ("data",),  # records, validation, templates, answer scoring, shards, the synthetic benchmark
    ("model",),  # checkpoints: tiny builder, compose, safetensors streaming, parameter names
    # the library's Ray edges: joining Ray, run-directory storage, and the three engines on them
    ("ray_session", "storage", "train", "consolidate", "evaluate"),
    ("methods",),  # continual-learning methods, composed from the engines
    ("search",),  # the α search, which runs a method's consolidation rule and loader
    ("pipeline", "rundir", "builtin"),  # a whole run: its directory, the built-in default
    ("cli",),
]
LAYER = {unit: index for index, units in enumerate(LAYERS) for unit in units}

# The only imports allowed between two units of one layer, as (importer, imported).
SAME_LAYER = frozenset(
    {
        (PACKAGE, "errors"),  # `from llava_c_ray import LlavaCError`
        ("files", "errors"),
        # The engines join Ray and reach storage through the two edge modules; the engines
        # themselves never import each other, and the edge modules import no engine.
        *(
            (engine, edge)
            for engine in ("train", "consolidate", "evaluate")
            for edge in ("ray_session", "storage")
        ),
        ("pipeline", "rundir"),
        ("pipeline", "builtin"),
    }
)


class Import(NamedTuple):
    importer: str  # dotted module name
    line: int
    target: str  # dotted name of what is imported (a module, or a name in one)


def unit(module: str) -> str:
    """`llava_c_ray.data.synthetic.benchmark` → `data`; the package itself → `llava_c_ray`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(source: str, module: str, *, is_package: bool = False) -> Iterator[Import]:
    """Every import of a llava_c_ray module in `source`, wherever it sits in the file."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from llava_c_ray import storage` imports the unit `storage`
            names = [f"{base}.{a.name}" for a in node.names] if base == PACKAGE else [base]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(f"{PACKAGE}."):
                yield Import(module, node.lineno, name)


def package_imports() -> list[Import]:
    return [
        found
        for path in sorted(ROOT.rglob("*.py"))
        for found in imports_in(
            path.read_text(), module_name(path), is_package=path.name == "__init__.py"
        )
    ]


def violations(imports: Iterable[Import]) -> list[str]:
    """One line per import that reaches up a layer, across its own layer, or to an unplaced unit."""
    found = []
    for importer, line, target in imports:
        source, imported = unit(importer), unit(target)
        where = f"{importer}:{line} imports {target}"
        if source == imported:
            continue
        if source not in LAYER or imported not in LAYER:
            missing = source if source not in LAYER else imported
            found.append(f"{where}: `{missing}` has no layer (add it to LAYERS)")
        elif LAYER[imported] > LAYER[source]:
            found.append(
                f"{where}: `{source}` (layer {LAYER[source]}) may not import from a higher layer "
                f"(`{imported}`, layer {LAYER[imported]})"
            )
        elif LAYER[imported] == LAYER[source] and (source, imported) not in SAME_LAYER:
            found.append(
                f"{where}: `{source}` and `{imported}` share layer {LAYER[source]} and this "
                "import is not in SAME_LAYER (move the shared piece below both)"
            )
    return found


def test_the_table_is_consistent() -> None:
    units = [u for layer in LAYERS for u in layer]
    assert len(units) == len(set(units)), "a unit is listed in two layers"
    for importer, imported in SAME_LAYER:
        assert LAYER[importer] == LAYER[imported], (importer, imported)


def test_every_module_has_a_layer() -> None:
    units = {unit(module_name(path)) for path in ROOT.rglob("*.py")}
    assert units - set(LAYER) == set(), "place these in LAYERS"
    assert set(LAYER) - units == set(), "LAYERS names units that do not exist"


def test_no_module_imports_upward() -> None:
    imports = package_imports()
    assert len(imports) > 100, "the parser found too few imports to be reading the package"
    problems = violations(imports)
    assert not problems, "\n".join(problems)


# The checker itself, on synthetic imports.


def synthetic(table: dict[str, list[str]]) -> list[Import]:
    return [
        Import(f"{PACKAGE}.{importer}", 1, f"{PACKAGE}.{target}")
        for importer, targets in table.items()
        for target in targets
    ]


@pytest.mark.parametrize(
    ("importer", "target"),
    [
        ("data.synthetic.benchmark", "evaluate.scoring"),  # data reaching up to evaluate
        ("model.tiny", "train.trainer"),  # model reaching up to train
        ("train.progress", "rundir"),
        ("methods.replay", "rundir"),
        ("methods.base", "search.tune"),
        ("consolidate.engine", "evaluate.evaluator"),  # same layer, not an allowed edge
        ("train.stage", "consolidate.engine"),
        ("ray_session", "train.stage"),
        ("storage", "ray_session"),
        ("rundir", "pipeline"),
        ("errors", "files"),
        ("data.shards", "unplaced"),  # a unit the table does not know
    ],
)
def test_checker_rejects(importer: str, target: str) -> None:
    (problem,) = violations(synthetic({importer: [target]}))
    assert f"{PACKAGE}.{importer}:1 imports {PACKAGE}.{target}" in problem


def test_checker_accepts_downward_same_unit_and_listed_edges() -> None:
    allowed = {
        "cli": ["pipeline", "methods", "config", "errors"],
        "pipeline": ["rundir", "builtin", "search.tune", "methods.base", "storage"],
        "search.command": ["methods", "consolidate.rules", "evaluate.evaluator"],
        "methods.base": ["train.hooks", "consolidate.rules", "evaluate.evaluator", "files"],
        "consolidate.engine": ["consolidate.rules", "ray_session", "model.keys", "files"],
        "evaluate.evaluator": ["ray_session", "storage", "data.scoring"],
        "train.stage": ["ray_session", "data.shards"],
        "data.synthetic.benchmark": ["data.scoring", "files", "errors"],
        "files": ["errors"],
    }
    assert violations(synthetic(allowed)) == []


def test_parser_finds_every_kind_of_import() -> None:
    source = """
import os
import llava_c_ray.model.keys
from llava_c_ray.errors import LlavaCError
from llava_c_ray import storage, rundir
from . import shards
from ..evaluate import scoring
from .synthetic.draw import COLORS
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from llava_c_ray.train.spec import StageSpec

def late():
    from llava_c_ray.pipeline import run_job
    importlib.import_module("llava_c_ray.cli")
"""
    found = [i.target for i in imports_in(source, f"{PACKAGE}.data.records")]
    assert sorted(found) == sorted(
        f"{PACKAGE}.{name}"
        for name in (
            "model.keys",
            "errors",
            "storage",
            "rundir",
            "data",  # from . import shards
            "evaluate",  # from ..evaluate import scoring
            "data.synthetic.draw",
            "train.spec",  # under TYPE_CHECKING
            "pipeline",  # inside a function
            "cli",  # import_module
        )
    )
    upward = violations(imports_in(source, f"{PACKAGE}.data.records"))
    assert len(upward) == 7, "\n".join(upward)  # all but errors, data and data.synthetic
