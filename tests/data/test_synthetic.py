"""The built-in benchmark: deterministic per seed, disjoint splits, answers the tokenizer round-trips."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llava_c_ray.data.records import load_records
from llava_c_ray.data.synthetic.benchmark import SIZES, generate_benchmark
from llava_c_ray.errors import LlavaCError


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_identical_other_seed_differs(tiny_benchmark: Path, tmp_path: Path) -> None:
    again = generate_benchmark(tmp_path / "again", seed=0, scale="test")
    assert tree_digest(again) == tree_digest(tiny_benchmark)
    other = generate_benchmark(tmp_path / "other", seed=1, scale="test")
    assert tree_digest(other) != tree_digest(tiny_benchmark)


def test_index_lists_valid_tasks(tiny_benchmark: Path) -> None:
    index = json.loads((tiny_benchmark / "benchmark.json").read_text())
    assert [t["name"] for t in index["general"]] == [
        "text_qa",
        "captions",
        "ocr",
        "scene_text",
        "spatial",
        "grounding",
    ]
    assert [t["name"] for t in index["continual"]] == [
        "icon_count",
        "attributes",
        "count_math",
        "bar_chart",
        "line_plot",
    ]
    sizes = SIZES["test"]
    for group in ("general", "continual"):
        for task in index[group]:
            counts = {
                split: len(
                    load_records(
                        tiny_benchmark / task[split], tiny_benchmark / task["image_folder"]
                    )
                )
                for split in ("train", "val", "test")
            }
            reading = group == "general" and task["name"] in ("ocr", "scene_text")
            assert counts == {
                "train": sizes[group] * (2 if reading else 1),
                "val": sizes["val"],
                "test": sizes["test"],
            }, task["name"]
            assert 0 <= task["chance"] <= 100
    inquiries = load_records(tiny_benchmark / index["inquiry"]["path"], require_answers=False)
    assert inquiries and all(len(r.conversations) == 1 and r.image is None for r in inquiries)


def test_splits_are_disjoint(tiny_benchmark: Path) -> None:
    index = json.loads((tiny_benchmark / "benchmark.json").read_text())
    for task in index["continual"] + index["general"]:
        if task["name"] == "text_qa":
            continue  # a small arithmetic table: questions repeat, ids do not
        seen: dict[str, set] = {}
        for split in ("train", "val", "test"):
            records = load_records(tiny_benchmark / task[split], tiny_benchmark / "images")
            seen[split] = {
                (r.question, (tiny_benchmark / "images" / r.image).read_bytes()) for r in records
            }
        assert not seen["test"] & seen["train"] and not seen["val"] & seen["train"], task["name"]


def test_tokenizer_round_trips_every_answer(tiny_benchmark: Path, tiny_checkpoint: Path) -> None:
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_checkpoint).tokenizer
    for path in tiny_benchmark.rglob("*.json"):
        if path.name == "benchmark.json":
            continue
        for record in json.loads(path.read_text()):
            for turn in record["conversations"][1:]:
                ids = tokenizer(turn["value"], add_special_tokens=False)["input_ids"]
                assert tokenizer.decode(ids) == turn["value"]


def test_refuses_non_empty_output(tiny_benchmark: Path) -> None:
    with pytest.raises(LlavaCError, match="exists"):
        generate_benchmark(tiny_benchmark, scale="test")


def test_continual_tasks_are_balanced_and_chance_is_one_over_answers(tiny_benchmark: Path) -> None:
    """Every continual split holds each answer equally often (±1); chance = 100 / #answers."""
    from collections import Counter

    from llava_c_ray.data.synthetic.benchmark import CONTINUAL

    index = json.loads((tiny_benchmark / "benchmark.json").read_text())
    for spec, task in zip(CONTINUAL, index["continual"], strict=True):
        assert task["chance"] == round(100 / len(spec.answers), 2)
        for split in ("train", "val", "test"):
            counts = Counter(
                r.answer
                for r in load_records(tiny_benchmark / task[split], tiny_benchmark / "images")
            )
            assert set(counts) <= set(spec.answers), (task["name"], split, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (task["name"], split)
            if sum(counts.values()) >= len(spec.answers):
                assert set(counts) == set(spec.answers), (task["name"], split, counts)


def test_balanced_answers_cover_every_answer_in_random_order() -> None:
    import random

    from llava_c_ray.data.synthetic.benchmark import balanced_answers

    drawn = balanced_answers(random.Random(0), 10, ("a", "b", "c"))
    assert sorted(drawn) == ["a"] * 4 + ["b"] * 3 + ["c"] * 3
    assert drawn != sorted(drawn)
