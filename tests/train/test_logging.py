"""Stage logging: every `log_every` optimizer steps, plus the first and the last step."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerControl, TrainerState
from transformers.trainer_callback import DefaultFlowCallback

from llava_c_ray.config import TrainingConfig
from llava_c_ray.train.spec import StageSpec
from llava_c_ray.train.trainer import LogFinalStep
from llava_c_ray.train.worker import training_arguments


def logged_steps(tmp_path: Path, log_every: int, steps: int) -> list[int]:
    spec = StageSpec(
        name="t",
        init=Path("."),
        out=tmp_path,
        train_files=(),
        training=TrainingConfig(log_every=log_every, precision="fp32"),
        # On CPU the arguments would set up a gloo process group; the logging flow is the same.
        use_gpu=True,
    )
    args = training_arguments(spec, tmp_path / "trainer", rank=0, steps=steps)
    state = TrainerState(max_steps=steps, logging_steps=args.logging_steps)
    logged = []
    for step in range(1, steps + 1):
        state.global_step, control = step, TrainerControl()
        for callback in (DefaultFlowCallback(), LogFinalStep()):
            callback.on_step_end(args, state, control)
        if control.should_log:
            logged.append(step)
    return logged


def test_logs_every_n_steps_the_first_and_the_last(tmp_path: Path) -> None:
    assert logged_steps(tmp_path, log_every=10, steps=25) == [1, 10, 20, 25]
    assert logged_steps(tmp_path, log_every=10, steps=20) == [1, 10, 20]
    assert logged_steps(tmp_path, log_every=1, steps=3) == [1, 2, 3]
