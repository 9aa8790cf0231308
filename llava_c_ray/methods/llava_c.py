"""`llava_c`: the full LLaVA-c method = UIR during training + SAC after every stage."""

from llava_c_ray.methods.base import Method, register

METHOD = register(
    Method(
        name="llava_c",
        summary="UIR loss + Spectral-Aware Consolidation",
        uir=True,
        consolidation="sac",
    )
)
