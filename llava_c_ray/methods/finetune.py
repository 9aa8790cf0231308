"""`finetune`: sequential LoRA fine-tuning, merged after every stage, no consolidation, no UIR."""

from llava_c_ray.methods.base import Method, register

METHOD = register(
    Method(
        name="finetune",
        summary="sequential LoRA, merge, no consolidation",
        adds="— (the lower bound)",
        source="LLaVA-c paper §5 baseline",
    )
)
