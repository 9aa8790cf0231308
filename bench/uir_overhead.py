"""UIR cost (issues 4 and 20), measured side by side in one run. Prints ratios, asserts nothing.

    .venv/bin/python bench/uir_overhead.py [--steps 12] [--batch 16] [--time-only]

For the tiny model and a wider CPU model (language model 512 wide, 4 layers), one training
micro-step (forward + backward through the real `StageTrainer.training_step`) on the same
training rows, alternately without UIR and with the packed inquiry row + the no-grad reference
forward with the adapters disabled: median time with ÷ without (target ≤ 1.12 on the wide model),
by the wall clock and by this process's CPU time (steadier when other work shares the machine).
Peak memory: the same loop in two child processes, one per mode, peak RSS with ÷ without (target
≤ 1.05; `--time-only` skips it).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDE = {"text_hidden": 512, "text_layers": 4, "text_intermediate": 1024}


def setup(root: Path, wide: bool, batch: int):
    """(trainer, batch without UIR, batch with UIR) for a LoRA stage of the built-in icon task."""
    from transformers import AutoProcessor, TrainingArguments

    from llava_c_ray.builtin import build_tiny
    from llava_c_ray.config import job_from_dict
    from llava_c_ray.data.synthetic.benchmark import generate_benchmark
    from llava_c_ray.methods.uir import UIRTerm
    from llava_c_ray.model.tiny import TinyDims
    from llava_c_ray.train.data import InquiryRows, StageCollator
    from llava_c_ray.train.spec import StageSpec
    from llava_c_ray.train.trainer import StageTrainer
    from llava_c_ray.train.worker import build_optimizer, load_model

    bench = root / "benchmark"
    if not bench.exists():
        generate_benchmark(bench, seed=0, scale="test")
    base = root / ("wide" if wide else "tiny")
    if not (base / "config.json").is_file():
        build_tiny(bench, base, 0, TinyDims(**WIDE) if wide else None)
    job = job_from_dict(
        {
            "benchmark": {"path": str(bench)},
            "training": {
                "lora_r": 16,
                "lora_alpha": 32,
                "per_device_batch": batch,
                "global_batch": batch,
            },
            "cluster": {"num_workers": 1},
        }
    )
    spec = StageSpec.from_job(
        job, tasks=[job.tasks[0]], init=base, out=root / "out", losses=(UIRTerm(1.0),)
    )
    processor = AutoProcessor.from_pretrained(base)
    model = load_model(spec)
    trainer = StageTrainer(
        model=model,
        args=TrainingArguments(str(root / "trainer"), use_cpu=True, report_to=[]),
        optimizers=(build_optimizer(model, spec.training), None),
        losses=spec.losses,
    )
    trainer.current_gradient_accumulation_steps = (
        1  # set by Trainer.train(); we call steps directly
    )
    rows = encoded_rows(spec, processor, batch)
    inquiries = InquiryRows(spec.inquiry, processor, spec.template, spec.inquiries_per_row, 0)
    plain = StageCollator(processor.tokenizer.pad_token_id, None, 0)(rows)
    with_uir = StageCollator(processor.tokenizer.pad_token_id, inquiries, spec.inquiry_rows)(rows)
    return trainer, plain, with_uir


def encoded_rows(spec, processor, count: int) -> list[dict]:
    """The first `count` training examples of the stage, encoded as the workers encode them."""
    from PIL import Image

    from llava_c_ray.data.records import load_records
    from llava_c_ray.data.template import encode_example

    source = spec.train_files[0]
    rows = []
    for record in load_records(source.path, source.image_folder)[:count]:
        with Image.open(Path(source.image_folder) / record.image) as image:
            rows.append(
                encode_example(
                    record,
                    processor,
                    image.convert("RGB"),
                    spec.template,
                    instruction=source.instruction,
                    max_length=2048,
                )
            )
    return rows


def step(trainer, batch) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one micro-step."""
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.training_step(trainer.model, dict(batch))
    trainer.model.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_ratios(root: Path, wide: bool, steps: int, batch: int) -> tuple[float, float, float]:
    """(median wall-clock seconds without UIR, with, ratio of the median CPU times)."""
    trainer, plain, with_uir = setup(root, wide, batch)
    trainer.model.train()
    for _ in range(2):  # warm-up
        step(trainer, plain), step(trainer, with_uir)
    plain_t, uir_t = [], []
    for _ in range(steps):
        plain_t.append(step(trainer, plain))
        uir_t.append(step(trainer, with_uir))
    wall = [statistics.median(t[0] for t in times) for times in (plain_t, uir_t)]
    cpu = [statistics.median(t[1] for t in times) for times in (plain_t, uir_t)]
    return wall[0], wall[1], cpu[1] / cpu[0]


def peak_rss_mib(root: Path, wide: bool, steps: int, batch: int, mode: str) -> float:
    """Peak RSS of a child process that runs `steps` micro-steps in one mode only."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--probe",
            mode,
            "--root",
            str(root),
            "--steps",
            str(steps),
            "--batch",
            str(batch),
        ]
        + (["--wide"] if wide else []),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def probe(args) -> None:
    trainer, plain, with_uir = setup(args.root, args.wide, args.batch)
    trainer.model.train()
    for _ in range(args.steps):
        step(trainer, with_uir if args.probe == "uir" else plain)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch (the job default is 16)")
    parser.add_argument("--time-only", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--probe", choices=("plain", "uir"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--wide", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for wide in (False, True):
            name = "wide (512 × 4)" if wide else "tiny (128 × 3)"
            a, b, cpu_ratio = time_ratios(root, wide, args.steps, args.batch)
            line = (
                f"{name}: step {1000 * a:.0f} ms without UIR, {1000 * b:.0f} ms with; "
                f"time ratio {b / a:.3f}, CPU-time ratio {cpu_ratio:.3f} (target ≤ 1.12 wide)"
            )
            if not args.time_only:
                plain_mem = peak_rss_mib(root, wide, args.steps, args.batch, "plain")
                uir_mem = peak_rss_mib(root, wide, args.steps, args.batch, "uir")
                line += (
                    f"; peak RSS {plain_mem:.0f} → {uir_mem:.0f} MiB, "
                    f"ratio {uir_mem / plain_mem:.3f} (target ≤ 1.05)"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
