"""Record validation: one fixture per error class, the 5-planted-errors acceptance check, the CLI."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_c_ray.cli import main
from llava_c_ray.data.records import load_records, read_records
from llava_c_ray.data.validate import validate_records
from llava_c_ray.errors import LlavaCError


def good(record_id: str, image: str | None = "a.png") -> dict:
    human = "<image>\nWhat is it?" if image else "What is it?"
    record = {
        "id": record_id,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "red"}],
    }
    if image:
        record["image"] = image
    return record


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    (images / "broken.png").write_bytes(b"not a png")
    return images


def write(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


CASES = {
    "missing_image": {**good("x"), "image": "absent.png"},
    "unreadable_image": {**good("x"), "image": "broken.png"},
    "turn_order": {
        "id": "x",
        "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
    },
    "empty_turn": {
        "id": "x",
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}],
    },
    "image_token": {
        **good("x", image=None),
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
    },
    "shape": {"id": "x", "conversations": "not a list"},
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_error_class_is_reported(kind: str, folder: Path, tmp_path: Path) -> None:
    report = validate_records([good("ok"), CASES[kind]], write(tmp_path, []), folder)
    assert [p.kind for p in report.problems] == [kind]
    assert report.problems[0].index == 1 and [r.id for r in report.records] == ["ok"]


def test_duplicate_ids(folder: Path, tmp_path: Path) -> None:
    report = validate_records([good("a"), good("a")], tmp_path / "d.json", folder)
    assert [p.kind for p in report.problems] == ["duplicate_id"]


def test_image_count_without_image_token(folder: Path, tmp_path: Path) -> None:
    record = {
        **good("x"),
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    }
    assert [p.kind for p in validate_records([record], tmp_path / "d.json", folder).problems] == [
        "image_token"
    ]


def test_five_planted_errors_cli(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = {
        "bad-image": {**good("bad-image"), "image": "absent.png"},
        "bad-order": {**CASES["turn_order"], "id": "bad-order"},
        "bad-empty": {**CASES["empty_turn"], "id": "bad-empty"},
        "bad-token": {**CASES["image_token"], "id": "bad-token"},
        "bad-shape": {"id": "bad-shape", "conversations": []},
    }
    records = [good(f"ok-{i}") for i in range(5)]
    for i, record in enumerate(planted.values()):
        records.insert(2 * i + 1, record)
    data = write(tmp_path, records)
    skipped = tmp_path / "skipped.json"
    assert (
        main(
            [
                "data",
                "validate",
                str(data),
                "--image-folder",
                str(folder),
                "--skipped-out",
                str(skipped),
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert all(f"'{record_id}'" in out for record_id in planted)
    assert sorted(s["id"] for s in json.loads(skipped.read_text())) == sorted(planted)
    kept = load_records(data, folder, mode="skip", skipped_out=tmp_path / "s2.json")
    assert len(kept) == 5
    with pytest.raises(LlavaCError) as err:
        load_records(data, folder)
    assert all(record_id in str(err.value) for record_id in planted)


def test_jsonl_and_bad_files(tmp_path: Path) -> None:
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps(good("a", None)) + "\n\n" + json.dumps(good("b", None)) + "\n")
    assert [r.id for r in load_records(lines)] == ["a", "b"]
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"id": "é"}]'.encode("latin-1"))
    with pytest.raises(LlavaCError, match="UTF-8"):
        read_records(latin)
    obj = tmp_path / "obj.json"
    obj.write_text('{"id": 1}')
    with pytest.raises(LlavaCError, match="list"):
        read_records(obj)
    with pytest.raises(LlavaCError, match="not found"):
        read_records(tmp_path / "absent.json")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["id", "image", "conversations", "from", "value", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(json_values)
def test_fuzz_reader_parses_or_raises_project_error(tmp_path: Path, value) -> None:
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(value))
    with contextlib.suppress(LlavaCError):
        load_records(path, tmp_path, mode="skip")
