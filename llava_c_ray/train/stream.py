"""A worker's share of the stage data: its Ray Data shard as encoded micro-batches, epoch after epoch.

The driver hands Ray Train one dataset of Parquet shards (`data.shards.ray_dataset`); Ray Train
splits it into one streaming shard per worker. `ShardStream` reads this worker's shard, reshuffles
it every epoch with a seed, and encodes and collates each micro-batch. The stream never ends: the
stage stops at its optimizer-step count. A resumed stage starts the stream at the micro-batch it
had reached, skipping the rows before it without decoding them.

With `group_by_length` (LLaVA's `group_by_modality_length`) each window of shuffled rows is sorted
by modality and text length, cut into micro-batches, and the micro-batches are shuffled: rows of
like length share a micro-batch, so little of it is padding (on the built-in general data padding
adds 9 % to the real tokens instead of 45 %; `bench/train_step.py`).

Encoded rows are kept in the worker's memory up to `encode_cache_mb` and reused in later epochs:
on the built-in benchmark, image decoding, the image processor and the tokenizer take a third as
long as the tiny model's forward and backward pass they feed (`bench/train_step.py`). Rows past
the budget are encoded again every epoch.

Encoding (image decode, image processor, tokenizer) runs in a background thread, `prefetch_batches`
micro-batches ahead, so it overlaps the forward and backward passes (which release the GIL) instead
of stalling the step; the batches come out in the same order as without it.
"""

from __future__ import annotations

import io
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from llava_c_ray.data.shards import row_record
from llava_c_ray.data.template import Template, encode_example
from llava_c_ray.errors import LlavaCError


@dataclass(frozen=True)
class RowEncoder:
    """Encodes one shard row; the task instruction is looked up by the shard's directory."""

    processor: Any
    template: Template
    max_length: int
    instructions: dict[str, str]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        image = None
        if row["image_bytes"] is not None:
            with Image.open(io.BytesIO(row["image_bytes"])) as img:
                image = img.convert("RGB")
        return encode_example(
            row_record(row),
            self.processor,
            image,
            self.template,
            instruction=self.instructions[str(Path(row["path"]).parent)],
            max_length=self.max_length,
        )


def row_length(row: dict[str, Any]) -> tuple[bool, int]:
    """Sort key of a shard row without decoding it: (has an image, characters of its turns)."""
    return row["image_bytes"] is not None, len(row["conversations"])


class EncodeCache:
    """Encoded rows by identity (shard file, id, image, turns), filled until `budget` bytes."""

    def __init__(self, budget: int):
        self.budget, self.used, self.rows = budget, 0, {}

    def get(self, row: dict[str, Any], encode: Callable[[dict[str, Any]], dict[str, Any]]):
        key = (row.get("path"), row["id"], row["image"], row["conversations"])
        if key in self.rows:
            return self.rows[key]
        example = encode(row)
        size = encoded_bytes(example)
        if self.used + size <= self.budget:
            self.rows[key] = example
            self.used += size
        return example


def encoded_bytes(example: Any) -> int:
    """Approximate memory of an encoded row: its tensors' bytes plus 8 bytes per list item."""
    if isinstance(example, dict):
        return sum(encoded_bytes(value) for value in example.values())
    if isinstance(example, torch.Tensor):
        return example.nbytes
    if isinstance(example, list):
        return 8 * len(example)
    return 64


class ShardStream(IterableDataset):
    """Collated micro-batches of one worker's Ray Data shard, from micro-batch `start` on."""

    def __init__(
        self,
        shard: Any,
        *,
        batch_size: int,
        encode: Callable[[dict[str, Any]], dict[str, Any]],
        collate: Callable[[list[dict[str, Any]]], Any],
        seed: int,
        start: int = 0,
        shuffle_buffer: int = 256,
        prefetch_batches: int = 2,
        group_by_length: bool = False,
        encode_cache_mb: float = 0,
    ):
        self.shard, self.batch_size, self.encode, self.collate = shard, batch_size, encode, collate
        self.seed, self.start = seed, start
        self.shuffle_buffer, self.prefetch_batches = shuffle_buffer, prefetch_batches
        self.group_by_length = group_by_length
        self.cache = EncodeCache(int(encode_cache_mb * 2**20))

    def epoch(self, number: int) -> Iterator[list[dict[str, Any]]]:
        """The raw rows of one pass over the shard, in micro-batches, shuffled with seed + epoch.

        A grouping window holds whole micro-batches, so an epoch has as many as without grouping."""
        window = self.batch_size * max(1, self.shuffle_buffer // self.batch_size)
        order = random.Random(f"{self.seed}-{number}")
        for batch in self.shard.iter_batches(
            batch_size=window if self.group_by_length else self.batch_size,
            batch_format="pyarrow",
            prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=max(self.shuffle_buffer, self.batch_size),
            local_shuffle_seed=self.seed + number,
        ):
            rows = batch.to_pylist()
            if not self.group_by_length:
                yield rows
                continue
            rows.sort(key=row_length)
            micro = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            order.shuffle(micro)
            yield from micro

    def __iter__(self) -> Iterator[Any]:
        batches = itertools.chain.from_iterable(self.non_empty_epoch(n) for n in itertools.count())
        pending: deque = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder:
            for rows in itertools.islice(batches, self.start, None):
                pending.append(encoder.submit(self.encode_batch, rows))
                if len(pending) > self.prefetch_batches:
                    yield pending.popleft().result()

    def encode_batch(self, rows: list[dict[str, Any]]) -> Any:
        return self.collate([self.cache.get(row, self.encode) for row in rows])

    def non_empty_epoch(self, number: int) -> Iterator[list[dict[str, Any]]]:
        empty = True
        for rows in self.epoch(number):
            empty = False
            yield rows
        if empty:
            raise LlavaCError(
                "this training worker's data shard is empty",
                fix="use fewer cluster.num_workers or more training records",
            )
