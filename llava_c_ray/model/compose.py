"""`llava-c model compose`: a LLaVA HF checkpoint from its three parts, where LLaVA-1.5 stage 2 starts.

The continual-pretraining setting (SPEC.md §2.4) starts from Vicuna-7B + CLIP ViT-L/14-336 + the
stage-1 (alignment-pretrained) projector, which the LLaVA repo publishes as `mm_projector.bin` with
keys `model.mm_projector.{0,2}.{weight,bias}` (an `nn.Sequential` of Linear, GELU, Linear). This
module loads the language model and the vision tower with transformers (so their own key layouts and
renamings apply), puts the projector into `multi_modal_projector.linear_{1,2}`, and saves a
`LlavaForConditionalGeneration` checkpoint with tokenizer (plus `<image>`) and processor that
`from_pretrained` loads like `llava-hf/llava-1.5-7b-hf`. Peak memory is about one copy of the model.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any

from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import atomic_directory, refuse_overlap, refuse_replacing

IMAGE_TOKEN = "<image>"
# LLaVA-1.5: features of the second-to-last CLIP layer, CLS dropped ("default"), 2-layer GELU MLP.
VISION_FEATURE_LAYER = -2
PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}
VISION_MODEL_TYPES = ("clip", "clip_vision_model")
DTYPES = ("auto", "float16", "bfloat16", "float32")
COMPOSED_FROM = "composed_from.json"  # the parts of a composed checkpoint; marks it as ours


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `compose` subcommand to a CLI's subparsers (e.g. `llava-c model`); handler in `args.handler`."""
    parser = subparsers.add_parser(
        "compose",
        help="a LLaVA checkpoint from a Llama/Vicuna LM, a CLIP vision tower and a stage-1 projector",
    )
    parser.add_argument(
        "--language-model", required=True, type=Path, help="HF Llama/Vicuna checkpoint dir"
    )
    parser.add_argument(
        "--vision-tower", required=True, type=Path, help="HF CLIP (vision) checkpoint dir"
    )
    parser.add_argument(
        "--projector",
        required=True,
        type=Path,
        help="LLaVA stage-1 mm_projector.bin (or .safetensors)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output HF checkpoint directory")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weight dtype (auto: the language model's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(handler=run_compose)
    return parser


def run_compose(args: argparse.Namespace) -> int:
    """Handler of `llava-c model compose`; user errors surface as LlavaCError."""
    out = compose_llava(
        args.language_model,
        args.vision_tower,
        args.projector,
        args.out,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def compose_llava(
    language_model: str | Path,
    vision_tower: str | Path,
    projector: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Build and save a `LlavaForConditionalGeneration` checkpoint from its three parts.

    `language_model`: a HF causal-LM dir (Llama / Vicuna) with its tokenizer; `vision_tower`: a HF
    CLIP or CLIPVision dir with `preprocessor_config.json`; `projector`: LLaVA's stage-1
    `mm_projector.bin` (loaded with `weights_only=True`) or a `.safetensors` with the same keys.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    language_model, vision_tower, projector, out = (
        Path(p) for p in (language_model, vision_tower, projector, out)
    )
    _model_type(language_model, "language model", "a Llama/Vicuna checkpoint")
    vision_type = _model_type(vision_tower, "vision tower", "a CLIP checkpoint")
    if vision_type not in VISION_MODEL_TYPES:
        raise LlavaCError(
            f"the vision tower is a {vision_type!r} model; LLaVA-1.5 uses CLIP",
            path=vision_tower,
            fix="pass a CLIP checkpoint, e.g. openai/clip-vit-large-patch14-336",
        )
    refuse_overlap(
        out,
        [language_model, vision_tower, projector],
        fix="choose an --out outside --language-model / --vision-tower / --projector",
    )
    refuse_replacing(out, overwrite, is_composed, "`llava-c model compose` (no composed_from.json)")
    projector_weights = load_projector(projector)
    # Configs, shapes, tokenizer and processor first: a bad part fails before gigabytes are loaded.
    text_hidden = AutoConfig.from_pretrained(language_model).hidden_size
    vision_config = CLIPVisionConfig.from_pretrained(vision_tower)
    check_projector_shapes(projector_weights, vision_config.hidden_size, text_hidden, projector)
    tokenizer = _tokenizer_with_image_token(language_model)
    processor = _processor(tokenizer, vision_tower, vision_config)

    torch_dtype = _torch_dtype(dtype, language_model)
    lm = _load(AutoModelForCausalLM, language_model, torch_dtype, "language model")
    vision = _load(CLIPVisionModel, vision_tower, torch_dtype, "vision tower")
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        # New rows (the <image> placeholder) are never looked up: image features replace them.
        lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    config = _llava_config(lm.config, vision.config, tokenizer)

    model = _assemble(config, lm, vision, projector_weights, torch_dtype)
    with atomic_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size="2GB")
        processor.save_pretrained(tmp)
        (tmp / COMPOSED_FROM).write_text(
            json.dumps(
                {
                    "language_model": str(language_model.absolute()),
                    "vision_tower": str(vision_tower.absolute()),
                    "projector": str(projector.absolute()),
                },
                indent=2,
            )
        )
    return out


def load_projector(path: Path) -> dict[str, Any]:
    """{"linear_1.weight": …, …} from LLaVA's projector file; never unpickles arbitrary objects."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise LlavaCError(
            "projector file not found",
            path=path,
            fix="pass LLaVA's stage-1 mm_projector.bin (e.g. from "
            "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5)",
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LlavaCError(
            f"cannot read the projector as a tensor file ({type(exc).__name__}: {exc})".strip(),
            path=path,
            fix="pass a state dict of tensors saved with torch.save or safetensors "
            "(files that need arbitrary code to unpickle are refused)",
        ) from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise LlavaCError(
            "the projector file does not hold a state dict of tensors",
            path=path,
            fix="pass LLaVA's mm_projector.bin",
        )
    return projector_state_dict(raw, path)


def projector_state_dict(raw: dict[str, Any], path: str | Path = "<projector>") -> dict[str, Any]:
    """Rename `[…]mm_projector.{0,2}.{weight,bias}` (as LLaVA saves them) to `linear_{1,2}.*`."""
    found: dict[str, Any] = {}
    for key, tensor in raw.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "mm_projector" and parts[-2] in PROJECTOR_LAYERS:
            name = f"{PROJECTOR_LAYERS[parts[-2]]}.{parts[-1]}"
            if name in found:
                raise LlavaCError(f"two tensors map to projector {name}: check {key!r}", path=path)
            found[name] = tensor
    expected = [f"{layer}.{p}" for layer in PROJECTOR_LAYERS.values() for p in ("weight", "bias")]
    missing = [name for name in expected if name not in found]
    if missing:
        hint = (
            "a single Linear projector (LLaVA v1, `mm_projector.weight`)"
            if any(k.endswith("mm_projector.weight") for k in raw)
            else f"keys {sorted(raw)[:6]}"
        )
        raise LlavaCError(
            f"not a LLaVA-1.5 mlp2x_gelu projector: missing {missing}; found {hint}",
            path=path,
            fix="pass the stage-1 mm_projector.bin of a LLaVA-1.5 pretrain run "
            "(keys model.mm_projector.0.weight/bias and model.mm_projector.2.weight/bias)",
        )
    return found


def check_projector_shapes(
    weights: dict[str, Any], vision_hidden: int, text_hidden: int, path: str | Path
) -> None:
    """The projector maps vision_hidden → text_hidden → text_hidden."""
    expected = {
        "linear_1.weight": (text_hidden, vision_hidden),
        "linear_1.bias": (text_hidden,),
        "linear_2.weight": (text_hidden, text_hidden),
        "linear_2.bias": (text_hidden,),
    }
    wrong = [
        f"{name} is {tuple(weights[name].shape)}, expected {shape}"
        for name, shape in expected.items()
        if tuple(weights[name].shape) != shape
    ]
    if wrong:
        raise LlavaCError(
            "projector does not fit the parts (vision hidden size "
            f"{vision_hidden}, language-model hidden size {text_hidden}): " + "; ".join(wrong),
            path=path,
            fix="use the projector pretrained for this vision tower and language model",
        )


def _model_type(directory: Path, role: str, what: str) -> str:
    if not directory.is_dir():
        raise LlavaCError(f"{role} directory not found", path=directory, fix=f"pass {what} dir")
    config = directory / "config.json"
    if not config.is_file():
        raise LlavaCError(
            f"no config.json in the {role} directory",
            path=directory,
            fix=f"pass {what} directory in Hugging Face format",
        )
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LlavaCError(f"config.json is not valid JSON ({exc})", path=config) from None
    if not model_type:
        raise LlavaCError("config.json has no model_type", path=config, fix=f"pass {what}")
    return model_type


def _load(model_class: Any, directory: Path, dtype: Any, role: str) -> Any:
    try:
        return model_class.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise LlavaCError(
            f"cannot load the {role} ({exc})",
            path=directory,
            fix=f"the {role} directory must hold a complete Hugging Face checkpoint",
        ) from None


def is_composed(directory: Path) -> bool:
    """Whether `directory` is a checkpoint `compose_llava` wrote (it records its parts)."""
    return (directory / COMPOSED_FROM).is_file()


def _torch_dtype(dtype: str, language_model: Path) -> Any:
    import torch

    if dtype not in DTYPES:
        raise LlavaCError(f"unknown dtype {dtype!r}", fix=f"use one of: {', '.join(DTYPES)}")
    if dtype == "auto":
        config = json.loads((language_model / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, dtype)


def _tokenizer_with_image_token(language_model: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(language_model)
    except (OSError, ValueError) as exc:
        raise LlavaCError(
            f"cannot load the language model's tokenizer ({exc})",
            path=language_model,
            fix="the language-model directory must hold its tokenizer files",
        ) from None
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads with <unk> for Vicuna; a pad token adds an embedding row only when needed.
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def _processor(tokenizer: Any, vision_tower: Path, vision_config: Any) -> Any:
    from transformers import AutoImageProcessor, LlavaProcessor

    from llava_c_ray.data.template import CHAT_TEMPLATE  # imports torch: lazy like the rest here

    if not (vision_tower / "preprocessor_config.json").is_file():
        raise LlavaCError(
            "no preprocessor_config.json in the vision tower directory",
            path=vision_tower,
            fix="download it with the CLIP checkpoint (openai/clip-vit-large-patch14-336 has one)",
        )
    image_processor = AutoImageProcessor.from_pretrained(vision_tower)
    # Ours replaces any template the language model came with, on the tokenizer too.
    tokenizer.chat_template = CHAT_TEMPLATE
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def _llava_config(text_config: Any, vision_config: Any, tokenizer: Any) -> Any:
    from transformers import LlavaConfig

    text_config.pad_token_id = tokenizer.pad_token_id
    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def _assemble(config: Any, lm: Any, vision: Any, projector: dict[str, Any], dtype: Any) -> Any:
    """A LLaVA skeleton on the meta device whose parts are the loaded modules (no weight copies)."""
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.vision_tower = vision
    head = LlavaMultiModalProjector(config).to(dtype)
    head.load_state_dict({k: v.to(dtype) for k, v in projector.items()})
    model.model.multi_modal_projector = head
    model.to(dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"compose left tensors without weights: {left[:5]}")
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = config.pad_token_id
    return model
