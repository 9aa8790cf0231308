"""Map safetensors checkpoint keys to the parameter names of a loaded model.

transformers 5 renames keys on load (a LLaVA checkpoint stores `language_model.model.layers…`,
the model holds `model.language_model.layers…`) and reverts the renaming on save. Code that reads
checkpoint tensors by key and then touches the loaded model's parameters (the α-search actors)
needs the same renaming; this applies transformers' own conversion mapping of the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llava_c_ray.errors import LlavaCError


def language_model_linears(model: torch.nn.Module) -> list[str]:
    """Names of the language model's linear layers (LoRA targets for `all-linear`)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and ".language_model." in f".{name}."
        and "lm_head" not in name
    ]


def parameter_names(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """{checkpoint key: parameter name} for `keys`, through the model's weight renamings."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    params = dict(model.named_parameters())
    names, unknown = {}, []
    for key in keys:
        name = key if key in params else rename_source_key(key, renamings, converters)[0]
        if name in params:
            names[key] = name
        else:
            unknown.append(key)
    if unknown:
        raise LlavaCError(
            f"{len(unknown)} checkpoint tensors have no parameter in the loaded model, "
            f"e.g. {unknown[:3]}",
            fix="use factors computed against this base checkpoint (same architecture)",
        )
    return names
