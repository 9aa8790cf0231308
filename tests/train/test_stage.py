"""One stage on Ray Train with 2 CPU workers: loss falls, θ_t = base + adapter delta, UIR applied, faults."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from llava_c_ray.config import job_from_dict
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods.uir import UIRTerm
from llava_c_ray.train.hooks import StepHook
from llava_c_ray.train.spec import StageSpec
from llava_c_ray.train.stage import run_stage
from tests.train.killing import KillAtStep

pytestmark = pytest.mark.integration


def stage_job(benchmark: Path, **training):
    settings = {
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lr": 5e-3,
        "projector_lr": 5e-3,
        "per_device_batch": 4,
        "global_batch": 8,
        "max_steps": 6,
        "checkpoint_every": 3,
        "warmup_ratio": 0.0,
        **training,
    }
    return job_from_dict(
        {"benchmark": {"path": str(benchmark)}, "training": settings, "cluster": {"num_workers": 2}}
    )


def spec_for(
    job, init: Path, out: Path, uir_weight: float = 1.0, task: str = "icon_count"
) -> StageSpec:
    losses = (UIRTerm(uir_weight),) if uir_weight > 0 else ()
    return StageSpec.from_job(job, tasks=[job.task(task)], init=init, out=out, losses=losses)


UIR_STEPS = 12


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_benchmark: Path, tiny_checkpoint: Path, tmp_path_factory):
    """Plain LoRA training (no UIR term): also the UIR test's run without UIR."""
    out = tmp_path_factory.mktemp("stage") / "out"
    job = stage_job(tiny_benchmark, max_steps=UIR_STEPS)
    return run_stage(spec_for(job, tiny_checkpoint, out, uir_weight=0.0))


def test_loss_falls_and_outputs_load(trained) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert trained.steps == UIR_STEPS
    assert trained.metrics["last_loss"] < trained.metrics["first_loss"]
    LlavaForConditionalGeneration.from_pretrained(trained.model_dir)
    AutoProcessor.from_pretrained(trained.model_dir)
    assert (trained.adapter_dir / "adapter_config.json").is_file()
    assert list((trained.model_dir.parent / "tensorboard").rglob("events.out.tfevents*"))


def test_merged_weights_equal_peft_merge(trained, tiny_checkpoint: Path) -> None:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    expected = PeftModel.from_pretrained(base, trained.adapter_dir).merge_and_unload().state_dict()
    merged = LlavaForConditionalGeneration.from_pretrained(trained.model_dir).state_dict()
    assert expected.keys() == merged.keys()
    changed = 0
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name
        changed += (
            not torch.equal(tensor, base.state_dict()[name]) if name in base.state_dict() else 0
        )
    original = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint).state_dict()
    assert any(not torch.equal(merged[n], original[n]) for n in original if "q_proj" in n)
    assert all(torch.equal(merged[n], original[n]) for n in original if "vision_tower" in n)


def inquiry_drift(model_dir: Path, init: Path, benchmark: Path) -> float:
    """Mean squared final-hidden-state change on inquiries (the UIR quantity) vs the start model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_c_ray.data.records import load_records
    from llava_c_ray.data.template import prompt_text

    processor = AutoProcessor.from_pretrained(init)
    questions = [
        r.question for r in load_records(benchmark / "inquiry.json", require_answers=False)[-8:]
    ]
    batch = processor.tokenizer(
        [prompt_text(q) for q in questions], return_tensors="pt", padding=True
    )
    states = []
    for path in (init, model_dir):
        model = LlavaForConditionalGeneration.from_pretrained(path)
        with torch.no_grad():
            states.append(model(**batch, output_hidden_states=True).hidden_states[-1])
    mask = batch["attention_mask"].unsqueeze(-1)
    return float((((states[1] - states[0]) ** 2) * mask).sum() / (mask.sum() * states[0].shape[-1]))


@pytest.mark.parametrize("boundary", ["pad", "truncate"])
def test_lowrank_sac_of_the_trained_adapter_equals_dense_sac(
    trained, tiny_checkpoint, boundary
) -> None:
    """SAC from the adapter's factors = SAC by dense SVD of s·B·A, for every LoRA pair the stage
    runner trained (issue 5)."""
    from llava_c_ray.consolidate.plan import plan_adapter
    from llava_c_ray.consolidate.rules import RULES
    from llava_c_ray.model.safetensors_io import LazyCheckpoint

    items, adapter = plan_adapter(LazyCheckpoint(tiny_checkpoint), trained.adapter_dir)
    pairs = [item for item in items if item.kind == "lora"]
    assert len(pairs) >= 12
    for item in pairs:
        b, a = adapter.get(item.lora_b).double(), adapter.get(item.lora_a).double()
        low = RULES["sac"].change(0.3, boundary, lora=(b, a, item.scale))
        dense = RULES["sac"].change(0.3, boundary, delta=item.scale * b @ a)
        assert (low - dense).norm() <= 1e-5 * dense.norm(), item.name


def test_uir_keeps_inquiry_states_closer(
    ray_cluster, trained, tiny_benchmark, tiny_checkpoint, tmp_path
) -> None:
    """The same stage as `trained` (same data, seed and steps), with a strong UIR term."""
    job = stage_job(tiny_benchmark, max_steps=UIR_STEPS)
    with_uir = run_stage(spec_for(job, tiny_checkpoint, tmp_path / "uir", uir_weight=50.0))
    drift_off = inquiry_drift(trained.model_dir, tiny_checkpoint, tiny_benchmark)
    drift_on = inquiry_drift(with_uir.model_dir, tiny_checkpoint, tiny_benchmark)
    print(f"inquiry hidden-state drift: UIR off {drift_off:.3e}, UIR on {drift_on:.3e}")
    assert drift_on < 0.7 * drift_off


def test_worker_killed_mid_stage_resumes_from_checkpoint(
    ray_cluster, tiny_benchmark, tiny_checkpoint, tmp_path
) -> None:
    """Worker rank 1 is killed once, after step 6, when the step-4 checkpoint is registered: Ray
    Train restarts the group from it and the stage ends with the step count and outputs whole."""
    out = tmp_path / "fault"
    job = stage_job(tiny_benchmark, max_steps=10, checkpoint_every=4, per_device_batch=4)
    kill = KillAtStep(6, out / "killed", out / "ray_train")

    class CountSteps(StepHook):
        """A method's per-step state: restored from the checkpoint, the count reaches 10."""

        name = "count"

        def __init__(self) -> None:
            self.count = torch.zeros(())

        def on_optimizer_step(self, model) -> dict[str, float]:
            self.count += 1
            return {"steps": float(self.count)}

        def state_dict(self) -> dict[str, torch.Tensor]:
            return {"steps": self.count}

        def load_state_dict(self, state, model) -> None:
            self.count = state["steps"].clone()

        def finalize(self, model) -> None:
            (out / f"count-{os.getpid()}.txt").write_text(str(int(self.count)))

    spec = dataclasses.replace(spec_for(job, tiny_checkpoint, out), step_hooks=(CountSteps(), kill))
    result = run_stage(spec)
    assert (out / "killed").exists(), "no training worker was killed"
    assert result.steps == 10
    assert result.metrics["resumed_from"] == 4
    counts = [int(p.read_text()) for p in out.glob("count-*.txt")]
    assert counts == [10, 10], counts
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(result.model_dir)


def test_bad_inputs_fail_before_training(
    ray_cluster, tiny_benchmark, tiny_checkpoint, tmp_path
) -> None:
    job = stage_job(tiny_benchmark)
    with pytest.raises(LlavaCError, match="start checkpoint"):
        run_stage(spec_for(job, tmp_path / "absent", tmp_path / "o1"))
    with pytest.raises(LlavaCError, match="not in this job"):
        job.task("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(
        '[{"id": "x", "conversations": [{"from": "human", "value": "<image>\\nq"}, {"from": "gpt", "value": "a"}]}]'
    )
    broken = job.model_copy(update={"tasks": [job.tasks[0].model_copy(update={"train": bad})]})
    with pytest.raises(LlavaCError, match="image_token"):
        run_stage(spec_for(broken, tiny_checkpoint, tmp_path / "o2", task=job.tasks[0].name))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(
    ray_cluster, tiny_benchmark: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """lr = 1e30: step 1 is finite and checkpointed, step 2 overflows. No retries into the NaN."""
    job = stage_job(
        tiny_benchmark, lr=1e30, projector_lr=1e30, max_steps=4, checkpoint_every=1, max_failures=2
    )
    started = time.perf_counter()
    with pytest.raises(LlavaCError, match=r"non-finite loss .* at optimizer step 2") as error:
        run_stage(spec_for(job, tiny_checkpoint, tmp_path / "out", uir_weight=0.0))
    kept = Path(str(error.value).split("Last good checkpoint: ")[1].strip())
    state = kept / "checkpoint" / "trainer_state.json"
    assert state.is_file() and '"global_step": 1' in state.read_text()
    assert not (tmp_path / "out" / "model").exists()
    print(f"non-finite loss stopped the stage in {time.perf_counter() - started:.1f}s")


def test_rank_zero_writes_the_progress_the_driver_draws(trained) -> None:
    from llava_c_ray.train.progress import PROGRESS_FILE, read_progress

    progress = read_progress(trained.model_dir.parent / PROGRESS_FILE)
    assert progress["step"] == progress["max_steps"] == trained.steps == UIR_STEPS
    assert progress["logs"]["loss"] > 0 and progress["logs"]["tokens_per_s"] > 0
