"""Records: raw ↔ Record round trip, JSON list vs JSONL, strict vs skip loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llava_c_ray.data.records import Record, load_records, read_records
from llava_c_ray.errors import LlavaCError


def raw(record_id: str, image: str | None) -> dict:
    human = "<image>\nWhat colour?" if image else "What colour?"
    entry = {
        "id": record_id,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "red"}],
    }
    if image:
        entry["image"] = image
    return entry


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    return images


def test_record_round_trip() -> None:
    for entry in (raw("1", "a.png"), raw("2", None)):
        record = Record.from_raw(entry)
        assert record.to_raw() == entry
        assert record.question == "What colour?"
        assert record.answer == "red"


def test_json_list_and_jsonl_read_the_same(tmp_path: Path) -> None:
    entries = [raw("1", "a.png"), raw("2", None)]
    listed = tmp_path / "data.json"
    listed.write_text(json.dumps(entries))
    lines = tmp_path / "data.jsonl"
    lines.write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    assert read_records(listed) == read_records(lines) == entries


def test_strict_raises_every_problem_skip_keeps_the_good(folder: Path, tmp_path: Path) -> None:
    entries = [raw("ok", "a.png"), raw("gone", "missing.png"), raw("ok-text", None)]
    entries.append({"id": "empty", "conversations": []})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(LlavaCError) as error:
        load_records(path, folder)
    assert "'gone'" in str(error.value) and "'empty'" in str(error.value)
    skipped = tmp_path / "skipped.json"
    records = load_records(path, folder, mode="skip", skipped_out=skipped)
    assert [r.id for r in records] == ["ok", "ok-text"]
    assert {s["id"] for s in json.loads(skipped.read_text())} == {"gone", "empty"}


def test_wrong_top_level_shape_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"id": "1"}))
    with pytest.raises(LlavaCError, match="data.json"):
        read_records(path)
