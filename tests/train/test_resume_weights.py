"""A restarted worker of a full fine-tune gets its trained weights back (transformers' own resume
matches none of the renamed checkpoint keys and loads nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_c_ray.errors import LlavaCError
from llava_c_ray.train.trainer import load_saved_weights


def test_full_model_weights_come_back_from_a_saved_checkpoint(
    tiny_checkpoint: Path, tmp_path
) -> None:
    from transformers import LlavaForConditionalGeneration

    trained = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.01 * torch.randn_like(param))
    trained.save_pretrained(tmp_path / "checkpoint-3")
    fresh = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    transformers_way = fresh.load_state_dict(saved, strict=False)
    assert transformers_way.unexpected_keys  # the renamed keys match nothing
    load_saved_weights(fresh, tmp_path / "checkpoint-3")
    for (name, param), (_, expected) in zip(
        fresh.named_parameters(), trained.named_parameters(), strict=True
    ):
        assert torch.equal(param, expected), name


def test_a_checkpoint_missing_parameters_is_refused(tiny_checkpoint: Path, tmp_path) -> None:
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model.save_pretrained(tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LlavaCError, match="lacks 1 parameters"):
        load_saved_weights(model, tmp_path / "ckpt")
