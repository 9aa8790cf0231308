"""The job YAMLs shipped inside the package (`llava_c_ray/jobs/`), found by name.

They are package data, so an installed wheel has them too; a checkout's top-level `jobs/` is a
link to the same directory. `llava-c jobs copy NAME DEST` gives a user a copy to edit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from llava_c_ray.errors import LlavaCError

JOBS_DIR = Path(__file__).resolve().parent / "jobs"


def job_names() -> list[str]:
    """The packaged jobs' names (file stems), sorted."""
    return sorted(path.stem for path in JOBS_DIR.glob("*.yaml"))


def packaged_job(name: str) -> Path:
    """The packaged job `name` (`demo` or `demo.yaml`), or an error listing the known ones."""
    path = JOBS_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if "/" in name or not path.is_file():
        raise LlavaCError(
            f"no packaged job {name!r}",
            fix=f"use one of: {', '.join(job_names())} (`llava-c jobs list`)",
        )
    return path


def resolve_job(path: Path) -> Path:
    """A job file argument: an existing file as given, else a bare packaged job name."""
    bare = len(path.parts) == 1 and path.suffix in ("", ".yaml")
    if path.exists() or not bare or path.stem not in job_names():
        return path
    return packaged_job(path.name)


def summary(path: Path) -> str:
    """A job's first header line (the command that launches it), whitespace collapsed."""
    first = path.read_text().splitlines()[0] if path.stat().st_size else ""
    return " ".join(first.lstrip("#").split())


def copy_job(name: str, dest: str | Path, *, overwrite: bool = False) -> Path:
    """Copy the packaged job `name` to `dest`: a file, or a directory (existing, or ending in /)."""
    source = packaged_job(name)
    into = Path(dest).is_dir() or str(dest).endswith("/")
    target = Path(dest) / source.name if into else Path(dest)
    if target.exists() and not overwrite:
        raise LlavaCError("already exists", path=target, fix="pass --overwrite or another DEST")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
