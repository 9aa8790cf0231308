"""`collect_outputs` brings a final checkpoint home without ever leaving `out` without a model."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

from llava_c_ray.train.stage import collect_outputs


class FakeCheckpoint:
    """What Ray's `Checkpoint.to_directory` does: copy the checkpoint's tree to a local path."""

    def __init__(self, root: Path):
        self.root = root

    def to_directory(self, path: str) -> str:
        shutil.copytree(self.root, path, dirs_exist_ok=True)
        return path


def test_final_checkpoint_replaces_an_older_model(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    for name in ("model", "adapter"):
        (checkpoint / name).mkdir(parents=True)
        (checkpoint / name / "weights").write_text(f"new {name}")
    (checkpoint / "trainer_state.json").write_text("{}")
    out = tmp_path / "stage"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights").write_text("old model")
    (out / "model" / "stale").write_text("from an earlier attempt")

    result = SimpleNamespace(checkpoint=FakeCheckpoint(checkpoint), metrics={"step": 7})
    stage = collect_outputs(result, out)

    assert stage.model_dir == out / "model" and stage.adapter_dir == out / "adapter"
    assert stage.steps == 7
    assert sorted(p.name for p in (out / "model").iterdir()) == ["weights"]
    assert (out / "model" / "weights").read_text() == "new model"
    assert (out / "adapter" / "weights").read_text() == "new adapter"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "model"]
