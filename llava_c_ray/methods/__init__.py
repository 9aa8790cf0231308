"""The methods registry: one small module per method, each registering itself by name."""

from llava_c_ray.methods import finetune, joint, llava_c, modelmix, sac, uir  # noqa: F401
from llava_c_ray.methods.base import METHODS, Method, Stage, get_method, register

__all__ = ["METHODS", "Method", "Stage", "get_method", "register"]
