"""`moelora` (METHODS.md § moelora): the routed forward equals a hand computation token by token,
B = 0 gives the base model, the evaluator's logits equal the trainer's, cached generation routes
every new token, later stages carry the experts, and a real stage on Ray trains and evaluates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from llava_c_ray.config import TrainingConfig, job_from_dict
from llava_c_ray.data.records import load_records
from llava_c_ray.data.template import encode_prompts
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods.base import StageContext, bind
from llava_c_ray.methods.moelora import (
    EXPERT_TENSORS,
    METHOD,
    SIDECAR,
    ExpertShape,
    MoELoRALinear,
    MoELoRASetup,
    load_moelora_model,
    routed_layers,
)

TRAINING = TrainingConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0)
"""E = 4 experts of rank 2, s = 16 / 8 = 2."""
EXPERTS = 4


def base_model(checkpoint: Path) -> nn.Module:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-zero experts and routers, and a changed projector: a stand-in for a trained stage."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in routed_layers(model).values():
            for key in EXPERT_TENSORS:
                param = getattr(layer, key)
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        for name, param in model.named_parameters():
            if "multi_modal_projector" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def routed_model(checkpoint: Path, seed: int | None = None) -> nn.Module:
    model = MoELoRASetup(EXPERTS)(base_model(checkpoint), TRAINING).eval()
    return model if seed is None else randomize(model, seed)


def image_rows(checkpoint: Path, benchmark: Path, n: int = 3) -> dict[str, torch.Tensor]:
    """A left-padded batch of `n` image questions of the built-in benchmark."""
    from transformers import AutoProcessor

    records = load_records(benchmark / "icon_count" / "test.json", benchmark / "images")[:n]
    images = [Image.open(benchmark / "images" / r.image) for r in records]
    processor = AutoProcessor.from_pretrained(checkpoint)
    return dict(encode_prompts([r.question for r in records], processor, images))


def context(stage: int, start: Path, state: Path, **job) -> StageContext:
    data = {
        "tasks": [{"name": t, "train": "x", "test": "y"} for t in ("a", "b")],
        "method": {"name": "moelora", "params": {"experts": EXPERTS}},
        "training": {"lora_r": 8, "lora_alpha": 16},
        **job,
    }
    parsed = job_from_dict(data, check_files=False)
    bound = bind(parsed)
    stages = tuple(bound.stages(["a", "b"]))
    return StageContext(parsed, bound.params, stages[stage - 1], stages, start, state, state)


def test_forward_equals_hand_computation_per_token() -> None:
    """y_t = W·x_t + b + Σ_e softmax(R·x_t)_e · s · B_e·A_e·x_t for every token t, in float64."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(6, 5), ExpertShape(experts=3, rank=2, scale=1.5))
    with torch.no_grad():
        for key in EXPERT_TENSORS:
            getattr(layer, key).normal_()
    x = torch.randn(2, 4, 6)
    got = layer(x).detach().numpy()
    w, b = layer.base.weight.detach().double().numpy(), layer.base.bias.detach().double().numpy()
    r, a, bb = (getattr(layer, k).detach().double().numpy() for k in EXPERT_TENSORS)
    for i in range(2):
        for t in range(4):
            xt = x[i, t].double().numpy()
            logits = r @ xt
            gates = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            expected = w @ xt + b + sum(gates[e] * 1.5 * bb[e] @ (a[e] @ xt) for e in range(3))
            np.testing.assert_allclose(got[i, t], expected, rtol=1e-5, atol=1e-5)
    gates = layer.gates(x[0]).detach()
    assert not torch.allclose(gates[0], gates[1])  # routed per token, not per sequence


def test_fresh_experts_follow_coins_init_and_leave_the_base_output(
    tiny_checkpoint: Path, tiny_benchmark: Path
) -> None:
    rows = image_rows(tiny_checkpoint, tiny_benchmark)
    model = routed_model(tiny_checkpoint)
    layers = routed_layers(model)
    assert len(layers) == 7 * 3  # every linear of the 3 tiny decoder layers
    for layer in layers.values():
        assert layer.lora_A.shape == (EXPERTS, 2, layer.base.in_features)
        assert layer.lora_B.shape == (EXPERTS, layer.base.out_features, 2)
        assert layer.scale == 2.0 and not layer.lora_B.any()
        assert layer.router.abs().max() <= 1 / layer.base.in_features**0.5  # nn.Linear's bound
    a = torch.cat([layer.lora_A.flatten() for layer in layers.values()])
    assert abs(a.std().item() - 0.01) < 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.rsplit(".", 1)[-1] in EXPERT_TENSORS or "multi_modal_projector" in n for n in trainable
    )
    with torch.no_grad():
        routed, plain = model(**rows).logits, base_model(tiny_checkpoint)(**rows).logits
    assert torch.equal(routed, plain)


def test_evaluator_logits_equal_trainer_logits(
    tiny_checkpoint: Path, tiny_benchmark: Path, tmp_path: Path
) -> None:
    """A routed model with random non-zero experts, saved by the setup and loaded by the
    evaluator's loader, gives the same logits on the same rows."""
    rows = image_rows(tiny_checkpoint, tiny_benchmark)
    trainer_model = routed_model(tiny_checkpoint, seed=1)
    with torch.no_grad():
        trainer_logits = trainer_model(**rows).logits
        base_logits = base_model(tiny_checkpoint)(**rows).logits
    MoELoRASetup(EXPERTS).save(trainer_model, tmp_path / "final")
    assert (tmp_path / "final" / "model" / SIDECAR).is_file()
    assert not (tmp_path / "final" / "adapter").exists()
    assert len(routed_layers(trainer_model)) == 21  # still routed after saving

    loaded = load_moelora_model(str(tmp_path / "final" / "model"), torch.float32).eval()
    with torch.no_grad():
        evaluator_logits = loaded(**rows).logits
    assert torch.equal(evaluator_logits, trainer_logits)
    assert not torch.allclose(evaluator_logits, base_logits, atol=1e-3)

    # The checkpoint beside the sidecar is plain HF: W of the start model, the trained projector.
    start, saved = (
        base_model(tiny_checkpoint).state_dict(),
        base_model(tmp_path / "final" / "model"),
    )
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, start[name]) != ("multi_modal_projector" in name), name


def test_cached_generation_routes_every_new_token(
    tiny_checkpoint: Path, tiny_benchmark: Path
) -> None:
    """Greedy `generate` with the KV cache = argmax of a full forward over the whole sequence at
    every step (a router that saw only the cached sequence's prefix, or pooled it, would differ)."""
    rows = image_rows(tiny_checkpoint, tiny_benchmark, n=1)
    model = routed_model(tiny_checkpoint, seed=2)
    with torch.no_grad():
        cached = model.generate(**rows, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        ids = rows["input_ids"]
        for _ in range(6):
            logits = model(input_ids=ids, pixel_values=rows["pixel_values"]).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_a_later_stage_carries_the_experts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    first = routed_model(tiny_checkpoint, seed=3)
    MoELoRASetup(EXPERTS).save(first, tmp_path / "s1")
    start = tmp_path / "s1" / "model"

    assert METHOD.training(context(1, tiny_checkpoint, tmp_path / "m")).setup.carried is None
    parts = METHOD.training(context(2, start, tmp_path / "m"))
    assert parts.setup.carried == start and parts.init is None  # W and projector from `start`
    second = parts.setup(base_model(start), TRAINING)
    carried, saved = routed_layers(second), routed_layers(first)
    assert carried.keys() == saved.keys()
    for name, layer in carried.items():
        for key in EXPERT_TENSORS:
            assert torch.equal(getattr(layer, key), getattr(saved[name], key)), (name, key)
            assert getattr(layer, key).requires_grad  # all experts keep training, as in CoIN

    with pytest.raises(LlavaCError, match="without MoELoRA experts"):
        METHOD.training(context(2, tiny_checkpoint, tmp_path / "m"))
    with pytest.raises(LlavaCError, match="lora_r"):
        parts.setup(base_model(start), TrainingConfig(lora_r=16, lora_alpha=16))


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"training": {"lora_r": 10}}, "training.lora_r = 10"),
        ({"training": {"full_finetune": True}}, "full_finetune"),
        ({"consolidation": {"method": "sac"}}, "consolidation.method"),
    ],
)
def test_settings_moelora_cannot_use_fail_naming_the_key(tmp_path: Path, job, message) -> None:
    with pytest.raises(LlavaCError, match=message):
        METHOD.training(context(1, tmp_path, tmp_path / "m", **job))


def test_a_restarted_worker_gets_the_trained_tensors_back(tiny_checkpoint: Path, tmp_path) -> None:
    """What the Trainer checkpoints (the wrapped model's save_pretrained) is what a restarted
    worker's StageTrainer loads back: experts, routers and projector included."""
    from llava_c_ray.train.trainer import load_saved_weights

    trained = routed_model(tiny_checkpoint, seed=4)
    trained.save_pretrained(tmp_path / "checkpoint-2")
    restarted = routed_model(tiny_checkpoint)
    load_saved_weights(restarted, tmp_path / "checkpoint-2")
    params = dict(restarted.named_parameters())
    moved = {n: p for n, p in trained.named_parameters() if "lora_B" in n or "router" in n}
    assert moved and all(torch.equal(params[n], p) for n, p in moved.items())


@pytest.fixture(scope="module")
def trained_stage(ray_cluster, tiny_benchmark: Path, tiny_checkpoint: Path, tmp_path_factory):
    from llava_c_ray.pipeline import spec_for
    from llava_c_ray.train.stage import run_stage

    job = job_from_dict(
        {
            "benchmark": {"path": str(tiny_benchmark)},
            "method": {"name": "moelora", "params": {"experts": EXPERTS}},
            "training": {
                "lora_r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.05,
                "lr": 5e-3,
                "projector_lr": 5e-3,
                "per_device_batch": 4,
                "global_batch": 8,
                "max_steps": 6,
                "checkpoint_every": 3,
                "warmup_ratio": 0.0,
            },
            "cluster": {"num_workers": 2},
        }
    )
    bound = bind(job)
    names = [t.name for t in job.tasks]
    stages = tuple(bound.stages(names))
    # icon_count as the sequence's first stage (fresh experts from the tiny base model)
    stage = replace(next(s for s in stages if s.tasks == ("icon_count",)), index=1)
    out = tmp_path_factory.mktemp("moelora") / "stage"
    ctx = StageContext(job, bound.params, stage, stages, tiny_checkpoint, out, out / "method")
    return job, run_stage(spec_for(job, bound, ctx, out))


@pytest.mark.integration
def test_a_stage_trains_the_experts_and_its_output_loads(
    trained_stage, tiny_checkpoint: Path
) -> None:
    _, result = trained_stage
    assert result.steps == 6 and result.adapter_dir is None
    trained = load_moelora_model(str(result.model_dir), torch.float32)
    fresh = routed_model(tiny_checkpoint)  # the same seed: the experts the stage started from
    start, saved = routed_layers(fresh), routed_layers(trained)
    assert saved.keys() == start.keys()
    assert all(layer.lora_B.any() for layer in saved.values())
    for key in ("router", "lora_A"):
        assert all(not torch.equal(getattr(saved[n], key), getattr(start[n], key)) for n in saved)
    base = base_model(tiny_checkpoint).state_dict()
    for name, tensor in base_model(result.model_dir).state_dict().items():
        assert torch.equal(tensor, base[name]) != ("multi_modal_projector" in name), name


@pytest.mark.integration
def test_the_evaluator_runs_the_routed_stage_model(trained_stage, tmp_path: Path) -> None:
    from llava_c_ray.evaluate.evaluator import EvalTask, evaluate_checkpoint

    job, result = trained_stage
    task = job.task("icon_count")
    evaluated = evaluate_checkpoint(
        result.model_dir,
        [EvalTask(task.name, task.test, task.image_folder, task.scoring, task.instruction)],
        num_actors=1,
        batch_size=4,
        max_new_tokens=8,
        max_samples=8,
        loader=METHOD.load_model,
        out=tmp_path / "eval.json",
    )
    assert len(evaluated.samples["icon_count"]) == 8
    assert 0.0 <= evaluated.scores["icon_count"] <= 100.0


def test_the_7b_job_uses_coins_settings() -> None:
    from llava_c_ray.config import load_job
    from llava_c_ray.packaged_jobs import packaged_job

    job = load_job(packaged_job("continual_finetune_llava15_7b_moelora"), check_files=False)
    bound = bind(job)
    t = job.training
    assert bound.method is METHOD and bound.params.experts == 8 and bound.rule.name == "none"
    assert (t.lora_r, t.lora_alpha, t.lora_dropout, t.lr, t.projector_lr) == (
        128,
        256,
        0.05,
        2e-4,
        2e-5,
    )
    assert ExpertShape.from_training(8, t) == ExpertShape(experts=8, rank=16, scale=2.0)
