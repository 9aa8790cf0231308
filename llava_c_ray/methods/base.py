"""What a continual-learning method decides: how tasks become stages, the extra loss, the consolidation.

The pipeline asks a `Method` these questions and never branches on method names, so a new method is a
new module that calls `register(...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from llava_c_ray.errors import LlavaCError

if TYPE_CHECKING:
    from llava_c_ray.config import JobConfig

Consolidation = Literal["sac", "modelmix", "none"]


@dataclass(frozen=True)
class Stage:
    """One training stage: its 1-based index, a name for its directory, the tasks it trains on."""

    index: int
    name: str
    tasks: tuple[str, ...]

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"


@dataclass(frozen=True)
class Method:
    """A registered method; the defaults describe plain sequential LoRA fine-tuning."""

    name: str
    summary: str
    uir: bool = False
    consolidation: Consolidation = "none"
    joint: bool = False

    def stages(self, task_names: Sequence[str]) -> list[Stage]:
        """One stage per task in order, or a single stage on the union for a joint method."""
        if self.joint:
            return [Stage(1, "joint", tuple(task_names))]
        return [Stage(i, name, (name,)) for i, name in enumerate(task_names, start=1)]

    def uir_weight(self, job: JobConfig) -> float:
        """λ of L = L_llava + λ·L_uir (SPEC.md §2.1): the job's weight if the method uses UIR, else 0."""
        return job.uir.weight if self.uir else 0.0

    def consolidation_for(self, job: JobConfig) -> Consolidation:
        """The job's explicit `consolidation.method` if given, else the method's own."""
        return job.consolidation.method or self.consolidation


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method called `name`, or an error listing the known ones."""
    if name not in METHODS:
        raise LlavaCError(
            f"unknown method {name!r} (method.name)",
            fix=f"use one of: {', '.join(sorted(METHODS))}",
        )
    return METHODS[name]
