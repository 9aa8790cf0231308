"""The methods registry: one small module per method, each registering itself by name.

Imported in the order `llava-c methods` and `llava-c demo --compare` list them: the LLaVA-c family,
then the literature's baselines.
"""

# ruff: noqa: I001, F401
from llava_c_ray.methods import finetune, joint, modelmix, sac, uir, llava_c
from llava_c_ray.methods import replay, fkl, lwf, ewc, olora, llaca, moelora, hide, continual_llava
from llava_c_ray.methods.base import (
    METHODS,
    BoundMethod,
    Method,
    Params,
    Stage,
    StageContext,
    TrainedStage,
    TrainingParts,
    bind,
    get_method,
    register,
)

__all__ = [
    "METHODS",
    "BoundMethod",
    "Method",
    "Params",
    "Stage",
    "StageContext",
    "TrainedStage",
    "TrainingParts",
    "bind",
    "get_method",
    "register",
]
