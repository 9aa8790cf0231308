"""The driver's progress bar follows the file rank 0 writes after every optimizer step."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from llava_c_ray.train.progress import ProgressFile, progress_bar, read_progress


def test_progress_file_round_trip_and_bar(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "progress.json"
    assert read_progress(path) is None
    callback = ProgressFile(path)
    callback.on_log(None, None, None, logs={"loss": 2.5})
    seen = []
    monkeypatch.setattr("tqdm.auto.tqdm.refresh", lambda bar, *a, **k: seen.append(bar.n))
    with progress_bar(path, "stage t"):
        for step in (1, 2, 3):
            callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=3), None)
            time.sleep(1.2)
    assert read_progress(path) == {"step": 3, "max_steps": 3, "loss": 2.5}
    assert seen and seen[-1] == 3 and seen == sorted(seen)


def test_disabled_bar_reads_nothing(tmp_path: Path) -> None:
    with progress_bar(tmp_path / "missing.json", "stage t", enabled=False):
        pass
