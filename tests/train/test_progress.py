"""The driver's progress bar and the stage's console line follow the file rank 0 writes after
every optimizer step."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from llava_c_ray.train.progress import ProgressFile, progress_bar, read_progress, summary

LOGS = {
    "loss": 2.5,
    "llava_loss": 2.25,
    "uir_loss": 0.25,
    "learning_rate": 1e-4,
    "tokens_per_s": 850.4,
}


def test_progress_file_round_trip_and_bar(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "progress.json"
    assert read_progress(path) is None
    callback = ProgressFile(path)
    callback.on_log(None, None, None, logs=LOGS)
    seen = []
    monkeypatch.setattr("tqdm.auto.tqdm.refresh", lambda bar, *a, **k: seen.append(bar.n))
    with progress_bar(path, "stage t"):
        for step in (1, 2, 3):
            callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=3), None)
            time.sleep(1.2)
    shown = {k: v for k, v in LOGS.items() if k != "learning_rate"}
    assert read_progress(path) == {"step": 3, "max_steps": 3, "logs": shown}
    assert seen and seen[-1] == 3 and seen == sorted(seen)
    assert summary(path) == ("3/3 steps · loss=2.500 llava_loss=2.250 uir_loss=0.250 tok/s=850")


def test_no_progress_file_no_summary(tmp_path: Path) -> None:
    assert summary(tmp_path / "missing.json") == ""


def test_disabled_bar_draws_nothing(tmp_path: Path, monkeypatch) -> None:
    def no_bar(*args, **kwargs):
        raise AssertionError("a disabled progress bar was drawn")

    monkeypatch.setattr("tqdm.auto.tqdm", no_bar)
    ran = []
    with progress_bar(tmp_path / "missing.json", "stage t", enabled=False):
        ran.append(True)
    assert ran == [True]
    with pytest.raises(AssertionError, match="drawn"), progress_bar(tmp_path / "p.json", "t"):
        pass
