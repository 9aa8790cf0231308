"""`modelmix`: sequential LoRA, then W̃_t = W̃_{t-1} + α·Δ (the uniform case of SAC)."""

from llava_c_ray.methods.base import Method, register

METHOD = register(
    Method(
        name="modelmix",
        summary="sequential LoRA + ModelMix (α·Δ)",
        adds="consolidation W̃ = W + α·Δ",
        source="LLaVA-c paper §3.3",
        consolidation="modelmix",
    )
)
