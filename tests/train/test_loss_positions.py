"""L_llava from the labelled positions' logits only equals the model's loss over full logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_c_ray.data.template import IGNORE_INDEX
from llava_c_ray.train.trainer import loss_positions


def test_positions_are_those_before_each_label() -> None:
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, 9]])
    mask, targets = loss_positions(labels)
    assert mask.tolist() == [
        [False, True, True, False, False],
        [True, False, False, True, False],
    ]
    assert targets.tolist() == [7, 8, 5, 9]


def batch(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(tiny_checkpoint)
    generator = torch.Generator().manual_seed(0)
    image_tokens = config.image_seq_length
    ids = torch.randint(5, 200, (3, image_tokens + 12), generator=generator)
    ids[:2, 1 : 1 + image_tokens] = config.image_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -4:] = ids[0, -4:]
    labels[1, -7:-2] = ids[1, -7:-2]
    labels[2, 3:6] = ids[2, 3:6]
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    size = config.vision_config.image_size
    pixels = torch.randn((2, 3, size, size), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


@pytest.mark.parametrize("lora", [False, True])
def test_loss_and_gradients_match_full_logits(tiny_checkpoint: Path, lora: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    if lora:
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    trained = [p for p in model.parameters() if p.requires_grad]
    inputs = batch(tiny_checkpoint)
    full = model(**inputs).loss
    full_grads = torch.autograd.grad(full, trained, allow_unused=True)
    keep, targets = loss_positions(inputs["labels"])
    sparse = model(**inputs, logits_to_keep=keep, shift_labels=targets)
    assert sparse.logits.shape == (int(keep.sum()), model.config.text_config.vocab_size)
    sparse_grads = torch.autograd.grad(sparse.loss, trained, allow_unused=True)
    assert torch.allclose(sparse.loss, full, atol=1e-6)
    assert sum(g is not None for g in full_grads) > len(trained) // 2
    for a, b in zip(sparse_grads, full_grads, strict=True):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, atol=1e-6)
