"""Writing outputs so that neither a reader nor a crash ever sees half of one.

A JSON file or a whole output directory is written to a temporary sibling (same filesystem, so
the final rename is atomic) and renamed into place. This is the only place that does it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llava_c_ray.errors import LlavaCError

PARTIAL = ".partial"  # suffix of a temporary output directory: `.NAME.<8 hex>.partial`
ASIDE = ".old"  # suffix of a replaced output kept until its successor is in place: `.NAME.old`


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling and rename it over `path`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to write into; when the block ends without an
    exception it is renamed to `out` as `move_into_place` does.

    Without `overwrite` an existing `out` is refused (an empty directory counts as absent: it holds
    nothing to lose). On an exception the temporary is removed and `out` is left as it was.
    One writer per `out` at a time: entering also clears what a crashed earlier writer left.
    """
    out = Path(out)
    finish_interrupted(out)
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}{PARTIAL}")
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(finished: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Rename the complete directory `finished` (on the same filesystem) to `out`.

    An existing `out` (only with `overwrite`) is first renamed to `.NAME.old` and deleted only once
    the new one is in place, so a crash at any point leaves the old output or the new one on disk;
    a crash between the two renames leaves the old one aside, and `finish_interrupted` (run on
    entry here and by `atomic_directory`) puts it back.
    """
    out = Path(out)
    finish_interrupted(out)
    swap_in(finished, out, overwrite)
    return out


def swap_in(finished: Path, out: Path, overwrite: bool) -> None:
    """The two renames of `move_into_place`, then the old output's deletion."""
    refuse_existing(out, overwrite)
    aside = aside_path(out)
    if out.exists() or out.is_symlink():
        os.rename(out, aside)
    os.rename(finished, out)
    remove(aside)


def finish_interrupted(out: Path) -> None:
    """Repair what a crash inside `move_into_place` / `atomic_directory` left next to `out`: an
    old output moved aside comes back (or goes, if its successor made it into place), and
    temporaries of unfinished writes are removed."""
    aside = aside_path(out)
    if aside.exists() or aside.is_symlink():
        if out.exists() or out.is_symlink():
            remove(aside)
        else:
            os.rename(aside, out)
    if out.parent.is_dir():
        pattern = re.compile(rf"\.{re.escape(out.name)}\.[0-9a-f]{{8}}{re.escape(PARTIAL)}")
        for path in out.parent.iterdir():
            if pattern.fullmatch(path.name):
                remove(path)


def refuse_existing(out: Path, overwrite: bool) -> None:
    if overwrite or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    raise LlavaCError("output exists", path=out, fix="choose a new output path or overwrite it")


def aside_path(out: Path) -> Path:
    return out.with_name(f".{out.name}{ASIDE}")


def remove(path: Path) -> None:
    """Delete a file, symlink or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def refuse_overlap(out: Path, inputs: Iterable[Path | None], fix: str) -> None:
    """Raise when `out` is, holds or lies inside one of `inputs` (symlinks resolved): writing or
    replacing it could destroy what the command reads."""
    target = Path(out).resolve()
    for source in filter(None, inputs):
        resolved = Path(source).resolve()
        if target.is_relative_to(resolved) or resolved.is_relative_to(target):
            raise LlavaCError(
                f"output overlaps the input {source}; writing there could destroy it",
                path=out,
                fix=fix,
            )


def refuse_replacing(
    out: Path, overwrite: bool, ours: Callable[[Path], bool] | None = None, tool: str = ""
) -> None:
    """Refuse an `out` that is a file, or a non-empty directory unless `overwrite` is given and
    `ours(out)` says `tool` wrote it: --overwrite never replaces an arbitrary folder. `ours` None:
    the command has no --overwrite."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise LlavaCError("output exists and is a file", path=out, fix="choose a directory --out")
    if not out.exists() or not any(out.iterdir()):
        return  # absent, or an empty directory: nothing to lose
    if not overwrite or ours is None:
        raise LlavaCError(
            "output directory exists and is not empty",
            path=out,
            fix="choose a new --out" + (" or pass --overwrite" if ours is not None else ""),
        )
    if not ours(out):
        raise LlavaCError(
            f"output directory was not written by {tool}, so --overwrite will not replace it",
            path=out,
            fix="choose a new --out, or remove the folder yourself",
        )
