"""Record validation: one fixture per error class, the 5-planted-errors acceptance check, the CLI."""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_c_ray.cli import main
from llava_c_ray.data.records import load_records, read_records
from llava_c_ray.data.validate import MAX_IMAGE_PIXELS, validate_records
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


def png_header(width: int, height: int) -> bytes:
    """A few dozen bytes that PIL opens as a PNG of the claimed size (no pixel data)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    (images / "broken.png").write_bytes(b"not a png")
    (images / "bomb.png").write_bytes(png_header(30000, 30000))
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "outside.png")
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
    "outside_image_folder": {**good("x"), "image": "../outside.png"},
    "oversized_image": {**good("x"), "image": "bomb.png"},
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_error_class_is_reported(kind: str, folder: Path, tmp_path: Path) -> None:
    report = validate_records([good("ok"), CASES[kind]], write(tmp_path, []), folder)
    assert [p.kind for p in report.problems] == [kind]
    assert report.problems[0].index == 1 and [r.id for r in report.records] == ["ok"]


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_images_outside_the_folder_are_refused_unread(
    how: str, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside.png"
    image = {"parent": "../outside.png", "absolute": str(outside), "symlink": "link.png"}[how]
    (folder / "link.png").symlink_to(outside)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("an outside image was read"))
    report = validate_records([{**good("x"), "image": image}], tmp_path / "d.json", folder)
    assert [p.kind for p in report.problems] == ["outside_image_folder"]
    assert repr(image) in report.problems[0].message


def test_symlink_inside_the_folder_is_accepted(folder: Path, tmp_path: Path) -> None:
    (folder / "sub").mkdir()
    (folder / "sub" / "alias.png").symlink_to(folder / "a.png")
    report = validate_records(
        [{**good("x"), "image": "sub/alias.png"}], tmp_path / "d.json", folder
    )
    assert not report.problems


@pytest.mark.parametrize(
    ("size", "max_pixels"),
    [((12000, 12000), MAX_IMAGE_PIXELS), ((30000, 30000), 10**12), ((9, 8), 71)],
    ids=["144MP", "over-pil-limit", "configured-limit"],
)
def test_pixel_limit_reads_only_the_header(
    size: tuple[int, int], max_pixels: int, folder: Path, tmp_path: Path
) -> None:
    (folder / "big.png").write_bytes(png_header(*size))
    report = validate_records(
        [{**good("x"), "image": "big.png"}], tmp_path / "d.json", folder, max_pixels=max_pixels
    )
    assert [p.kind for p in report.problems] == ["oversized_image"]
    data = write(tmp_path, [good("ok"), {**good("x"), "image": "big.png"}])
    with pytest.raises(LlavaCError, match="oversized_image"):
        load_records(data, folder, max_pixels=max_pixels)
    kept = load_records(data, folder, mode="skip", max_pixels=max_pixels)
    assert [r.id for r in kept] == ["ok"]


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


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_deeply_nested_json_is_a_named_error(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LlavaCError, match="nested too deeply") as err:
        read_records(path)
    assert name in str(err.value)


@pytest.mark.parametrize("text", ["[]", "", "\n\n"])
def test_empty_data_file_is_an_error(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.json"
    path.write_text(text)
    with pytest.raises(LlavaCError, match="no records"):
        load_records(path)
    assert main(["data", "validate", str(path)]) == 2
    assert "no records" in capsys.readouterr().err


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


def test_skipped_out_that_is_a_directory_is_a_named_error(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write(tmp_path, [good("ok"), CASES["turn_order"]])
    argv = ["data", "validate", str(data), "--image-folder", str(folder)]
    assert main([*argv, "--skipped-out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
