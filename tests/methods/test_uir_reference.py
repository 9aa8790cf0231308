"""UIR's reference pass: the stage-start model's final hidden states, from the adapted model itself."""

from __future__ import annotations

from pathlib import Path

import torch

from llava_c_ray.methods.uir import reference_hidden


def test_reference_is_the_start_model_not_the_adapted_one(tiny_checkpoint: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    start = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    adapted = get_peft_model(
        LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = start(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        moved = adapted(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    reference = reference_hidden(adapted, ids, mask)
    assert torch.allclose(reference, expected.hidden_states[-1], atol=1e-6)
    assert not torch.allclose(reference, moved.hidden_states[-1], atol=1e-3)
