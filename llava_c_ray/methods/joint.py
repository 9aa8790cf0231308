"""`joint`: the multitask upper bound — one stage on the union of all tasks."""

from collections.abc import Sequence

from llava_c_ray.methods.base import Method, Stage, register


def union_stage(task_names: Sequence[str]) -> list[Stage]:
    return [Stage(1, "joint", tuple(task_names))]


METHOD = register(
    Method(
        name="joint",
        summary="one stage on the union of all tasks",
        adds="all tasks' data at once (the upper bound)",
        source="LLaVA-c paper §5",
        plan=union_stage,
    )
)
