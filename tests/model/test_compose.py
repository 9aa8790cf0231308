"""`llava-c model compose` on tiny parts built here: a Llama LM + tokenizer, a CLIP vision tower
(alone or inside a full CLIPModel, as openai/clip-vit-large-patch14-336 ships) and a stage-1
projector saved with torch.save under LLaVA's key names."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from llava_c_ray.data.template import CHAT_TEMPLATE, prompt_text
from llava_c_ray.errors import LlavaCError
from llava_c_ray.model import compose
from llava_c_ray.model.compose import IMAGE_TOKEN, compose_llava

TEXT_HIDDEN, VISION_HIDDEN, IMAGE_SIZE, PATCH = 32, 16, 32, 8
WORDS = ["what", "is", "this", "a", "cat", "dog", "red", "blue", "USER:", "ASSISTANT:", "?"]
VISION = dict(
    hidden_size=VISION_HIDDEN,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=PATCH,
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer without `<image>` and without a pad token, like Vicuna's."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("parts")
    tokenizer = tiny_tokenizer()
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    )
    lm.save_pretrained(root / "vicuna")
    tokenizer.chat_template = "{{ 'a template of its own' }}"  # compose replaces it
    tokenizer.save_pretrained(root / "vicuna")

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "clip_vision")
    image_processor.save_pretrained(root / "clip_vision")
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1
            ),
            vision_config=VISION,
            projection_dim=8,
        )
    )
    clip.save_pretrained(root / "clip_full")
    image_processor.save_pretrained(root / "clip_full")

    projector = {
        "model.mm_projector.0.weight": torch.randn(TEXT_HIDDEN, VISION_HIDDEN),
        "model.mm_projector.0.bias": torch.randn(TEXT_HIDDEN),
        "model.mm_projector.2.weight": torch.randn(TEXT_HIDDEN, TEXT_HIDDEN),
        "model.mm_projector.2.bias": torch.randn(TEXT_HIDDEN),
    }
    torch.save(projector, root / "mm_projector.bin")
    return {
        "lm": root / "vicuna",
        "vision": root / "clip_vision",
        "clip_full": root / "clip_full",
        "projector": root / "mm_projector.bin",
    }


@pytest.fixture(scope="module")
def composed(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("composed") / "llava"
    return compose_llava(parts["lm"], parts["vision"], parts["projector"], out)


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


def test_composed_checkpoint_loads_and_its_weights_are_the_parts(
    parts: dict[str, Path], composed: Path
) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(composed)
    lm = LlamaForCausalLM.from_pretrained(parts["lm"])
    vision = CLIPVisionModel.from_pretrained(parts["vision"])
    projector = torch.load(parts["projector"], weights_only=True)

    ours_lm = model.model.language_model.state_dict()
    theirs_lm = lm.model.state_dict()
    vocab = theirs_lm["embed_tokens.weight"].shape[0]
    # <image> was added: the embedding grew (to a multiple of 64); the old rows are unchanged.
    assert ours_lm["embed_tokens.weight"].shape[0] == 64
    ours_lm["embed_tokens.weight"] = ours_lm["embed_tokens.weight"][:vocab]
    assert_same(ours_lm, theirs_lm)
    torch.testing.assert_close(model.lm_head.weight[:vocab], lm.lm_head.weight, rtol=0, atol=0)
    assert_same(model.model.vision_tower.state_dict(), vision.state_dict())
    head = model.model.multi_modal_projector
    for ours, key in [
        (head.linear_1.weight, "0.weight"),
        (head.linear_1.bias, "0.bias"),
        (head.linear_2.weight, "2.weight"),
        (head.linear_2.bias, "2.bias"),
    ]:
        torch.testing.assert_close(ours, projector[f"model.mm_projector.{key}"], rtol=0, atol=0)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.image_seq_length == (IMAGE_SIZE // PATCH) ** 2


def test_processor_expands_image_token_and_model_runs(composed: Path) -> None:
    processor = AutoProcessor.from_pretrained(composed)
    model = LlavaForConditionalGeneration.from_pretrained(composed)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_id == image_id
    assert processor.tokenizer.pad_token == "<unk>"  # Vicuna's pad choice in LLaVA-1.5
    batch = processor(
        text=f"USER: {IMAGE_TOKEN}\nwhat is this ? ASSISTANT:",
        images=Image.new("RGB", (40, 30), "red"),
        return_tensors="pt",
    )
    assert int((batch["input_ids"] == image_id).sum()) == (IMAGE_SIZE // PATCH) ** 2
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_processor_and_tokenizer_prompt_with_our_template(composed: Path) -> None:
    processor = AutoProcessor.from_pretrained(composed)
    assert (composed / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}
    ]
    expected = prompt_text("what is this ?", image=True)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    text_only = [{"role": "user", "content": "what is this ?"}]
    assert processor.tokenizer.apply_chat_template(
        text_only, add_generation_prompt=True, tokenize=False
    ) == prompt_text("what is this ?")


def test_vision_tower_from_a_full_clip_checkpoint_and_safetensors_projector(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    projector = torch.load(parts["projector"], weights_only=True)
    save_file(projector, str(tmp_path / "mm_projector.safetensors"))
    out = compose_llava(
        parts["lm"], parts["clip_full"], tmp_path / "mm_projector.safetensors", tmp_path / "out"
    )
    model = LlavaForConditionalGeneration.from_pretrained(out)
    clip = CLIPModel.from_pretrained(parts["clip_full"])
    assert_same(model.model.vision_tower.state_dict(), clip.vision_model.state_dict())


def test_cli_handler_through_argparse(
    parts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    compose.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(
        [
            "compose",
            "--language-model",
            str(parts["lm"]),
            "--vision-tower",
            str(parts["vision"]),
            "--projector",
            str(parts["projector"]),
            "--out",
            str(out),
            "--dtype",
            "bfloat16",
        ]
    )
    assert args.handler(args) == 0
    assert str(out) in capsys.readouterr().out
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
    with pytest.raises(LlavaCError, match="not empty"):
        args.handler(args)
    args.overwrite = True
    assert args.handler(args) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def bad_projector(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)
    return path


def test_bad_inputs_raise_one_clear_error(parts: dict[str, Path], tmp_path: Path) -> None:
    good = torch.load(parts["projector"], weights_only=True)

    def run(lm: Path, vision: Path, proj: Path) -> Path:
        return compose_llava(lm, vision, proj, tmp_path / "out")

    with pytest.raises(LlavaCError, match="language model directory not found"):
        run(tmp_path / "nope", parts["vision"], parts["projector"])
    with pytest.raises(LlavaCError, match="vision tower directory not found"):
        run(parts["lm"], tmp_path / "nope", parts["projector"])
    with pytest.raises(LlavaCError, match="a 'llama' model; LLaVA-1.5 uses CLIP"):
        run(parts["lm"], parts["lm"], parts["projector"])
    with pytest.raises(LlavaCError, match="projector file not found"):
        run(parts["lm"], parts["vision"], tmp_path / "missing.bin")

    missing = {k: v for k, v in good.items() if ".2." not in k}
    with pytest.raises(LlavaCError, match=r"missing \['linear_2.weight', 'linear_2.bias'\]"):
        run(parts["lm"], parts["vision"], bad_projector(tmp_path, missing))
    linear_v1 = {"model.mm_projector.weight": torch.zeros(TEXT_HIDDEN, VISION_HIDDEN)}
    with pytest.raises(LlavaCError, match="single Linear projector"):
        run(parts["lm"], parts["vision"], bad_projector(tmp_path, linear_v1))
    wrong = {**good, "model.mm_projector.0.weight": torch.zeros(TEXT_HIDDEN, 24)}
    with pytest.raises(LlavaCError, match=r"linear_1.weight is \(32, 24\), expected \(32, 16\)"):
        run(parts["lm"], parts["vision"], bad_projector(tmp_path, wrong))
    bare = tmp_path / "clip_without_processor"
    shutil.copytree(parts["vision"], bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(LlavaCError, match="no preprocessor_config.json"):
        run(parts["lm"], bare, parts["projector"])
    assert not (tmp_path / "out").exists()


class NotATensor:
    """An arbitrary object: unpickling it would need to import and build this class."""


def test_projector_pickle_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": NotATensor()}, path)
    with pytest.raises(LlavaCError, match="refused"):
        compose.load_projector(path)
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(LlavaCError, match="cannot read the projector"):
        compose.load_projector(tmp_path / "garbage.bin")
