"""Parquet round trip: records and image bytes identical after prepare → read."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_c_ray.cli import main
from llava_c_ray.data.records import load_records
from llava_c_ray.data.shards import read_shards
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
        from llava_c_ray.data.shards import prepare_shards

        prepare_shards(source, images, out)


def test_text_only_records(tiny_benchmark: Path, tmp_path: Path) -> None:
    from llava_c_ray.data.shards import prepare_shards

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
    import json

    from llava_c_ray.data.shards import prepare_shards

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
    from llava_c_ray.data.shards import prepare_shards, ray_dataset

    source = tiny_benchmark / "icon_count" / "val.json"
    out = prepare_shards(source, tiny_benchmark / "images", tmp_path / "s", records_per_shard=2)
    rows = ray_dataset([out]).take_all()
    assert sorted(r["id"] for r in rows) == sorted(r.id for r, _ in read_shards(out))
    assert all(r["image_bytes"] for r in rows)
