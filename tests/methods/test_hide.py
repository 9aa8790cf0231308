"""`hide` (METHODS.md § hide): the layer against a hand computation, earlier experts byte-identical
after a later stage trains, a query at anchor j routed to expert j, rows routed differently in one
batch equal to each alone, the folded lower layers equal to the hooked forward, the evaluator's
logits equal to the trainer-side routed model's, and a real stage on Ray that trains, computes its
anchors and evaluates."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from llava_c_ray.config import TrainingConfig, job_from_dict
from llava_c_ray.data.records import load_records
from llava_c_ray.data.template import encode_prompts
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods.base import StageContext, TrainedStage, bind
from llava_c_ray.methods.hide import (
    ANCHORS,
    METHOD,
    ROUTER,
    SIDECAR,
    HiDeParams,
    HiDeSetup,
    RoutedHiDe,
    hide_after_training,
    hide_layers,
    load_hide_model,
    routed_model,
)
from llava_c_ray.methods.hide_clip import ClipFeatures, routing_text
from llava_c_ray.methods.hide_rule import HiDeLinear, RowWeights, routing_weights
from llava_c_ray.model.tiny_clip import ensure_tiny_clip

TRAINING = TrainingConfig(lora_dropout=0.0, seed=0)
PARAMS = HiDeParams()
TASKS = ("icon_count", "attributes", "bar_chart")


def base_model(checkpoint: Path) -> nn.Module:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def trained_stage(
    start: Path, out: Path, seed: int, base: Path | None = None
) -> tuple[nn.Module, Path]:
    """A stand-in for a trained stage: expert t with non-zero B, a changed projector; saved."""
    from transformers import AutoProcessor

    previous = start if (start / SIDECAR).is_file() else None
    setup = HiDeSetup(PARAMS, base or start, previous)
    model = setup(base_model(base or start), TRAINING).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hide_layers(model).values():
            layer.lora_A[-1].copy_(0.3 * torch.randn(layer.lora_A[-1].shape, generator=generator))
            layer.lora_B[-1].copy_(0.3 * torch.randn(layer.lora_B[-1].shape, generator=generator))
        for name, param in model.named_parameters():
            if "multi_modal_projector" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    setup.save(model, out)
    AutoProcessor.from_pretrained(base or start).save_pretrained(out / "model")  # as the worker
    return model, out / "model"


def image_rows(checkpoint: Path, benchmark: Path, tasks=TASKS, per_task: int = 1):
    """A left-padded batch of test questions with images, `per_task` from each of `tasks`."""
    from transformers import AutoProcessor

    records = [
        r
        for task in tasks
        for r in load_records(benchmark / task / "test.json", benchmark / "images")[:per_task]
    ]
    images = [Image.open(benchmark / "images" / r.image) for r in records]
    processor = AutoProcessor.from_pretrained(checkpoint)
    return dict(encode_prompts([r.question for r in records], processor, images))


def write_anchors(model_dir: Path, clip: Path, rows: dict, task_names: list[str]) -> None:
    """Anchors = the CLIP features of `rows` (row i is task i's anchor), as after_training writes."""
    from transformers import AutoTokenizer

    features = ClipFeatures(clip)
    prompts = AutoTokenizer.from_pretrained(model_dir).batch_decode(
        rows["input_ids"], skip_special_tokens=True
    )
    anchors = {
        "image": features.image(rows["pixel_values"]).contiguous(),
        "text": features.text([routing_text(p) for p in prompts]).contiguous(),
    }
    save_file(anchors, str(model_dir / ANCHORS))
    router = {"clip": str(clip), "temperature": 0.1, "tasks": task_names}
    (model_dir / ROUTER).write_text(json.dumps(router))


@pytest.fixture(scope="module")
def clip(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    return ensure_tiny_clip(tiny_checkpoint, tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def two_stages(tiny_checkpoint: Path, tiny_benchmark: Path, clip: Path, tmp_path_factory):
    """Stage 1 and stage 2 (random experts, saved), anchors of icon_count and attributes rows."""
    root = tmp_path_factory.mktemp("hide")
    rows = image_rows(tiny_checkpoint, tiny_benchmark, TASKS[:2])
    first, first_dir = trained_stage(tiny_checkpoint, root / "s1", seed=1)
    second, second_dir = trained_stage(first_dir, root / "s2", seed=2, base=tiny_checkpoint)
    write_anchors(second_dir, clip, rows, list(TASKS[:2]))
    return first_dir, second, second_dir, rows


def test_layer_equals_hand_computation_in_every_mode() -> None:
    """single: W·x + b + s·B_t·A_t·x; fused: s·(ΣB)(ΣA) or s·ΣB·A; routed: Σ_i w_i·s·B_i·A_i·x
    with each row's own w, in float64."""
    torch.manual_seed(0)
    layer = HiDeLinear(nn.Linear(6, 5), scale=2.0)
    for _ in range(3):
        layer.add_expert(2, torch.randn(2, 6), torch.randn(5, 2))
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    w, bias = (t.detach().double().numpy() for t in (layer.base.weight, layer.base.bias))
    a = [p.detach().double().numpy() for p in layer.lora_A]
    b = [p.detach().double().numpy() for p in layer.lora_B]
    xs = x.numpy()
    weights = torch.softmax(torch.randn(2, 3), -1)
    expected = {
        "single": xs @ (w + 2 * b[2] @ a[2]).T + bias,
        "factor_sum": xs @ (w + 2 * sum(b) @ sum(a)).T + bias,
        "product_sum": xs @ (w + 2 * sum(bi @ ai for ai, bi in zip(a, b, strict=True))).T + bias,
        "routed": np.stack(
            [
                xs[r] @ (w + 2 * sum(weights[r, i].item() * b[i] @ a[i] for i in range(3))).T + bias
                for r in range(2)
            ]
        ),
    }
    layer.double()
    layer.weights = RowWeights()
    layer.weights.value = weights
    for mode, want in expected.items():
        layer.mode = "fused" if mode.endswith("_sum") else mode
        layer.fusion = mode if mode.endswith("_sum") else "factor_sum"
        np.testing.assert_allclose(layer(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_routing_weights_are_a_tempered_softmax() -> None:
    sims = torch.tensor([[0.9, 0.5, 0.1]])
    w = routing_weights(sims, 0.1)
    assert torch.allclose(w, torch.softmax(torch.tensor([[9.0, 5.0, 1.0]]), -1))
    assert w[0, 0] > 0.98


def test_earlier_experts_stay_byte_identical_while_expert_t_trains(
    tiny_checkpoint: Path, tiny_benchmark: Path, two_stages
) -> None:
    from llava_c_ray.train.worker import build_optimizer

    first_dir, _, _, rows = two_stages
    setup = HiDeSetup(PARAMS, tiny_checkpoint, first_dir)
    model = setup(base_model(tiny_checkpoint), TRAINING).train()
    saved = load_file(str(first_dir / SIDECAR))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.endswith(("lora_A.1", "lora_B.1")) or "multi_modal_projector" in n for n in trainable
    )
    earlier = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".0")}
    projector = {n: p.detach().clone() for n, p in model.named_parameters() if "projector" in n}
    assert len(earlier) == 2 * 21  # A and B of expert 1 on the 21 linears of the 3 tiny layers
    for name, layer in hide_layers(model).items():
        assert torch.equal(layer.lora_A[0], saved[f"{name}.lora_A"][0])
        assert not layer.lora_B[1].any()  # expert t fresh: B = 0

    optimizer = build_optimizer(model, TrainingConfig(lr=1e-2, weight_decay=0.1))
    labels = rows["input_ids"].masked_fill(rows["attention_mask"] == 0, -100)
    for _ in range(2):
        model(**rows, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in earlier.items())
    assert all(not torch.equal(params[n], before) for n, before in projector.items())
    assert all(layer.lora_B[1].any() for layer in hide_layers(model).values())

    # Stage t's forward runs expert t alone: with expert t's B zeroed, the model is W + projector.
    with torch.no_grad():
        for layer in hide_layers(model).values():
            layer.lora_B[1].zero_()
        plain = base_model(tiny_checkpoint)
        plain.load_state_dict(
            {n: p for n, p in model.named_parameters() if "projector" in n}, strict=False
        )
        assert torch.allclose(model.eval()(**rows).logits, plain(**rows).logits, atol=1e-6)


def test_the_saved_checkpoint_is_w_plus_the_fused_change_below_and_w_on_top(
    tiny_checkpoint: Path, two_stages
) -> None:
    _, second, second_dir, _ = two_stages
    folded, start = base_model(second_dir).state_dict(), base_model(tiny_checkpoint).state_dict()
    config = json.loads((second_dir / "hide.json").read_text())
    assert config["experts"] == 2 and config["base"] == str(tiny_checkpoint)
    assert all(".layers.2." in n for n in config["expanded"]) and len(config["expanded"]) == 7
    for name, layer in hide_layers(second).items():
        w = start[f"{name}.weight"]
        a, b = sum(layer.lora_A), sum(layer.lora_B)
        want = w if name in config["expanded"] else w + 2.0 * (b @ a)
        assert torch.allclose(folded[f"{name}.weight"], want, atol=1e-6), name


def test_a_query_at_anchor_j_is_routed_to_expert_j(tiny_checkpoint: Path, two_stages) -> None:
    _, _, second_dir, rows = two_stages
    routed = load_hide_model(str(second_dir), torch.float32).eval()
    assert isinstance(routed, RoutedHiDe) and routed.tasks == list(TASKS[:2])
    weights = routed.route(rows["input_ids"], rows["pixel_values"])
    assert weights.argmax(-1).tolist() == [0, 1]
    assert (weights.diagonal() > 0.5).all()


def test_the_evaluator_records_the_routing_of_the_loaded_model(
    tiny_benchmark: Path, two_stages, tmp_path: Path
) -> None:
    """The routed model is the evaluator's `RoutedModel`: each answered row's weights are those
    `route` gives it, and eval.json's routing record sends each anchor row to its own expert."""
    from llava_c_ray.evaluate.evaluator import (
        EvalActor,
        EvalTask,
        RoutedModel,
        batches,
        evaluation_result,
        task_queries,
        write_eval,
    )

    _, _, second_dir, rows = two_stages
    images = tiny_benchmark / "images"
    tasks = [EvalTask(t, tiny_benchmark / t / "test.json", images, "exact") for t in TASKS[:2]]
    work = batches([q for t in tasks for q in task_queries(t, 1)], 4)  # the anchors' rows
    actor = EvalActor(str(second_dir), "vicuna_v1", load_hide_model)
    assert isinstance(actor.model, RoutedModel) and actor.model.expert_names == list(TASKS[:2])
    answered = [actor.answer_routed(b, 2) for b in work]
    expected = actor.model.route(rows["input_ids"], rows["pixel_values"])
    assert torch.allclose(torch.tensor([w for a in answered for w in a.weights]), expected)
    write_eval(tmp_path / "eval.json", second_dir, evaluation_result(tasks, work, answered))
    routing = json.loads((tmp_path / "eval.json").read_text())["routing"]
    assert routing["experts"] == list(TASKS[:2])
    assert [routing["tasks"][t]["own_expert"] for t in TASKS[:2]] == [100.0, 100.0]


def test_rows_routed_differently_in_one_batch_equal_each_alone(two_stages) -> None:
    _, _, second_dir, rows = two_stages
    routed = load_hide_model(str(second_dir), torch.float32).eval()
    # Positions counted from each row's first token, as `generate` does for left-padded rows.
    positions = (rows["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        together = routed(**rows, position_ids=positions).logits
        weights = routed.last_weights
        for i in range(2):
            keep = rows["attention_mask"][i].bool()
            alone = {k: v[i : i + 1] for k, v in rows.items()}
            for key in ("input_ids", "attention_mask"):
                alone[key] = alone[key][:, keep]
            logits = routed(**alone).logits
            assert torch.allclose(routed.last_weights, weights[i : i + 1], atol=1e-6)
            assert torch.allclose(logits[0], together[i, keep], atol=1e-5)
    assert not torch.allclose(weights[0], weights[1], atol=0.1)


def test_evaluator_logits_equal_the_trainer_side_routed_model(
    tiny_checkpoint: Path, two_stages
) -> None:
    """The in-memory trained model routed (lower layers hooked, ΔW unfolded) and the evaluator's
    loaded one (ΔW folded into W) give the same logits and generations on the same rows."""
    _, second, second_dir, rows = two_stages
    config = json.loads((second_dir / "hide.json").read_text())
    trainer = routed_model(
        second, config["expanded"], "factor_sum", second_dir, tiny_checkpoint
    ).eval()
    loaded = load_hide_model(str(second_dir), torch.float32).eval()
    with torch.no_grad():
        trainer_logits, loaded_logits = trainer(**rows).logits, loaded(**rows).logits
        plain = base_model(second_dir)(**rows).logits
        generated = [
            m.generate(**rows, max_new_tokens=4, do_sample=False) for m in (trainer, loaded)
        ]
    # Equal up to float32 rounding of W + ΔW (ΔW of these random experts is ~50× W).
    assert torch.allclose(trainer_logits, loaded_logits, atol=1e-4)
    assert torch.equal(trainer.last_weights, loaded.last_weights)
    assert not torch.allclose(loaded_logits, plain, atol=1e-3)  # the top layer's experts act
    assert torch.equal(*generated)


def context(stage: int, start: Path, state: Path, **job) -> StageContext:
    data = {
        "tasks": [{"name": t, "train": "x", "test": "y"} for t in ("a", "b")],
        "method": {"name": "hide"},
        **job,
    }
    parsed = job_from_dict(data, check_files=False)
    bound = bind(parsed)
    stages = tuple(bound.stages(["a", "b"]))
    return StageContext(parsed, bound.params, stages[stage - 1], stages, start, state, state)


def test_every_stage_trains_on_the_initial_w(tiny_checkpoint: Path, two_stages, tmp_path) -> None:
    first_dir = two_stages[0]
    parts = METHOD.training(context(1, tiny_checkpoint, tmp_path))
    assert parts.init == tiny_checkpoint and parts.setup.previous is None
    parts = METHOD.training(context(2, first_dir, tmp_path))
    assert parts.init == tiny_checkpoint and parts.setup.previous == first_dir
    with pytest.raises(LlavaCError, match="without HiDe experts"):
        METHOD.training(context(2, tiny_checkpoint, tmp_path))
    assert load_hide_model(str(tiny_checkpoint), torch.float32).__class__.__name__ != "RoutedHiDe"


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"training": {"full_finetune": True}}, "full_finetune"),
        ({"consolidation": {"method": "sac"}}, "consolidation.method"),
        ({"method": {"name": "hide", "params": {"fusion": "mean"}}}, "method.params.fusion"),
    ],
)
def test_settings_hide_cannot_use_fail_naming_the_key(tmp_path: Path, job, message) -> None:
    with pytest.raises(LlavaCError, match=message):
        METHOD.training(context(1, tmp_path, tmp_path / "m", **job))


@pytest.fixture(scope="module")
def ray_stage(ray_cluster, tiny_benchmark: Path, tiny_checkpoint: Path, tmp_path_factory):
    from llava_c_ray.pipeline import spec_for
    from llava_c_ray.train.stage import run_stage

    job = job_from_dict(
        {
            "benchmark": {"path": str(tiny_benchmark)},
            "method": {"name": "hide", "params": {"anchor_actors": 2}},
            "training": {
                "lora_dropout": 0.05,
                "lr": 5e-3,
                "projector_lr": 5e-3,
                "per_device_batch": 4,
                "global_batch": 8,
                "max_steps": 4,
                "checkpoint_every": 2,
                "warmup_ratio": 0.0,
            },
            "cluster": {"num_workers": 2},
        }
    )
    bound = bind(job)
    stages = tuple(bound.stages([t.name for t in job.tasks]))
    stage = replace(next(s for s in stages if s.tasks == ("icon_count",)), index=1)
    out = tmp_path_factory.mktemp("hide-ray") / "stage"
    ctx = StageContext(job, bound.params, stage, stages, tiny_checkpoint, out, out / "method")
    result = run_stage(spec_for(job, bound, ctx, out))
    hide_after_training(ctx, TrainedStage(result.model_dir, result.adapter_dir))
    return job, ctx, result


@pytest.mark.integration
def test_a_stage_on_ray_trains_its_expert_computes_anchors_and_evaluates(
    ray_stage, tmp_path: Path
) -> None:
    from llava_c_ray.evaluate.evaluator import EvalTask, evaluate_checkpoint

    job, ctx, result = ray_stage
    assert result.steps == 4 and result.adapter_dir is None
    experts = load_file(str(result.model_dir / SIDECAR))
    assert all(t.shape[0] == 1 for t in experts.values())
    assert all(t.any() for k, t in experts.items() if k.endswith("lora_B"))
    anchors = load_file(str(result.model_dir / ANCHORS))
    assert anchors["image"].shape[0] == anchors["text"].shape[0] == 1
    assert torch.equal(anchors["text"], load_file(str(ctx.state_file("hide_anchors")))["text"])
    assert (ctx.state_dir / "clip" / "config.json").is_file()

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
    routing = json.loads((tmp_path / "eval.json").read_text())["routing"]  # one expert: all of it
    assert routing["experts"] == ["icon_count"]
    assert routing["tasks"]["icon_count"] == {"rows": 8, "mean_weights": [1.0], "own_expert": 100.0}


def test_the_7b_job_uses_the_authors_settings() -> None:
    from llava_c_ray.config import load_job
    from llava_c_ray.packaged_jobs import packaged_job

    job = load_job(packaged_job("continual_finetune_llava15_7b_hide"), check_files=False)
    bound = bind(job)
    p = bound.params
    assert bound.method is METHOD and bound.rule.name == "none"
    assert (p.rank, p.scale, p.temperature, p.expand_layers, p.fusion) == (
        8,
        2.0,
        0.1,
        (-1,),
        "factor_sum",
    )
    assert p.clip_path is not None
    t = job.training
    assert (t.lr, t.projector_lr, t.lora_dropout) == (2e-4, 2e-5, 0.05)


def test_a_restarted_worker_gets_the_trained_tensors_back(
    tiny_checkpoint: Path, two_stages, tmp_path: Path
) -> None:
    """What the Trainer checkpoints (the wrapped model's save_pretrained) is what a restarted
    worker's StageTrainer loads back: both experts and the projector included."""
    from llava_c_ray.train.trainer import load_saved_weights

    first_dir, second, _, _ = two_stages
    second.save_pretrained(tmp_path / "checkpoint-2")
    restarted = HiDeSetup(PARAMS, tiny_checkpoint, first_dir)(base_model(tiny_checkpoint), TRAINING)
    load_saved_weights(restarted, tmp_path / "checkpoint-2")
    params = dict(restarted.named_parameters())
    moved = {n: p for n, p in second.named_parameters() if "lora_" in n or "projector" in n}
    assert moved and all(torch.equal(params[n], p) for n, p in moved.items())
