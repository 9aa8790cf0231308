"""`joint`: the multitask upper bound — one stage on the union of all tasks."""

from llava_c_ray.methods.base import Method, register

METHOD = register(Method(name="joint", summary="one stage on the union of all tasks", joint=True))
