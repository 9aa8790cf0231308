"""What changed between two checkpoints, tensor by tensor, checked before any work starts.

The change of a tensor comes either from a tuned checkpoint (dense Δ = W_t − W̃_{t-1}) or from a
peft LoRA adapter (Δ = s·B·A, plus dense replacements for `modules_to_save`). Adapter module
paths are matched to checkpoint tensor names with the `model.` prefixes that transformers adds or
drops between its module tree and its saved keys ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_c_ray.errors import LlavaCError
from llava_c_ray.model.safetensors_io import LazyCheckpoint

ADAPTER_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Item:
    """One base tensor and where its change comes from."""

    name: str
    kind: (
        str  # "tuned" (dense from the tuned checkpoint), "lora", "replace" (adapter's full tensor)
    )
    lora_a: str | None = None
    lora_b: str | None = None
    scale: float = 1.0
    source_key: str | None = None


def canonical(name: str) -> tuple[str, ...]:
    """A tensor or module path without `model` components, for matching across naming schemes."""
    return tuple(part for part in name.split(".") if part != "model")


def plan_tuned(base: LazyCheckpoint, tuned: LazyCheckpoint) -> list[Item]:
    """Every base tensor, paired with the same name in `tuned`; names, shapes and dtypes must match."""
    missing, extra = (
        sorted(set(base.keys()) - set(tuned.keys())),
        sorted(set(tuned.keys()) - set(base.keys())),
    )
    if missing or extra:
        raise LlavaCError(
            f"tensor names differ: {len(missing)} only in base (e.g. {missing[:3]}), "
            f"{len(extra)} only in tuned (e.g. {extra[:3]})",
            path=tuned.root,
            fix="consolidate a tuned checkpoint of the same architecture as the base",
        )
    mismatched = [
        f"{name}: base {base.meta(name)} vs tuned {tuned.meta(name)}"
        for name in base.keys()
        if base.meta(name) != tuned.meta(name)
    ]
    if mismatched:
        raise LlavaCError(
            "shape or dtype differs for "
            + f"{len(mismatched)} tensor(s):\n  "
            + "\n  ".join(mismatched[:10]),
            path=tuned.root,
            fix="save both checkpoints with the same architecture and dtype",
        )
    check_finite(tuned, tuned.keys())
    return [Item(name, "tuned") for name in base.keys()]


def check_finite(checkpoint: LazyCheckpoint, names) -> None:
    """Every float tensor in `names` must be finite: a NaN or Inf (a diverged training) would
    otherwise surface inside a Ray task, after the output was started."""
    for name in names:
        tensor = checkpoint.get(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LlavaCError(
                f"tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf)",
                path=checkpoint.root / checkpoint.weight_map[name],
                fix="the training that wrote it diverged: use an earlier checkpoint, or retrain "
                "(e.g. with a lower training.lr)",
            )


def adapter_scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_adapter_config(config_file: Path) -> dict:
    """A peft `adapter_config.json` of a plain LoRA adapter (one r and lora_alpha)."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise LlavaCError(
            f"not valid JSON ({exc})",
            path=config_file,
            fix="re-save the adapter with peft (`save_pretrained`)",
        ) from None
    numbers = isinstance(config, dict) and all(
        isinstance(config.get(k), int | float)
        and not isinstance(config.get(k), bool)
        and config[k] > 0
        for k in ("r", "lora_alpha")
    )
    if not numbers:
        raise LlavaCError(
            "expected a JSON object with positive numbers `r` and `lora_alpha`",
            path=config_file,
            fix="re-save the adapter with peft (`save_pretrained`)",
        )
    if (
        config.get("peft_type") != "LORA"
        or config.get("rank_pattern")
        or config.get("alpha_pattern")
    ):
        raise LlavaCError(
            "only plain LoRA adapters (one r and lora_alpha) are supported",
            path=config_file,
            fix="consolidate the merged model with --tuned instead",
        )
    return config


def plan_adapter(base: LazyCheckpoint, adapter_dir: Path) -> tuple[list[Item], LazyCheckpoint]:
    """Items for the base tensors an adapter changes (LoRA pairs and full replacements)."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise LlavaCError(
            "no adapter_config.json", path=adapter_dir, fix="pass a peft LoRA adapter directory"
        )
    config = read_adapter_config(config_file)
    adapter = LazyCheckpoint(Path(adapter_dir), "adapter_model.safetensors")
    by_canonical = {canonical(name): name for name in base.keys()}
    items, scale = {}, adapter_scale(config)
    for key in adapter.keys():
        path = key.removeprefix(ADAPTER_PREFIX)
        for part in (".lora_A.weight", ".lora_B.weight"):
            if path.endswith(part):
                target = _base_name(
                    by_canonical, path.removesuffix(part) + ".weight", key, adapter_dir
                )
                items[target] = Item(
                    target,
                    "lora",
                    f"{key[: -len(part)]}.lora_A.weight",
                    f"{key[: -len(part)]}.lora_B.weight",
                    scale,
                )
                break
        else:
            target = _base_name(by_canonical, path, key, adapter_dir)
            items[target] = Item(target, "replace", source_key=key)
    check_adapter_shapes(base, adapter, items.values())
    check_finite(adapter, adapter.keys())
    return list(items.values()), adapter


def _base_name(by_canonical: dict, path: str, key: str, adapter_dir: Path) -> str:
    name = by_canonical.get(canonical(path))
    if name is None:
        raise LlavaCError(
            f"adapter tensor {key!r} has no matching base tensor",
            path=adapter_dir,
            fix="use the adapter trained from this base checkpoint",
        )
    return name


def check_adapter_shapes(base: LazyCheckpoint, adapter: LazyCheckpoint, items) -> None:
    for item in items:
        shape, _ = base.meta(item.name)
        if item.kind == "replace":
            got = adapter.meta(item.source_key)[0]
        else:
            b_shape, a_shape = adapter.meta(item.lora_b)[0], adapter.meta(item.lora_a)[0]
            got = (b_shape[0], *a_shape[1:])
        if tuple(got) != tuple(shape[: len(got)]) or len(got) != len(shape):
            raise LlavaCError(
                f"adapter change of {item.name} has shape {tuple(got)}, base has {tuple(shape)}",
                path=adapter.root,
                fix="use the adapter trained from this base checkpoint",
            )
