"""Streaming safetensors I/O: read one tensor at a time from a (sharded) checkpoint, write shards.

`LazyCheckpoint` keeps one shard open and hands out single tensors by name, from
`model.safetensors.index.json` or a lone `model.safetensors`. `ShardWriter` streams tensors into
numbered shards and writes the index, so a checkpoint is never held in memory whole.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llava_c_ray.errors import LlavaCError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class LazyCheckpoint:
    """Tensor names, shapes and dtypes of a checkpoint, and its tensors one at a time."""

    def __init__(self, root: Path, weights: str = SINGLE_NAME):
        self.root = Path(root)
        self.weight_map = self._weight_map(weights)
        self._open_name: str | None = None
        self._open = None

    def _weight_map(self, weights: str) -> dict[str, str]:
        index = self.root / weights.replace(".safetensors", ".safetensors.index.json")
        if weights == SINGLE_NAME and (self.root / INDEX_NAME).is_file():
            index = self.root / INDEX_NAME
        if index.is_file():
            return self._read_index(index)
        if not (self.root / weights).is_file():
            raise LlavaCError(
                f"no {weights} or its index in the checkpoint",
                path=self.root,
                fix="point at a Hugging Face checkpoint directory with safetensors weights",
            )
        with self._safe_open(weights) as handle:
            return dict.fromkeys(handle.keys(), weights)

    def _read_index(self, index: Path) -> dict[str, str]:
        """The index's `weight_map`, every shard a file inside the checkpoint directory."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, RecursionError, TypeError, KeyError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise LlavaCError(
                "corrupt index: expected a JSON object with a `weight_map` of tensor name -> file",
                path=index,
                fix="re-save or re-download the checkpoint",
            )
        for name, filename in weight_map.items():
            # By name, not by resolving: Hugging Face cache snapshots are symlinks into ../blobs.
            if os.path.isabs(filename) or os.path.normpath(filename).split(os.sep)[0] == "..":
                raise LlavaCError(
                    f"tensor {name!r} is mapped to {filename!r}, outside the checkpoint directory",
                    path=index,
                    fix="the weight_map may only name shard files inside the checkpoint directory",
                )
        return weight_map

    def _safe_open(self, filename: str):
        try:
            return safe_open(str(self.root / filename), framework="pt")
        except (SafetensorError, OSError, ValueError) as exc:
            raise LlavaCError(
                f"unreadable or truncated safetensors file ({exc})",
                path=self.root / filename,
                fix="re-save or re-download the checkpoint",
            ) from None

    def _handle(self, name: str):
        filename = self.weight_map[name]
        if filename != self._open_name:
            self._open = self._safe_open(filename)
            self._open_name = filename
        return self._open

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except SafetensorError as exc:
            raise LlavaCError(
                f"cannot read tensor {name!r} ({exc})", path=self.root / self.weight_map[name]
            ) from None

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, dtype string) without reading the tensor's data."""
        view = self._handle(name).get_slice(name)
        return tuple(view.get_shape()), view.get_dtype()

    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (`F32`, `BF16`, `F8_E4M3`, `BOOL`, ...)."""
    bits = re.search(r"\d+", dtype)
    return int(bits.group()) // 8 if bits else 1


@dataclass
class ShardWriter:
    """Writes tensors in arrival order into shards of at most `max_shard_bytes`, then the index.

    Shards written elsewhere into `root` (by parallel workers) join through `adopt`."""

    root: Path
    max_shard_bytes: int = 2 << 30
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    pending_bytes: int = 0
    shards: list[tuple[Path, list[str]]] = field(default_factory=list)
    total_bytes: int = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        part = self.root / f"part-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(part), metadata={"format": "pt"})
        self.shards.append((part, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def adopt(self, part: Path, names: list[str], size: int) -> None:
        """Count a shard file that was written into `root` by someone else as one of these."""
        self.shards.append((part, names))
        self.total_bytes += size

    def close(self) -> None:
        """Name the shards `model-0000i-of-0000n.safetensors` and write the index."""
        self.flush()
        count = len(self.shards)
        weight_map = {}
        for number, (part, names) in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            part.rename(self.root / final)
            weight_map |= dict.fromkeys(names, final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.root / INDEX_NAME).write_text(json.dumps(index, indent=2))
