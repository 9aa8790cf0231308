"""llava-c-ray: continual visual instruction tuning of LLaVA models on Ray (UIR + SAC)."""

from llava_c_ray.errors import LlavaCError

__all__ = ["LlavaCError"]
__version__ = "0.1.0"
