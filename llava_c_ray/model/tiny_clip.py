"""A tiny but real CLIP with both towers, for routing methods that need image and text embeddings
(`hide`'s task anchors) when the job names no CLIP checkpoint.

`build_tiny_clip` writes a standard Hugging Face directory (`CLIPModel` safetensors, config, the
tokenizer and image processor of a LLaVA checkpoint) that `CLIPModel.from_pretrained`,
`AutoTokenizer.from_pretrained` and `AutoImageProcessor.from_pretrained` load as they load
`openai/clip-vit-large-patch14-336`. Same seed, same LLaVA checkpoint → the same weights.

It borrows the LLaVA checkpoint's tokenizer and image processor (no CLIP tokenizer needs
training or downloading): its vocabulary is the LLaVA tokenizer's, its image size the LLaVA
processor's crop size, so the `pixel_values` LLaVA's processor makes are valid CLIP inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel

from llava_c_ray.files import atomic_directory

CLIP_TEXT_POSITIONS = 77
"""CLIP's text context (the authors' `max_length=77`)."""


def processor_image_size(image_processor) -> int:
    """The side of the square images a (CLIP-style) image processor produces."""
    crop = getattr(image_processor, "crop_size", None) or {}
    size = getattr(image_processor, "size", None) or {}
    return int(crop.get("height") or size.get("height") or size.get("shortest_edge"))


def tiny_clip_config(tokenizer, image_size: int, *, hidden: int = 64) -> CLIPConfig:
    """Two layers per tower, `hidden` wide, projected to `hidden`. The vision init scale is the
    tiny LLaVA's (at CLIP's default every image gets nearly the same embedding)."""
    patch = next(p for p in (16, 12, 8, 6, 4, 3, 2, 1) if image_size % p == 0)
    tower = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    return CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "max_position_embeddings": CLIP_TEXT_POSITIONS,
        },
        vision_config={
            **tower,
            "image_size": image_size,
            "patch_size": patch,
            "initializer_factor": 10.0,
        },
        projection_dim=hidden,
    )


def build_tiny_clip(llava_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """A randomly initialised tiny CLIPModel (seeded) with `llava_dir`'s tokenizer and image
    processor, saved to `out` (written aside and renamed into place)."""
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    image_processor = AutoImageProcessor.from_pretrained(llava_dir)
    config = tiny_clip_config(tokenizer, processor_image_size(image_processor))
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with atomic_directory(Path(out)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
    return Path(out)


def ensure_tiny_clip(llava_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """`out` if it holds a CLIP already, else a freshly built tiny one."""
    if (Path(out) / "config.json").is_file():
        return Path(out)
    return build_tiny_clip(llava_dir, out, seed=seed)
