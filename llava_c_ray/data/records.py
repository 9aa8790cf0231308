"""LLaVA conversation records: reading JSON / JSONL files and loading validated `Record`s.

A record is `{"id", "image"? (relative to an image folder), "conversations": [{"from": "human" |
"gpt", "value"}, ...]}` with alternating turns starting with `human`, and `<image>` once in the first
human turn exactly when the record has an image. Text-only records have no image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llava_c_ray.errors import LlavaCError

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Turn:
    role: Literal["human", "gpt"]
    value: str


@dataclass(frozen=True)
class Record:
    id: str
    image: str | None
    conversations: tuple[Turn, ...]

    @property
    def question(self) -> str:
        """The first human turn without the `<image>` placeholder."""
        return self.conversations[0].value.replace(IMAGE_TOKEN, "").strip()

    @property
    def answer(self) -> str:
        """The first assistant turn ("" for unlabeled inquiries)."""
        return self.conversations[1].value if len(self.conversations) > 1 else ""

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> Record:
        turns = tuple(Turn(t["from"], t["value"]) for t in raw["conversations"])
        return cls(str(raw["id"]), raw.get("image"), turns)

    def to_raw(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"id": self.id}
        if self.image is not None:
            raw["image"] = self.image
        raw["conversations"] = [{"from": t.role, "value": t.value} for t in self.conversations]
        return raw


def read_records(path: Path) -> list[Any]:
    """The raw entries of a JSON list or JSONL file; an unreadable or empty file is a LlavaCError."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise LlavaCError("data file not found", path=path, fix="check the path") from None
    except IsADirectoryError:
        raise LlavaCError(
            "expected a JSON/JSONL file, got a directory",
            path=path,
            fix="pass the data file inside it (a prepared shard directory is read by a job only)",
        ) from None
    except UnicodeDecodeError as exc:
        raise LlavaCError(
            f"not UTF-8 (byte {exc.start})", path=path, fix="re-encode the file as UTF-8"
        ) from None
    entries = _read_jsonl(text, path) if path.suffix == ".jsonl" else _read_json(text, path)
    if not entries:
        raise LlavaCError(
            "no records", path=path, fix="point at a data file that holds at least one record"
        )
    return entries


def _read_json(text: str, path: Path) -> list[Any]:
    try:
        data = _parse(text, path)
    except json.JSONDecodeError as exc:
        if not text.lstrip().startswith("["):
            return _read_jsonl(text, path)  # several JSON objects, one per line
        raise LlavaCError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            path=path,
            fix="repair the JSON there (a list [...] of records, or one record per line)",
        ) from None
    if not isinstance(data, list):
        raise LlavaCError(
            f"expected a JSON list of records, got {type(data).__name__}",
            path=path,
            fix="write a list [...] of records, or one record per line (JSONL)",
        )
    return data


def _read_jsonl(text: str, path: Path) -> list[Any]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(_parse(line, path))
        except json.JSONDecodeError as exc:
            raise LlavaCError(
                f"invalid JSON on line {number}: {exc.msg}",
                path=path,
                fix="repair that line (JSONL holds one record object per line)",
            ) from None
    return entries


def _parse(text: str, path: Path) -> Any:
    """`json.loads`, with nesting too deep for the parser reported as a LlavaCError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise LlavaCError(
            "JSON nested too deeply to parse",
            path=path,
            fix="records are flat objects; repair the file",
        ) from None


def load_records(
    path: Path,
    image_folder: Path | None = None,
    *,
    mode: Literal["strict", "skip"] = "strict",
    skipped_out: Path | None = None,
    require_answers: bool = True,
    check_images: bool = True,
    max_pixels: int | None = None,
    skip_hint: str | None = None,
) -> list[Record]:
    """Read and validate a data file. `strict` raises one error listing every problem;
    `skip` drops bad records and writes their ids and reasons to `skipped_out` (if given).
    `max_pixels` overrides the image pixel limit (`validate.MAX_IMAGE_PIXELS`); `skip_hint` is
    the caller's way to choose `skip` (e.g. "pass --mode skip"), offered in the strict error."""
    from llava_c_ray.data.validate import MAX_IMAGE_PIXELS, validate_records

    report = validate_records(
        read_records(path),
        Path(path),
        image_folder,
        require_answers=require_answers,
        check_images=check_images,
        max_pixels=MAX_IMAGE_PIXELS if max_pixels is None else max_pixels,
    )
    if report.problems and mode == "strict":
        raise LlavaCError(report.summary(), path=path, fix=report.fix(skip_hint))
    if skipped_out is not None:
        report.write_skipped(skipped_out)
    return report.records
