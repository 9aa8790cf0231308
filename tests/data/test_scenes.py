"""The captioned scenes of the vision tower's pre-training: seeded, varied, never task-shaped."""

from __future__ import annotations

from llava_c_ray.data.synthetic import domains
from llava_c_ray.data.synthetic.draw import IMAGE_SIZE
from llava_c_ray.data.synthetic.scenes import draw_scenes

TASK_TEXT = (
    domains.WORD_SUFFIX,
    domains.LETTER_SUFFIX,
    domains.LETTER_AT_END_SUFFIX,
    "?",
    "A.",
    "B.",
    "option",
    "letter",
)


def test_same_seed_same_scenes_other_seed_differs() -> None:
    first, again, other = draw_scenes(10, 0), draw_scenes(10, 0), draw_scenes(10, 1)
    assert [s.caption for s in first] == [s.caption for s in again]
    assert [s.image.tobytes() for s in first] == [s.image.tobytes() for s in again]
    assert [s.caption for s in first] != [s.caption for s in other]


def test_scenes_cover_the_continual_tasks_visual_content_in_captions_only() -> None:
    scenes = draw_scenes(150, 0)
    captions = " ".join(s.caption for s in scenes)
    for seen in ("star", "diamond", "cross", "ring", "small", "large", "Bars", "Tallest",
                 "line", "goes up", "rises then falls", "three", "four", "sign", "paper"):  # fmt: skip
        assert seen in captions, seen
    for scene in scenes:
        assert scene.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert not any(text in scene.caption for text in TASK_TEXT), scene.caption
    assert len({s.caption for s in scenes}) > len(scenes) // 2
