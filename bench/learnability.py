"""Can a base model learn the built-in continual tasks? Prints figures, asserts nothing.

    .venv/bin/python bench/learnability.py --model DIR [--model DIR ...] --benchmark DIR
        [--steps 120,360] [--lr 2e-3] [--projector-lr 2e-4] [--rank 16] [--tasks a,b]

For every checkpoint:
1. **Probes of the frozen image features** (what the language model is given: the vision tower's
   `vision_feature_layer` patch tokens): a linear and a one-hidden-layer MLP probe per continual
   task, on 2,000 fresh samples of the task's domain, scored on 500 more (the question is given
   to the probe as a one-hot, so conditional tasks are answerable). High probe scores with low
   task scores after training mean the features are there and the training does not use them.
2. **One task, trained alone** from the checkpoint with LoRA (the demo's rank and learning rates,
   batch 16, cosine schedule) for each `--steps`, in this process (no Ray: the numbers isolate the
   learning problem from the system), then scored on the task's train and test splits with the
   evaluator's greedy answers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

PROBE_TRAIN, PROBE_TEST = 2000, 500


def image_features(model, processor, images, batch: int = 250) -> torch.Tensor:
    layer = model.config.vision_feature_layer
    rows = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pixels = processor.image_processor(images[i : i + batch], return_tensors="pt")
            states = model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True)
            rows.append(states.hidden_states[layer][:, 1:].flatten(1))
    return torch.cat(rows)


def fit_probe(x: torch.Tensor, y: torch.Tensor, hidden: int) -> float:
    """Test accuracy (%) of a probe trained on the first PROBE_TRAIN rows."""
    torch.manual_seed(0)
    train, test = slice(0, PROBE_TRAIN), slice(PROBE_TRAIN, None)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-5
    x = (x - mean) / std
    classes = int(y.max()) + 1
    probe = (
        nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, classes))
        if hidden
        else nn.Linear(x.shape[1], classes)
    )
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(400):
        optimizer.zero_grad()
        nn.functional.cross_entropy(probe(x[train]), y[train]).backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * (probe(x[test]).argmax(1) == y[test]).float().mean().item()


def probe_task(model, processor, spec) -> tuple[float, float]:
    rng = random.Random(f"probe-{spec.name}")
    samples = [spec.domain(rng, "word") for _ in range(PROBE_TRAIN + PROBE_TEST)]
    questions = sorted({s.question for s in samples})
    answers = sorted({s.answer for s in samples})
    asked = torch.zeros(len(samples), len(questions))
    asked[range(len(samples)), [questions.index(s.question) for s in samples]] = 4.0
    x = torch.cat([image_features(model, processor, [s.image for s in samples]), asked], 1)
    y = torch.tensor([answers.index(s.answer) for s in samples])
    return fit_probe(x, y, 0), fit_probe(x, y, 256)


def train_alone(base: Path, benchmark: Path, task: dict, steps: int, args) -> dict:
    """LoRA on one task from `base` for `steps` steps; train/test scores and seconds."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_c_ray.config import TrainingConfig
    from llava_c_ray.data.collate import LlavaCollator
    from llava_c_ray.data.records import load_records
    from llava_c_ray.data.template import encode_example
    from llava_c_ray.train.hooks import add_lora

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(base)
    training = TrainingConfig(
        lora_r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, lr=args.lr
    )
    model = add_lora(LlavaForConditionalGeneration.from_pretrained(base), training)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in trainable if "projector" in n], "lr": args.projector_lr},
            {"params": [p for n, p in trainable if "projector" not in n], "lr": args.lr},
        ],
        weight_decay=0.0,
    )
    warmup = max(1, round(0.03 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    folder = benchmark / task["image_folder"]
    records = load_records(benchmark / task["train"], folder)
    encoded = [
        encode_example(r, processor, Image.open(folder / r.image).convert("RGB")) for r in records
    ]
    collate, rng, order = LlavaCollator(processor.tokenizer.pad_token_id), random.Random(0), []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        if len(order) < 16:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch, order = collate([encoded[i] for i in order[:16]]), order[16:]
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        model.merge_and_unload().save_pretrained(tmp)
        processor.save_pretrained(tmp)
        scores = {
            split: score_split(Path(tmp), benchmark, task, split) for split in ("train", "test")
        }
    return {**scores, "seconds": seconds}


def score_split(model_dir: Path, benchmark: Path, task: dict, split: str) -> float:
    from llava_c_ray.evaluate.evaluator import (
        EvalActor,
        EvalTask,
        batches,
        score_answers,
        task_queries,
    )

    actor = EvalActor(str(model_dir))
    eval_task = EvalTask(
        task["name"], benchmark / task[split], benchmark / task["image_folder"], task["scoring"]
    )
    work = batches(task_queries(eval_task, 64), 32)
    answers = [text for b in work for text in actor.answer(b, 24)]
    return score_answers([eval_task], [q for b in work for q in b], answers).scores[task["name"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--benchmark", type=Path, required=True)
    parser.add_argument("--steps", default="120,360")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--projector-lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tasks", help="comma-separated continual tasks (default: all)")
    parser.add_argument("--no-probe", action="store_true")
    args = parser.parse_args()

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_c_ray.data.synthetic.benchmark import CONTINUAL

    torch.set_num_threads(2)
    index = json.loads((args.benchmark / "benchmark.json").read_text())
    wanted = set(args.tasks.split(",")) if args.tasks else {t["name"] for t in index["continual"]}
    steps = [int(s) for s in args.steps.split(",")]
    for base in args.model:
        print(f"== {base}")
        if not args.no_probe:
            model = LlavaForConditionalGeneration.from_pretrained(base).eval()
            processor = AutoProcessor.from_pretrained(base)
            for spec in CONTINUAL:
                if spec.name in wanted:
                    linear, mlp = probe_task(model, processor, spec)
                    print(
                        f"  probe {spec.name:<11} linear {linear:5.1f}  mlp {mlp:5.1f}", flush=True
                    )
        for task in index["continual"]:
            if task["name"] not in wanted:
                continue
            for n in steps:
                r = train_alone(base, args.benchmark, task, n, args)
                print(
                    f"  alone {task['name']:<11} {n:4d} steps  train {r['train']:5.1f}  "
                    f"test {r['test']:5.1f}  chance {task['chance']:5.1f}  ({r['seconds']:.0f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
