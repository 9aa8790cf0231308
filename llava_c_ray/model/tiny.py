"""A tiny but real LLaVA checkpoint: CLIP vision tower + Llama language model + BPE tokenizer.

`build_tiny_llava` writes a standard Hugging Face directory (safetensors weights, config, tokenizer,
image processor, processor, chat template) that `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` load exactly as they load `llava-hf/llava-1.5-7b-hf`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from llava_c_ray.data.template import CHAT_TEMPLATE

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]


@dataclass(frozen=True)
class TinyDims:
    """Sizes of the tiny model; the defaults train on two CPU cores in minutes."""

    image_size: int = 96
    patch_size: int = 24  # one image token per cell of the built-in world's 4×4 grid
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    # CLIP's init scale for the vision tower. At the default (1.0: patch and position embeddings
    # of std 0.02) a tower trained from scratch gives every image nearly the same tokens and the
    # language model learns to ignore them: trained alone on grounding (4 quadrants) at lr 2e-3,
    # the tiny model stays at chance (25%) for 300 steps; at 10 it reaches 98% in them.
    vision_init_factor: float = 10.0
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 256
    vocab_size: int = 1024
    max_positions: int = 512

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, phrases: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`: every string round-trips exactly through encode/decode.

    Each of `phrases` (fixed text of the prompt template, such as its system line) is one added
    token: BPE never merges across words, and a constant 29-token system line would otherwise be
    over a third of every built-in training row."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(phrase, normalized=False) for phrase in phrases])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )


def tiny_config(dims: TinyDims, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=dims.vision_hidden * 2,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        image_size=dims.image_size,
        patch_size=dims.patch_size,
        projection_dim=dims.vision_hidden,
        initializer_factor=dims.vision_init_factor,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.text_hidden,
        intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_heads,
        max_position_embeddings=dims.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=dims.image_tokens,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, dims: TinyDims) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": dims.image_size},
        crop_size={"height": dims.image_size, "width": dims.image_size},
    )
    # Tokenizer too: tools that prompt through `tokenizer.apply_chat_template` get the same text.
    tokenizer.chat_template = CHAT_TEMPLATE
    # CLIP adds a CLS token; the "default" strategy drops it again: image_size²/patch² tokens.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=dims.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava(
    out: Path,
    texts: Iterable[str],
    *,
    seed: int = 0,
    dims: TinyDims | None = None,
    phrases: Sequence[str] = (),
) -> Path:
    """Train a tokenizer on `texts` (each of `phrases` one token), build a randomly initialised
    tiny LLaVA, save it to `out`."""
    dims = dims or TinyDims()
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, dims.vocab_size, phrases)
    model = LlavaForConditionalGeneration(tiny_config(dims, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(tokenizer, dims).save_pretrained(out)
    (out / "tiny_dims.json").write_text(json.dumps(asdict(dims), indent=2))
    return out


def random_lora_adapter(
    base: Path, out: Path, *, rank: int = 4, scale: float = 0.05, seed: int = 0
) -> tuple[Path, Path]:
    """A peft LoRA adapter of `base` with random non-zero B (and a perturbed projector), saved
    to `out/adapter`, and its merged model saved to `out/tuned`: a stand-in for a trained stage in
    tests and benchmarks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor

    from llava_c_ray.model.keys import language_model_linears

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(base)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=language_model_linears(model),
        modules_to_save=["multi_modal_projector"],
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(scale * torch.randn_like(param))
    peft_model.save_pretrained(out / "adapter")
    peft_model.merge_and_unload().save_pretrained(out / "tuned")
    AutoProcessor.from_pretrained(base).save_pretrained(out / "tuned")
    return out / "adapter", out / "tuned"
