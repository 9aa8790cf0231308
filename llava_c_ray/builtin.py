"""The embedded default: the built-in benchmark and a tiny LLaVA base model pre-trained on it.

`ensure_builtin(root)` builds what is missing and reuses what exists (each part is written to a
temporary directory and renamed into place, so an interrupted build is redone, never half-used):

- `root/benchmark/`: the procedurally drawn benchmark (`llava-c data synth`);
- `root/tiny/`:      a randomly initialised tiny LLaVA whose tokenizer is trained on the benchmark;
- `root/vision/`:    that model with its vision tower pre-trained contrastively on captioned drawn
                     scenes (`model/vision_pretrain.py`) — the tiny world's CLIP;
- `root/base/`:      that model trained jointly on the six general domains with the Ray Train stage
                     runner (language model and projector; the tower stays frozen, as LLaVA keeps
                     its CLIP) — the "well-trained LLaVA" that continual fine-tuning starts from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from llava_c_ray import console
from llava_c_ray.config import job_from_dict
from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import (
    atomic_directory,
    move_into_place,
    refuse_overlap,
    refuse_replacing,
    write_json_atomic,
)

WORLD_VERSION = 2
"""The built-in world's version, written to `root/world.json`: 2 = the CLIP-style tower, balanced
continual tasks of 1,200 rows (docs/builtin-world.md); 1 = the earlier world (no marker)."""

BASE_RECIPE = {
    "name": "builtin-base",
    "method": {"name": "joint"},
    "training": {
        "full_finetune": True,
        "lr": 1e-3,
        "warmup_ratio": 0.05,
        "schedule": "cosine",
        "epochs": 12,
        "per_device_batch": 16,
        "global_batch": 32,
        "checkpoint_every": 300,
        "seed": 0,
    },
    "cluster": {"num_workers": 2},
}


@dataclass(frozen=True)
class Builtin:
    root: Path
    benchmark: Path
    tiny_model: Path
    vision_model: Path
    base_model: Path


def ensure_builtin(root: Path, *, seed: int = 0, scale: str = "small") -> Builtin:
    """Build (or reuse) the built-in benchmark, tiny model and pre-trained base under `root`."""
    root = Path(root).absolute()
    built = Builtin(root, root / "benchmark", root / "tiny", root / "vision", root / "base")
    check_world_version(built)
    if not (built.benchmark / "benchmark.json").is_file():
        from llava_c_ray.data.synthetic.benchmark import generate_benchmark

        print(f"[llava-c] generating the built-in benchmark in {built.benchmark}", flush=True)
        generate_benchmark(built.benchmark, seed=seed, scale=scale, overwrite=True)
    if not (built.tiny_model / "config.json").is_file():
        build_tiny(built.benchmark, built.tiny_model, seed)
    if not (built.vision_model / "config.json").is_file():
        pretrain_vision(built.tiny_model, built.vision_model)
    if not (built.base_model / "config.json").is_file():
        pretrain_base(built)
    return built


def check_world_version(built: Builtin) -> None:
    """Refuse a root built by another version of the built-in world (its parts would be reused
    with this version's); mark a new root with this version."""
    marker = built.root / "world.json"
    if marker.is_file():
        version = json.loads(marker.read_text()).get("version")
    elif any(p.exists() for p in (built.benchmark, built.tiny_model, built.base_model)):
        version = 1
    else:
        write_json_atomic(marker, {"version": WORLD_VERSION})
        return
    if version != WORLD_VERSION:
        raise LlavaCError(
            f"this folder holds the built-in world of version {version}; this llava-c builds "
            f"version {WORLD_VERSION} (docs/builtin-world.md)",
            path=built.root,
            fix="move or remove it to build the current world there, or pass --out DIR "
            "(runs made on the old world stay valid in their own folders)",
        )


def build_tiny(benchmark: Path, out: Path, seed: int, dims=None) -> Path:
    """The tiny LLaVA (default `TinyDims`, or `dims`) with a tokenizer trained on the benchmark."""
    from llava_c_ray.data.synthetic.benchmark import benchmark_texts
    from llava_c_ray.data.template import SYSTEM
    from llava_c_ray.model.tiny import build_tiny_llava

    if not (Path(benchmark) / "benchmark.json").is_file():
        raise LlavaCError(
            "not a benchmark directory (no benchmark.json)",
            path=benchmark,
            fix="build one with `llava-c data synth --out DIR` and pass it as --benchmark",
        )
    refuse_overlap(out, [benchmark], fix="choose an --out outside the benchmark directory")
    refuse_replacing(out, overwrite=False)
    print(f"[llava-c] building the tiny LLaVA in {out}", flush=True)
    # The template's fixed text is part of every prompt: its system line is one token, its role
    # tags are learnt as few.
    texts = benchmark_texts(benchmark) + ["USER: ASSISTANT:"] * 200
    with atomic_directory(out) as tmp:
        build_tiny_llava(tmp, texts, seed=seed, dims=dims, phrases=[SYSTEM])
    return out


def pretrain_vision(tiny: Path, out: Path) -> Path:
    """The tiny LLaVA with its vision tower pre-trained contrastively (the world's CLIP)."""
    from llava_c_ray.model.vision_pretrain import pretrain_vision_tower

    print(f"[llava-c] pre-training the tiny vision tower in {out}", flush=True)
    return pretrain_vision_tower(tiny, out)


def base_job(built: Builtin):
    return job_from_dict(
        {**BASE_RECIPE, "benchmark": {"path": str(built.benchmark), "setting": "general"}}
    )


def pretrain_base(built: Builtin) -> Path:
    """Train the language model and projector of the tiny model (its pre-trained vision tower
    frozen) on the union of the six general domains."""
    from llava_c_ray.train.spec import StageSpec
    from llava_c_ray.train.stage import run_stage

    print(
        f"[llava-c] pre-training the tiny base model in {built.base_model} (a few minutes; "
        f"logs in {console.LOGS.open_in(built.root)})",
        flush=True,
    )
    job = base_job(built)
    work = built.root / ".base-training"
    shutil.rmtree(work, ignore_errors=True)
    spec = StageSpec.from_job(job, tasks=job.tasks, init=built.vision_model, out=work, name="base")
    result = run_stage(spec)
    move_into_place(result.model_dir, built.base_model)
    shutil.rmtree(work, ignore_errors=True)
    return built.base_model
