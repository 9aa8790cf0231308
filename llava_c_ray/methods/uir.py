"""`uir`: sequential LoRA with the Unsupervised Inquiry Regularization loss (SPEC.md §2.1)."""

from llava_c_ray.methods.base import Method, register

METHOD = register(Method(name="uir", summary="sequential LoRA + UIR loss", uir=True))
