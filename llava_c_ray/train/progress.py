"""A progress bar on the driver for a stage running on Ray Train workers.

Rank 0 writes `progress.json` (step, max steps, the last logged loss terms and tokens/s) in the
stage's output directory after every optimizer step; the driver polls it from a thread and draws a
tqdm bar (step, ETA, loss terms, tokens/s), and `summary` makes the stage's console line of it.
The file lives where the stage's outputs live, so it works wherever the driver can read them (one
machine, NFS).
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


SHOWN = ("loss", "tokens_per_s")
"""Logged values the console shows, besides every named loss term (`*_loss`)."""


class ProgressFile(TrainerCallback):
    """Writes the step count and the last logged values after every optimizer step (rank 0)."""

    def __init__(self, path: Path):
        self.path = path
        self.logs: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs = {k: float(v) for k, v in logs.items() if k in SHOWN or k.endswith("_loss")}

    def on_step_end(self, args, state, control, **kwargs):
        write_json_atomic(
            self.path, {"step": state.global_step, "max_steps": state.max_steps, "logs": self.logs}
        )


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def shown_values(logs: dict[str, float]) -> dict[str, str]:
    """The logged values as the console shows them: loss terms to 3 decimals, whole tokens/s."""
    return {
        ("tok/s" if k == "tokens_per_s" else k): (f"{v:.0f}" if k == "tokens_per_s" else f"{v:.3f}")
        for k, v in logs.items()
    }


def summary(path: Path) -> str:
    """`60/60 steps · loss=0.512 llava_loss=0.488 uir_loss=0.024 tok/s=850` from the final
    progress file (empty if the stage wrote none)."""
    progress = read_progress(path)
    if not progress:
        return ""
    values = " ".join(f"{k}={v}" for k, v in shown_values(progress.get("logs", {})).items())
    return f"{progress['step']}/{progress['max_steps']} steps · {values}".rstrip(" ·")


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
                bar.set_postfix(shown_values(progress.get("logs", {})), refresh=False)
                bar.refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
