"""LLaCA's memory cost (issue 16), measured side by side in one run. Prints a ratio, asserts nothing.

    .venv/bin/python bench/llaca_memory.py [--steps 8] [--batch 8] [--rank 128]

The hook's state is two fp32 copies of the trainable parameters — θ* and g_{t−1} — on every
worker under DDP, and 1/N of them per worker under ZeRO-2/3 (sharded like the optimizer state).
For the tiny model with a LoRA of the recipe's rank (r128/α256, projector in full), two child
processes run the same training steps (forward, backward, clip, AdamW step) on the same batches,
one without and one with `LLaCAHook.on_optimizer_step` after every step: peak RSS with ÷ without,
and the state's size beside the trainable parameters'. The last line gives the state of the 7B
recipe from its shapes (LLaVA-1.5-7B: 32 layers, 4096 wide, MLP 11008, CLIP-L 1024 → projector).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def build(root: Path) -> Path:
    from llava_c_ray.builtin import build_tiny
    from llava_c_ray.data.synthetic.benchmark import generate_benchmark

    bench = generate_benchmark(root / "benchmark", seed=0, scale="test")
    return build_tiny(bench, root / "tiny", seed=0)


def probe(args) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    from llava_c_ray.config import TrainingConfig
    from llava_c_ray.methods.llaca import LLaCAHook, LLaCASetup
    from llava_c_ray.train.worker import build_optimizer

    training = TrainingConfig(lora_r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0)
    hook = LLaCAHook()
    model = LLaCASetup(hook)(LlavaForConditionalGeneration.from_pretrained(args.model), training)
    optimizer = build_optimizer(model, training)
    config = model.config
    tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    size = config.vision_config.image_size
    for step in range(args.steps):
        gen = torch.Generator().manual_seed(step)
        image = torch.full((args.batch, tokens), config.image_token_id)
        ids = torch.cat([image, torch.randint(5, 200, (args.batch, 48), generator=gen)], dim=1)
        labels = ids.masked_fill(ids == config.image_token_id, -100)
        pixels = torch.randn(args.batch, 3, size, size, generator=gen)
        optimizer.zero_grad()
        model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if args.probe == "llaca":
            hook.on_optimizer_step(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for t in hook.state_dict().values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_mib": rss, "trainable": trainable, "state_bytes": state}))


def run_probe(mode: str, args) -> dict:
    command = [sys.executable, __file__, "--probe", mode, "--model", str(args.model)]
    command += ["--steps", str(args.steps), "--batch", str(args.batch), "--rank", str(args.rank)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def recipe_7b_trainable(rank: int = 128) -> int:
    """LoRA on every linear of LLaVA-1.5-7B's language model + the 2-layer MLP projector."""
    hidden, mlp, layers, vision = 4096, 11008, 32, 1024
    attention = 4 * rank * (hidden + hidden)
    ffn = 3 * rank * (hidden + mlp)
    projector = vision * hidden + hidden + hidden * hidden + hidden
    return layers * (attention + ffn) + projector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (the recipe's: 128)")
    parser.add_argument("--probe", choices=("plain", "llaca"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.model = build(Path(tmp))
        plain, llaca = run_probe("plain", args), run_probe("llaca", args)
    mib = 2**20
    print(
        f"tiny (128 × 3), LoRA r{args.rank} + projector: {llaca['trainable']:,} trainable; "
        f"peak RSS {plain['rss_mib']:.0f} → {llaca['rss_mib']:.0f} MiB without → with the hook, "
        f"ratio {llaca['rss_mib'] / plain['rss_mib']:.3f}; state {llaca['state_bytes'] / mib:.1f} "
        f"MiB = {llaca['state_bytes'] / (4 * llaca['trainable']):.2f} fp32 copies"
    )
    big = recipe_7b_trainable()
    print(
        f"7B recipe (r128 all-linear + projector): {big / 1e6:.0f} M trainable → state "
        f"{8 * big / 2**30:.2f} GiB per worker under DDP, {8 * big / 2**30 / 8:.2f} GiB on each "
        "of 8 ZeRO ranks"
    )


if __name__ == "__main__":
    main()
