"""`llava_c`: the full LLaVA-c method = UIR during training + SAC after every stage."""

from llava_c_ray.methods.base import Method, register
from llava_c_ray.methods.uir import uir_training

METHOD = register(
    Method(
        name="llava_c",
        summary="UIR loss + Spectral-Aware Consolidation",
        adds="λ·L_uir during training + SAC after every stage",
        source="LLaVA-c paper (Liu et al., 2025)",
        training=uir_training,
        consolidation="sac",
    )
)
