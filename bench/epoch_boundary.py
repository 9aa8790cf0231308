"""The stall at each epoch boundary of a stage's data stream, measured side by side. Prints ratios.

    .venv/bin/python bench/epoch_boundary.py [--epochs 4] [--busy 0.15]

Two local Ray sessions, one after the other, on the built-in benchmark's six general training
sets as Parquet shards: Ray's default worker-pool settings, then `LOCAL_SYSTEM_CONFIG` (what
`llava-c` starts local Ray with). In each, two consumers (the stage's two training workers, one
CPU each) read `streaming_split(2, equal=True)` epoch after epoch as `ShardStream` does, busy on
the CPU for `--busy` seconds per micro-batch as a training step is. Printed: the wait for the
first micro-batch of epochs 2.. (the stall a stage pays at every epoch), default ÷ ours.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def prepare(root: Path) -> list[Path]:
    from llava_c_ray.data.shards import prepare_shards
    from llava_c_ray.data.synthetic.benchmark import GENERAL, generate_benchmark

    benchmark = root / "benchmark"
    generate_benchmark(benchmark, seed=0, scale="small", overwrite=True)
    names = [task.name for task in GENERAL]
    return [
        prepare_shards(benchmark / t / "train.json", benchmark / "images", root / f"{i:02d}-{t}")
        for i, t in enumerate(names)
    ]


def consume(iterator, epochs: int, busy: float) -> list[float]:
    """Seconds until the first micro-batch of every epoch, CPU-busy `busy` s per micro-batch."""
    import time

    waits = []
    for epoch in range(epochs):
        start, first = time.perf_counter(), None
        for _ in iterator.iter_batches(
            batch_size=16,
            batch_format="pyarrow",
            local_shuffle_buffer_size=256,
            local_shuffle_seed=epoch,
        ):
            first = first if first is not None else time.perf_counter() - start
            until = time.perf_counter() + busy
            while time.perf_counter() < until:
                pass
        waits.append(first)
    return waits


def measure(directories: list[Path], ours: bool, epochs: int, busy: float) -> list[float]:
    """Mean first-batch wait per epoch of the two consumers, in a fresh local Ray."""
    import ray

    from llava_c_ray.data.shards import ray_dataset
    from llava_c_ray.ray_session import LOCAL_SYSTEM_CONFIG

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _system_config=LOCAL_SYSTEM_CONFIG if ours else {},
    )
    task = ray.remote(num_cpus=1)(consume)
    splits = ray_dataset(directories, seed=0).streaming_split(2, equal=True)
    waits = ray.get([task.remote(split, epochs, busy) for split in splits])
    ray.shutdown()
    return [sum(pair) / 2 for pair in zip(*waits, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--busy", type=float, default=0.15)
    parser.add_argument("--child", choices=["default", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        waits = measure(args.shards, args.child == "ours", args.epochs, args.busy)
        print(json.dumps(waits))
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards = prepare(Path(tmp))
        results = {
            mode: json.loads(child(mode, shards, args).splitlines()[-1])
            for mode in ("default", "ours")
        }
    print(f"first micro-batch wait per epoch (s), {args.epochs} epochs, {args.busy} s busy/batch")
    for mode, waits in results.items():
        print(f"  {mode:8s} " + "  ".join(f"{w:6.2f}" for w in waits))
    later = {mode: sum(w[1:]) / len(w[1:]) for mode, w in results.items()}
    print(
        f"epochs 2..{args.epochs}: default {later['default']:.2f} s, ours {later['ours']:.2f} s, "
        f"ratio default/ours {later['default'] / max(later['ours'], 1e-9):.1f}x"
    )


def child(mode: str, shards: list[Path], args) -> str:
    """One measurement in its own process: each needs a fresh Ray with its own system config."""
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--epochs",
        str(args.epochs),
        "--busy",
        str(args.busy),
        "--shards",
        *map(str, shards),
    ]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


if __name__ == "__main__":
    main()
