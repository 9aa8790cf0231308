"""A progress bar on the driver for a stage running on Ray Train workers.

Rank 0 writes `progress.json` (step, max steps, last loss) in the stage's output directory after
every optimizer step; the driver polls it from a thread and draws a tqdm bar. The file lives where
the stage's outputs live, so it works wherever the driver can read them (one machine, NFS).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

from transformers import TrainerCallback

from llava_c_ray.files import write_json_atomic

PROGRESS_FILE = "progress.json"


class ProgressFile(TrainerCallback):
    """Writes the step count and the last logged loss after every optimizer step (rank 0)."""

    def __init__(self, path: Path):
        self.path = path
        self.loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        write_json_atomic(
            self.path, {"step": state.global_step, "max_steps": state.max_steps, "loss": self.loss}
        )


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def progress_bar(path: Path, description: str, enabled: bool = True) -> Iterator[None]:
    """Draw a bar from `path` while the body runs (tqdm hides it when stderr is not a terminal)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    stop = threading.Event()
    bar = tqdm(desc=description, unit="step", disable=None)

    def poll() -> None:
        while not stop.wait(1.0):
            progress = read_progress(path)
            if progress:
                bar.total = progress["max_steps"]
                bar.n = progress["step"]
                if progress["loss"] is not None:
                    bar.set_postfix(loss=f"{progress['loss']:.3f}", refresh=False)
                bar.refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
