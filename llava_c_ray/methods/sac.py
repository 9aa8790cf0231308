"""`sac`: sequential LoRA, then Spectral-Aware Consolidation of every changed matrix (SPEC.md §2.2)."""

from llava_c_ray.methods.base import Method, register

METHOD = register(
    Method(
        name="sac",
        summary="sequential LoRA + Spectral-Aware Consolidation",
        adds="SAC after every stage",
        source="LLaVA-c paper §3.3, eq. 5-6",
        consolidation="sac",
    )
)
