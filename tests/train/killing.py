"""A deterministic worker kill for Ray Train resume tests: a step hook that SIGKILLs one training
worker once, at a given optimizer step, after Ray Train has registered a checkpoint to resume
from (unlike a kill timed from a polling thread, the step and the checkpoint are known)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from llava_c_ray.train.hooks import StepHook


def registered_checkpoint(storage: Path) -> bool:
    """Whether the Ray Train run under `storage` (a `RunConfig.storage_path`) has registered a
    checkpoint: its controller writes the snapshot naming the latest one after registering it,
    so a restarted worker group resumes from it."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):  # being rewritten
            continue
    return False


KILL_BUDGET_S = 900.0
"""How long a worker waits for the checkpoint to be registered before it gives up killing itself
(the test then fails on the missing marker). Registration takes seconds on an idle machine; this
budget is for a CI box at a load of 30, where it took over two minutes."""


def kill_once(marker: Path, storage: Path, timeout: float = KILL_BUDGET_S) -> None:
    """SIGKILL this process, unless `marker` says a worker was killed already, as soon as the run
    under `storage` has a registered checkpoint (not at all if none comes within `timeout`)."""
    if marker.exists():
        return
    deadline = time.time() + timeout
    while not registered_checkpoint(storage):
        if time.time() > deadline:
            return
        time.sleep(0.1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(StepHook):
    """Worker `rank` kills itself once, right after optimizer step `step` (counted in the hook's
    checkpointed state, so a resumed worker counts on from its checkpoint). `storage` is the
    stage's Ray Train storage (`spec.out / "ray_train"` by default); `marker` records the kill."""

    name = "kill_at_step"

    def __init__(self, step: int, marker: Path, storage: Path, rank: int = 1):
        self.step, self.marker, self.storage, self.rank = step, marker, storage, rank
        self.steps = torch.zeros((), dtype=torch.long)

    def on_optimizer_step(self, model) -> dict[str, float]:
        import ray.train

        self.steps += 1
        if int(self.steps) == self.step and ray.train.get_context().get_world_rank() == self.rank:
            kill_once(self.marker, self.storage)
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"steps": self.steps}

    def load_state_dict(self, state, model) -> None:
        self.steps = state["steps"].clone()
