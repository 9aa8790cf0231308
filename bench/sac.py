"""SAC speed figures, measured side by side in one run (issue 5). Prints ratios, asserts nothing.

    .venv/bin/python bench/sac.py [--checkpoint-gb 1.0] [--skip-dense-11008]

1. low-rank vs dense path on 7B-shaped LoRA deltas (r = 128): the SVD + σ̃, and with W̃ written;
2. whole-checkpoint SAC from a LoRA adapter ÷ a plain safetensors read+write copy of the checkpoint;
3. 1 vs 2 Ray workers on the dense path.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_c_ray.consolidate.engine import consolidate_checkpoint
from llava_c_ray.consolidate.lowrank import (
    add_rebuilt,
    consolidated_spectrum,
    dense_factors,
    lowrank_factors,
)

RUNS = 5


def timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def spectrum(factors) -> torch.Tensor:
    return consolidated_spectrum(factors, 0.2, "pad")[0]


def lowrank_sac(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    factors = lowrank_factors(b, a, 2.0)
    return add_rebuilt(weight, factors, spectrum(factors))


def lowrank_vs_dense(shapes: list[tuple[int, int]], rank: int = 128) -> None:
    """One LoRA delta s·B·A both ways: the exact SVD + σ̃ (what the two paths differ in), and end
    to end with W̃ = W + U·diag(σ̃)·Vh as the engine writes it (`add_rebuilt`)."""
    for m, n in shapes:
        b, a = torch.randn(m, rank) / rank**0.5, torch.randn(rank, n) / n**0.5
        weight = torch.randn(m, n)
        low = timed(lambda b=b, a=a: spectrum(lowrank_factors(b, a, 2.0)), 3)
        low_total = timed(functools.partial(lowrank_sac, weight, b, a), 3)
        started = time.perf_counter()
        dense = dense_factors(2.0 * b @ a)
        sigma = spectrum(dense)
        dense_svd = time.perf_counter() - started
        dense_total = dense_svd + timed(functools.partial(add_rebuilt, weight, dense, sigma))
        print(
            f"{m}x{n} r={rank}: SVD + σ̃ low-rank {low * 1e3:.1f} ms, dense {dense_svd:.2f} s, "
            f"ratio {dense_svd / low:.0f}x; with W̃ = W + U·diag(σ̃)·Vh: low-rank "
            f"{low_total * 1e3:.0f} ms, dense {dense_total:.2f} s, ratio {dense_total / low_total:.0f}x"
        )


def synthetic_checkpoint(
    root: Path, gigabytes: float, rank: int = 64, width: int = 2048
) -> tuple[Path, Path]:
    """A base checkpoint of `gigabytes` (fp32 width×width matrices, several shards) and a LoRA adapter on all."""
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    per_tensor = width * width * 4
    count = max(2, int(gigabytes * 2**30 / per_tensor))
    weight_map, lora, shard, shard_id = {}, {}, {}, 0
    for i in range(count):
        name = f"language_model.model.layers.{i}.mlp.up_proj.weight"
        shard[name] = torch.randn(width, width)
        lora[f"base_model.model.model.language_model.layers.{i}.mlp.up_proj.lora_A.weight"] = (
            torch.randn(rank, width) * 0.01
        )
        lora[f"base_model.model.model.language_model.layers.{i}.mlp.up_proj.lora_B.weight"] = (
            torch.randn(width, rank) * 0.01
        )
        if len(shard) == 16 or i == count - 1:
            shard_id += 1
            filename = f"model-{shard_id:05d}.safetensors"
            save_file(shard, str(base / filename), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, filename)
            shard = {}
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (base / "config.json").write_text("{}")
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


def plain_copy(base: Path, out: Path) -> None:
    out.mkdir()
    for shard in base.glob("*.safetensors"):
        save_file(load_file(str(shard)), str(out / shard.name), metadata={"format": "pt"})


def warm_workers() -> None:
    """A running cluster is the normal case: start Ray and its CPU workers (torch imported) before
    timing, so the figures measure consolidation, not process start-up."""
    import ray

    from llava_c_ray.ray_session import ensure_ray

    ensure_ray()

    @ray.remote(num_cpus=1)
    def load_engine() -> None:
        import llava_c_ray.consolidate.engine  # noqa: F401

    cpus = int(ray.available_resources().get("CPU", 1))
    ray.get([load_engine.remote() for _ in range(cpus)])


def durable(fn) -> float:
    """Seconds of `fn` until its files are on disk. Without the syncs whichever run comes second
    pays for the writeback of the first one's dirty pages (measured here: the same copy takes
    0.26 s or 1.5 s depending on what ran before it)."""
    os.sync()
    start = time.perf_counter()
    fn()
    os.sync()
    return time.perf_counter() - start


def whole_checkpoint(gigabytes: float) -> None:
    warm_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter = synthetic_checkpoint(root, gigabytes)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**30
        ratios = []
        for run in range(RUNS):
            copy = durable(lambda run=run: plain_copy(base, root / f"copy{run}"))
            sac = durable(
                lambda run=run: consolidate_checkpoint(
                    base, root / f"sac{run}", adapter=adapter, progress=False
                )
            )
            ratios.append(sac / copy)
            print(f"whole checkpoint, run {run + 1}: copy {copy:.1f} s, SAC {sac:.1f} s")
            shutil.rmtree(root / f"copy{run}")
            shutil.rmtree(root / f"sac{run}")
        print(
            f"whole checkpoint ({size:.2f} GiB, LoRA r=64): SAC ÷ copy, median of {RUNS} "
            f"alternating runs (both until synced to disk): {statistics.median(ratios):.2f}x"
        )


def dense_scaling() -> None:
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "base"
        tuned = root / "tuned"
        base.mkdir()
        tuned.mkdir()
        names = [f"layers.{i}.weight" for i in range(8)]
        weights = {n: torch.randn(1024, 1024) for n in names}
        save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
        save_file(
            {n: w + 0.01 * torch.randn_like(w) for n, w in weights.items()},
            str(tuned / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (base / "config.json").write_text("{}")
        times = {}
        for workers in (1, 2):
            out = root / f"out{workers}"
            times[workers] = timed(
                lambda out=out, w=workers: consolidate_checkpoint(
                    base, out, tuned=tuned, num_cpus=w, progress=False
                )
            )
            shutil.rmtree(out)
        print(
            f"dense path, 8 × 1024² deltas: 1 worker {times[1]:.1f} s, 2 workers {times[2]:.1f} s, speed-up {times[1] / times[2]:.2f}x"
        )
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint-gb", type=float, default=1.0)
    parser.add_argument(
        "--skip-dense-11008", action="store_true", help="the 11008×4096 dense SVD takes minutes"
    )
    args = parser.parse_args()
    shapes = [(4096, 4096)] + ([] if args.skip_dense_11008 else [(11008, 4096)])
    lowrank_vs_dense(shapes)
    whole_checkpoint(args.checkpoint_gb)
    dense_scaling()


if __name__ == "__main__":
    main()
