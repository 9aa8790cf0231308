"""`atomic_directory` and `move_into_place`: an output is the old one or the new one, never half."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import atomic_directory, finish_interrupted, move_into_place

OLD = {"a": "old-a", "b": "old-b", "sub/c": "old-c"}
NEW = {"a": "new-a", "d": "new-d", "sub/e": "new-e", "sub/deeper/f": "new-f"}


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def read_tree(root: Path) -> dict[str, str] | None:
    if not root.is_dir():
        return None
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_writes_the_new_output_and_leaves_no_sibling(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with atomic_directory(out) as tmp:
        assert tmp.parent == out.parent and tmp.is_dir() and not any(tmp.iterdir())
        assert not out.exists()
        write_tree(tmp, NEW)
    assert read_tree(out) == NEW
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_overwrite_replaces_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_tree(out, OLD)
    with atomic_directory(out, overwrite=True) as tmp:
        assert read_tree(out) == OLD  # the old output stays readable while the new one is written
        write_tree(tmp, NEW)
    assert read_tree(out) == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_without_overwrite_an_existing_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_tree(out, OLD)
    with pytest.raises(LlavaCError, match="output exists") as error, atomic_directory(out):
        pytest.fail("the block must not run")
    assert str(out) in str(error.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LlavaCError, match="output exists"), atomic_directory(tmp_path / "file"):
        pass
    assert read_tree(out) == OLD and (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_an_empty_directory_counts_as_absent(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        write_tree(tmp, NEW)
    assert read_tree(tmp_path / "out") == NEW


@settings(max_examples=30, deadline=None)
@given(
    old=st.booleans(),
    overwrite=st.booleans(),
    written=st.dictionaries(
        st.sampled_from(["a", "b", "x/y", "x/z", "n"]), st.text(max_size=8), max_size=4
    ),
)
def test_an_exception_leaves_the_output_as_it_was(
    old: bool, overwrite: bool, written: dict[str, str]
) -> None:
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "out"
        if old:
            write_tree(out, OLD)
        with (
            pytest.raises((RuntimeError, LlavaCError)),
            atomic_directory(out, overwrite=overwrite) as tmp,
        ):
            write_tree(tmp, written)
            raise RuntimeError("killed while writing")
        assert read_tree(out) == (OLD if old else None)
        assert [p.name for p in Path(root).iterdir()] == (["out"] if old else [])


def test_move_into_place_keeps_the_old_until_the_new_is_there(tmp_path: Path) -> None:
    finished, out = tmp_path / "staging" / "model", tmp_path / "out" / "model"
    write_tree(finished, NEW)
    write_tree(out, OLD)
    with pytest.raises(LlavaCError, match="output exists"):
        move_into_place(finished, out)
    assert move_into_place(finished, out, overwrite=True) == out
    assert read_tree(out) == NEW and not finished.exists()
    assert [p.name for p in out.parent.iterdir()] == ["model"]


CRASHED = 77
WRITER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from llava_c_ray.files import atomic_directory

    out, crash_at, new = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    calls = 0

    def crash_point(function=lambda *a, **k: None):
        def counted(*args, **kwargs):
            global calls
            calls += 1
            if calls == crash_at:
                os._exit({crashed})  # like a kill: no finally, no cleanup
            return function(*args, **kwargs)
        return counted

    for name in ("rename", "replace", "unlink", "rmdir", "mkdir"):
        setattr(os, name, crash_point(getattr(os, name)))
    write_half = crash_point()
    with atomic_directory(out, overwrite=True) as tmp:
        for name, text in new.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
            write_half()  # a crash while the new output is only partly written
    """
).format(crashed=CRASHED)


@pytest.mark.parametrize("old", [True, False], ids=["replacing", "fresh"])
def test_a_crash_at_any_point_leaves_the_old_or_the_new_output(tmp_path: Path, old: bool) -> None:
    """Kill the writer at every filesystem step in turn: on disk there is always the old output or
    the new one, and `finish_interrupted` (which the next writer runs) puts it at `out`."""
    root = Path(__file__).resolve().parents[1]
    crash_at, outcomes = 0, set()
    while True:
        crash_at += 1
        case = tmp_path / f"crash{crash_at}"
        out = case / "out"
        case.mkdir()
        if old:
            write_tree(out, OLD)
        done = subprocess.run(
            [sys.executable, "-c", WRITER, str(out), str(crash_at), json.dumps(NEW)],
            cwd=root,
            capture_output=True,
            text=True,
        )
        assert done.returncode in (0, CRASHED), done.stderr
        if done.returncode == 0:
            assert read_tree(out) == NEW and [p.name for p in case.iterdir()] == ["out"]
            break
        before = read_tree(out)  # what a reader sees right after the crash
        assert before in [OLD, NEW, None], f"crash at step {crash_at} left a half output"
        if before is None:
            aside = read_tree(case / ".out.old")
            assert aside == (OLD if old else None), f"crash at step {crash_at} lost the output"
        finish_interrupted(out)
        after = read_tree(out)
        assert after in ([OLD, NEW] if old else [None, NEW]), f"crash at step {crash_at}"
        assert [p.name for p in case.iterdir()] == ([] if after is None else ["out"])
        outcomes.add("new" if after == NEW else "old")
    assert crash_at > 10, "the writer crashed at too few points to test the swap"
    # Replacing, crashes fall on both sides of the swap; fresh, the final rename is the last step.
    assert outcomes == ({"old", "new"} if old else {"old"})
