"""What each training-step saving is worth on the built-in benchmark, measured side by side.

    .venv/bin/python bench/train_step.py [--root runs/builtin] [--steps 20]

One process, one thread (a training worker's share of a 2-core machine), the tiny model and
micro-batches of 16 rows drawn from the six general training sets, as the base build trains:
1. forward + backward with the LM head over every position (the model's own loss) vs over the
   positions before answer tokens only (`loss_positions`, what `StageTrainer` does);
2. the time to encode a micro-batch (image decode, image processor, tokenizer) beside the step:
   what `training.encode_cache_mb` saves in every epoch after the first;
3. padding in shuffled micro-batches vs `training.group_by_length` windows (256 rows).
Prints each pair and its ratio. Builds the built-in default under `--root` if it is missing.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time
from pathlib import Path


def general_rows(benchmark: Path) -> list[dict]:
    """Shard-like rows (id, image bytes, conversations, instruction) of the general train sets."""
    index = json.loads((benchmark / "benchmark.json").read_text())
    rows = []
    for task in index["general"]:
        for raw in json.loads((benchmark / task["train"]).read_text()):
            image = raw.get("image")
            rows.append(
                {
                    "id": raw["id"],
                    "image": image,
                    "image_bytes": (benchmark / task["image_folder"] / image).read_bytes()
                    if image
                    else None,
                    "conversations": json.dumps(raw["conversations"]),
                    "instruction": task["suffix"],
                }
            )
    random.Random(0).shuffle(rows)
    return rows


def encoder(processor):
    from PIL import Image

    from llava_c_ray.data.shards import row_record
    from llava_c_ray.data.template import encode_example

    def encode(row: dict) -> dict:
        image = None
        if row["image_bytes"] is not None:
            image = Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")
        return encode_example(row_record(row), processor, image, instruction=row["instruction"])

    return encode


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def padded_over_real(lengths: list[int], keys: list, window: int, batch: int = 16) -> float:
    """Tokens in padded micro-batches ÷ real tokens; rows sorted by `keys` within each window
    (window = batch: no grouping)."""
    padded = real = 0
    for start in range(0, len(lengths), window):
        order = sorted(range(start, min(start + window, len(lengths))), key=lambda i: keys[i])
        chunk = [lengths[i] for i in order] if window > batch else lengths[start : start + window]
        for i in range(0, len(chunk), batch):
            micro = chunk[i : i + batch]
            padded += len(micro) * max(micro)
            real += sum(micro)
    return padded / real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/builtin"))
    parser.add_argument("--steps", type=int, default=20, help="micro-batches timed per variant")
    args = parser.parse_args()

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_c_ray.builtin import ensure_builtin
    from llava_c_ray.data.collate import LlavaCollator
    from llava_c_ray.train.stream import row_length
    from llava_c_ray.train.trainer import loss_positions

    torch.set_num_threads(1)
    built = ensure_builtin(args.root)
    processor = AutoProcessor.from_pretrained(built.base_model)
    model = LlavaForConditionalGeneration.from_pretrained(built.base_model).train()
    rows = general_rows(built.benchmark)
    encode = encoder(processor)
    collate = LlavaCollator(processor.tokenizer.pad_token_id)
    micro = [rows[i * 16 : (i + 1) * 16] for i in range(args.steps)]
    batches = [collate([encode(r) for r in m]) for m in micro]

    def full():
        for batch in batches:
            model(**batch).loss.backward()

    def labelled():
        for batch in batches:
            keep, targets = loss_positions(batch["labels"])
            model(**batch, logits_to_keep=keep, shift_labels=targets).loss.backward()

    def encoding():
        for m in micro:
            collate([encode(r) for r in m])

    full_s, labelled_s = median_seconds(full, 3), median_seconds(labelled, 3)
    encode_s = median_seconds(encoding, 3)
    n = args.steps
    print(
        f"1. forward+backward per micro-batch: full logits {full_s / n * 1e3:.0f} ms, "
        f"labelled positions {labelled_s / n * 1e3:.0f} ms  (full ÷ labelled "
        f"{full_s / labelled_s:.2f}×)"
    )
    print(
        f"2. encoding per micro-batch {encode_s / n * 1e3:.0f} ms = "
        f"{encode_s / labelled_s:.0%} of the step it feeds (saved by the encode cache after "
        f"epoch 1)"
    )
    lengths = [len(encode(r)["input_ids"]) for r in rows]
    keys = [row_length(r) for r in rows]
    shuffled, grouped = padded_over_real(lengths, keys, 16), padded_over_real(lengths, keys, 256)
    print(
        f"3. padded ÷ real tokens per micro-batch: shuffled {shuffled:.2f}, grouped by length "
        f"{grouped:.2f}  (padding {shuffled - 1:.0%} vs {grouped - 1:.0%} of the real tokens)"
    )


if __name__ == "__main__":
    main()
