"""Module surgery shared by the methods that wrap linear layers with modules of their own
(moelora, hide, continual_llava): put a wrapper in place of each named linear, and take the
wrappers out again for a standard Hugging Face save."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from torch import nn

from llava_c_ray.errors import LlavaCError

Wrapper = TypeVar("Wrapper", bound=nn.Module)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def wrap_linears(
    model: nn.Module, names: list[str], wrap: Callable[[nn.Linear], Wrapper], method: str
) -> dict[str, Wrapper]:
    """Replace each named nn.Linear of `model` by `wrap(linear)`; the wrappers by name."""
    wrapped = {}
    for name in names:
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise LlavaCError(
                f"{method} wraps {name!r}, which is not a linear layer of this model",
                fix="load the method's tensors onto the base model they were trained with",
            )
        wrapped[name] = wrap(base)
        set_submodule(model, name, wrapped[name])
    return wrapped


@contextlib.contextmanager
def unwrapped(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """`model` with each wrapper of `layers` swapped back for its `.base` linear, restored after."""
    for name, layer in layers.items():
        set_submodule(model, name, layer.base)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            set_submodule(model, name, layer)
