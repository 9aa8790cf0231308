"""Tests of llava_c_ray.storage on local paths, file:// and pyarrow mock:// URIs."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyarrow import fs as pafs

from llava_c_ray import storage
from llava_c_ray.errors import LlavaCError


def test_local_path_round_trip(tmp_path: Path) -> None:
    filesystem, path = storage.resolve(str(tmp_path))
    target = storage.join(path, "a", "b.json")
    storage.write_json_atomic(filesystem, target, {"x": 1})
    assert storage.read_json(filesystem, target) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_file_uri_resolves_to_local_fs(tmp_path: Path) -> None:
    filesystem, path = storage.resolve(f"file://{tmp_path}")
    assert isinstance(filesystem, pafs.LocalFileSystem)
    storage.write_json_atomic(filesystem, storage.join(path, "m.json"), [1, 2])
    assert (tmp_path / "m.json").exists()


@settings(max_examples=20, deadline=None)
@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=5))
def test_mock_uri_round_trip(data: dict) -> None:
    filesystem, path = storage.resolve("mock:///bucket/run")
    target = storage.join(path, "state.json")
    storage.write_json_atomic(filesystem, target, data)
    assert storage.read_json(filesystem, target) == data
    assert storage.exists(filesystem, target)


def test_copy_tree_local_to_file_uri(tmp_path: Path) -> None:
    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "d" / "x.txt").write_text("hi")
    storage.copy_tree(str(tmp_path / "src"), f"file://{tmp_path}/dst")
    assert (tmp_path / "dst" / "d" / "x.txt").read_text() == "hi"


def test_errors_name_the_path(tmp_path: Path) -> None:
    filesystem, path = storage.resolve(str(tmp_path))
    with pytest.raises(LlavaCError, match="missing.json"):
        storage.read_json(filesystem, storage.join(path, "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LlavaCError, match="invalid JSON"):
        storage.read_json(filesystem, str(tmp_path / "bad.json"))
    with pytest.raises(LlavaCError, match="nowhere://x"):
        storage.resolve("nowhere://x")


def test_sync_up_uploads_only_what_changed_and_sync_down_restores(tmp_path: Path) -> None:
    local = tmp_path / "run"
    (local / "stages" / "01").mkdir(parents=True)
    (local / "manifest.json").write_text('{"stages": []}')
    (local / "stages" / "01" / "w.bin").write_bytes(b"x" * 100)
    uri = f"file://{tmp_path}/remote/run"
    assert storage.sync_up(local, uri) == 2
    assert storage.sync_up(local, uri) == 0
    (local / "manifest.json").write_text('{"stages": [1]}')
    assert storage.sync_up(local, uri) == 1
    fresh = tmp_path / "elsewhere"
    assert storage.sync_down(uri, fresh)
    assert (fresh / "manifest.json").read_text() == '{"stages": [1]}'
    assert (fresh / "stages" / "01" / "w.bin").read_bytes() == b"x" * 100
    assert not storage.sync_down(uri, fresh)  # never over a non-empty local directory
    assert not storage.sync_down(f"file://{tmp_path}/nothing", tmp_path / "x")


def test_sync_up_uploads_an_equal_size_rewrite(tmp_path: Path) -> None:
    local = tmp_path / "run"
    local.mkdir()
    (local / "manifest.json").write_text('{"step": 10}')
    (local / "config.yaml").write_text("steps: 10\n")
    uri = f"file://{tmp_path}/remote/run"
    assert storage.sync_up(local, uri) == 2
    (local / "manifest.json").write_text('{"step": 20}')  # same length, rewritten in place
    assert storage.sync_up(local, uri) == 1
    assert (tmp_path / "remote" / "run" / "manifest.json").read_text() == '{"step": 20}'
    assert not (tmp_path / "remote" / "run" / storage.SYNC_STATE).exists()
    assert storage.sync_up(local, uri) == 0
    (local / "config.yaml").write_text("steps: 10\n")  # rewritten, content unchanged
    assert storage.sync_up(local, uri) == 0


def test_sync_down_records_what_it_fetched(tmp_path: Path) -> None:
    local = tmp_path / "run"
    local.mkdir()
    (local / "manifest.json").write_text("{}")
    uri = f"file://{tmp_path}/remote/run"
    storage.sync_up(local, uri)
    fresh = tmp_path / "elsewhere"
    assert storage.sync_down(uri, fresh)
    assert storage.sync_up(fresh, uri) == 0  # a resumed run does not push everything again
    (fresh / "manifest.json").write_text("[]")
    assert storage.sync_up(fresh, uri) == 1
