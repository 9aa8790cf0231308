"""Parquet round trip: records and image bytes identical after prepare → read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_c_ray.cli import main
from llava_c_ray.data.records import load_records
from llava_c_ray.data.shards import prepare_shards, read_shards
from llava_c_ray.errors import LlavaCError


def test_round_trip(tiny_benchmark: Path, tmp_path: Path) -> None:
    source = tiny_benchmark / "icon_count" / "train.json"
    images = tiny_benchmark / "images"
    out = tmp_path / "shards"
    assert (
        main(["data", "prepare", str(source), "--image-folder", str(images), "--out", str(out)])
        == 0
    )
    originals = load_records(source, images)
    back = list(read_shards(out))
    assert [r for r, _ in back] == originals
    assert all(data == (images / r.image).read_bytes() for r, data in back)
    assert (
        main(["data", "prepare", str(source), "--image-folder", str(images), "--out", str(out)])
        == 2
    )
    with pytest.raises(LlavaCError, match="exists"):
        prepare_shards(source, images, out)


def test_text_only_records(tiny_benchmark: Path, tmp_path: Path) -> None:
    out = prepare_shards(
        tiny_benchmark / "text_qa" / "test.json", None, tmp_path / "t", records_per_shard=3
    )
    rows = list(read_shards(out))
    assert len(rows) == len(load_records(tiny_benchmark / "text_qa" / "test.json")) and all(
        b is None for _, b in rows
    )
    assert len(list(out.glob("*.parquet"))) > 1


def test_manifest_and_overwrite(tiny_benchmark: Path, tmp_path: Path) -> None:
    import hashlib

    source = tiny_benchmark / "icon_count" / "val.json"
    out = prepare_shards(source, tiny_benchmark / "images", tmp_path / "s", records_per_shard=2)
    (out / "stale.txt").write_text("left from an earlier run")
    out = prepare_shards(source, tiny_benchmark / "images", out, overwrite=True)
    manifest = json.loads((out / "manifest.json").read_text())
    records = load_records(source, tiny_benchmark / "images")
    assert manifest["records"] == manifest["with_image"] == len(records)
    assert manifest["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["shards"] + ["manifest.json"])
    assert not list(tmp_path.glob(".s.*"))


@pytest.mark.integration
def test_ray_dataset_reads_every_record(tiny_benchmark: Path, tmp_path: Path, ray_cluster) -> None:
    from llava_c_ray.data.shards import ray_dataset

    source = tiny_benchmark / "icon_count" / "val.json"
    out = prepare_shards(source, tiny_benchmark / "images", tmp_path / "s", records_per_shard=2)
    rows = ray_dataset([out]).take_all()
    assert sorted(r["id"] for r in rows) == sorted(r.id for r, _ in read_shards(out))
    assert all(r["image_bytes"] for r in rows)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory)."""
    return {
        p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def record(record_id: str, image: str | None) -> dict:
    human = "<image>\nWhat is it?" if image else "What is it?"
    raw = {
        "id": record_id,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "red"}],
    }
    return raw | ({"image": image} if image else {})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/data/train.json with its images in root/data/img (one in a subfolder)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "data" / "img" / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4), "red").save(root / "data" / "img" / "a.png")
    Image.new("RGB", (4, 4), "blue").save(root / "data" / "img" / "sub" / "b.png")
    records = [record("a", "a.png"), record("b", "sub/b.png"), record("t", None)]
    (root / "data" / "train.json").write_text(json.dumps(records))
    return root


INPUTS = ["data/train.json", "data/img"]


@settings(max_examples=60, deadline=None)
@given(
    which=st.sampled_from(INPUTS),
    up=st.integers(0, 2),
    down=st.lists(st.sampled_from(["x", "sub", "shards", "a.png"]), max_size=3),
    overwrite=st.booleans(),
    mode=st.sampled_from(["strict", "skip"]),
)
def test_out_above_or_under_an_input_is_refused(
    dataset: Path, which: str, up: int, down: list[str], overwrite: bool, mode: str
) -> None:
    source = dataset / which
    out = source.parents[up - 1] if up else source.joinpath(*down)
    before = snapshot(dataset)
    with pytest.raises(LlavaCError, match="overlaps the input"):
        prepare_shards(
            dataset / "data" / "train.json",
            dataset / "data" / "img",
            out,
            mode=mode,
            overwrite=overwrite,
        )
    assert snapshot(dataset) == before


def test_the_reported_data_loss_case_is_refused(dataset: Path, capsys) -> None:
    data = dataset / "data"
    before = snapshot(dataset)
    argv = ["data", "prepare", str(data / "train.json"), "--image-folder", str(data / "img")]
    assert main([*argv, "--out", str(data), "--overwrite"]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert snapshot(dataset) == before


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(dataset: Path, tmp_path: Path) -> None:
    source, images = dataset / "data" / "train.json", dataset / "data" / "img"
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(LlavaCError, match="is a file"):
        prepare_shards(source, images, tmp_path / "file", overwrite=True)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me too")
    with pytest.raises(LlavaCError, match="not written by `llava-c data prepare`"):
        prepare_shards(source, images, foreign, overwrite=True)
    assert (tmp_path / "file").read_text() == "keep me"
    assert snapshot(foreign) == {"notes.txt": b"keep me too"}


def test_skip_mode_refuses_to_write_an_empty_dataset(dataset: Path, tmp_path: Path) -> None:
    source = tmp_path / "bad.json"
    source.write_text(json.dumps([record("a", "absent.png"), record("b", "../train.json")]))
    out = tmp_path / "s"
    with pytest.raises(LlavaCError, match="every record was skipped"):
        prepare_shards(source, dataset / "data" / "img", out, mode="skip")
    assert not out.exists() and not list(tmp_path.glob(".s.*"))
    skipped = json.loads((tmp_path / "s.skipped.json").read_text())
    assert [s["kind"] for s in skipped] == ["missing_image", "outside_image_folder"]
