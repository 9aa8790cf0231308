"""`continual_llava` (METHODS.md § continual_llava): the instruction parse, the selection rule, the
key phase touching only the task's keys, the frozen base (byte-identical across stages), zero
gradients off the selected slots, the same selection in the trainer and the evaluator, earlier
tasks' slots unchanged by a later stage, the key phase's Ray task = its local function, and a
real 2-worker stage that loads and evaluates, killed once mid-stage: the resumed pool state is
the uninterrupted run's at every step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from llava_c_ray.config import ClusterConfig, TrainingConfig, job_from_dict
from llava_c_ray.data.records import load_records
from llava_c_ray.data.template import SYSTEM, encode_example, encode_prompts, prompt_text
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods.base import StageContext, TrainedStage, bind
from llava_c_ray.methods.continual_llava import (
    KEYS_STATE,
    METHOD,
    SIDECAR,
    SIDECAR_CONFIG,
    first_user_turn,
    group_cosine,
    load_continual_llava_model,
    orthogonal_keys,
    pool_of,
    pool_tensors,
    pooled_layers,
    select_slots,
    task_key_state,
)
from llava_c_ray.ray_session import worker_options
from llava_c_ray.train.hooks import StepHook, unwrap
from tests.train.killing import KillAtStep

PARAMS = {"slots_per_task": 4, "rank": 2, "top_m": 2, "key_epochs": 2, "key_batch": 16}
TRAINING = TrainingConfig(seed=0)
TASKS = ("icon_count", "attributes")


def job(benchmark: Path, **extra):
    return job_from_dict(
        {
            "benchmark": {"path": str(benchmark)},
            "method": {"name": "continual_llava", "params": PARAMS},
            **extra,
        }
    )


def context(job_, stage: int, start: Path, run: Path) -> StageContext:
    bound = bind(job_)
    stages = tuple(bound.stages([t.name for t in job_.tasks]))
    return StageContext(
        job_, bound.params, stages[stage - 1], stages, start, run / f"s{stage}", run / "method"
    )


def base_model(checkpoint: Path) -> nn.Module:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def randomize(model: nn.Module, task: int, seed: int) -> nn.Module:
    """Non-zero B of `task`'s slots: a stand-in for a trained stage."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in pooled_layers(model).values():
            b = layer.lora_B[task]
            b.copy_(0.01 * torch.randn(b.shape, generator=generator))
    return model


def save_stage(setup, model: nn.Module, final: Path, checkpoint: Path) -> Path:
    """What a stage's rank 0 writes (`save_outputs`): the method's outputs and the processor."""
    from transformers import AutoProcessor

    setup.save(model, final)
    AutoProcessor.from_pretrained(checkpoint).save_pretrained(final / "model")
    return final / "model"


def records(benchmark: Path, task: str, n: int):
    return load_records(benchmark / task / "train.json", benchmark / "images")[:n]


def training_row(checkpoint: Path, benchmark: Path, record) -> dict[str, torch.Tensor]:
    """One training row as the Trainer sees it (prompt + answer, labels), batch of 1."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    image = Image.open(benchmark / "images" / record.image) if record.image else None
    ex = encode_example(record, processor, image)
    row = {
        "input_ids": torch.tensor([ex["input_ids"]]),
        "attention_mask": torch.ones(1, len(ex["input_ids"]), dtype=torch.long),
        "labels": torch.tensor([ex["labels"]]),
    }
    if ex["pixel_values"] is not None:
        row["pixel_values"] = ex["pixel_values"].unsqueeze(0)
    return row


def eval_rows(checkpoint: Path, benchmark: Path, recs) -> dict[str, torch.Tensor]:
    """The evaluator's left-padded prompt batch for the same records."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    images = [Image.open(benchmark / "images" / r.image) for r in recs]
    return dict(encode_prompts([r.question for r in recs], processor, images))


@pytest.fixture(scope="module")
def stage_one(ray_cluster, tiny_benchmark: Path, tiny_checkpoint: Path, tmp_path_factory):
    """Stage 1's training parts (key phase done, as a Ray task) and its set-up model."""
    run = tmp_path_factory.mktemp("cl_run")
    ctx = context(job(tiny_benchmark), 1, tiny_checkpoint, run)
    parts = METHOD.training(ctx)
    return ctx, parts, run


def test_first_user_turn_drops_the_system_line_images_and_the_answer() -> None:
    text = f"{SYSTEM} USER: <image><image>\nHow many stars?\nAnswer briefly. ASSISTANT: 3</s>"
    assert first_user_turn(text) == "How many stars? Answer briefly."
    assert first_user_turn(prompt_text("Which color?", image=True)) == "Which color?"


def test_selection_weights_are_cosine_over_their_sum_with_negatives_handled() -> None:
    sim = torch.tensor([[0.9, 0.3, -0.5, 0.6], [-0.2, -0.4, -0.9, -0.1]])
    allowed = torch.tensor([True, True, True, False])
    idx, w = select_slots(sim, allowed, 2)
    assert idx.tolist() == [[0, 1], [0, 1]]  # slot 3 is outside the allowed range
    torch.testing.assert_close(w[0], torch.tensor([0.9, 0.3]) / 1.2)
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5]))  # no positive cosine: uniform
    _, w = select_slots(torch.tensor([[0.8, -0.3]]), torch.tensor([True, True]), 2)
    torch.testing.assert_close(w[0], torch.tensor([1.0, 0.0]))  # negative cosine counts as 0


def test_key_phase_trains_only_the_task_keys_and_records_its_memory(stage_one) -> None:
    ctx, parts, _ = stage_one
    shape = parts.setup.shape
    state = load_file(str(ctx.state_file(KEYS_STATE)))
    initial = orthogonal_keys(shape, torch.Generator().manual_seed(ctx.job.training.seed))
    mine = shape.task_slots(0)
    assert not torch.equal(state["keys"][:, mine], initial[:, mine])
    rest = torch.ones(shape.size, dtype=torch.bool)
    rest[mine] = False
    assert torch.equal(state["keys"][:, rest], initial[:, rest])
    memory = state["memory"]
    torch.testing.assert_close(memory[0].sum(), torch.tensor(1.0))
    assert not memory[0, rest].any() and not memory[1:].any()
    # rerunning the stage (a restarted driver) reuses the key state
    before = ctx.state_file(KEYS_STATE).stat().st_mtime_ns
    METHOD.training(ctx)
    assert ctx.state_file(KEYS_STATE).stat().st_mtime_ns == before


def test_the_key_phase_task_computes_what_the_local_function_does(stage_one) -> None:
    """The Ray task's keys, memory and chosen slots are bit-identical to `task_key_state` run
    in this process (same inputs, same CPU kernels)."""
    ctx, parts, _ = stage_one
    local = task_key_state(
        ctx.tasks(),
        ctx.job.model.template,
        ctx.start_model,
        parts.setup.encoder,
        parts.setup.shape,
        0,
        None,
        ctx.params,
        ctx.job.training.seed,
    )
    remote = load_file(str(ctx.state_file(KEYS_STATE)))
    assert torch.equal(remote["keys"], local.keys)
    assert torch.equal(remote["memory"], local.memory)
    chosen = json.loads(ctx.state_file(KEYS_STATE).with_suffix(".json").read_text())
    assert chosen == dict.fromkeys(ctx.stage.tasks, {str(k): v for k, v in local.chosen.items()})
    assert sum(local.chosen.values()) % parts.setup.shape.top_m == 0
    cluster = ClusterConfig(use_gpu=True, cpus_per_worker=8, resources_per_worker={"a100": 1})
    assert worker_options(cluster) == {"num_cpus": 8, "num_gpus": 1, "resources": {"a100": 1}}


def test_phase_two_trains_only_the_task_increments_and_starts_from_the_base(
    stage_one, tiny_checkpoint: Path, tiny_benchmark: Path
) -> None:
    _, parts, _ = stage_one
    model = parts.setup(base_model(tiny_checkpoint), TRAINING).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{name}.{key}.0" for name in pooled_layers(model) for key in ("lora_A", "lora_B")
    }
    assert len(pooled_layers(model)) == 3  # o_proj of every tiny decoder layer
    rows = eval_rows(tiny_checkpoint, tiny_benchmark, records(tiny_benchmark, "icon_count", 2))
    with torch.no_grad():
        assert torch.equal(model(**rows).logits, base_model(tiny_checkpoint)(**rows).logits)


def test_unselected_slots_get_no_gradient(
    stage_one, tiny_checkpoint: Path, tiny_benchmark: Path
) -> None:
    _, parts, _ = stage_one
    model = randomize(parts.setup(base_model(tiny_checkpoint), TRAINING), 0, seed=1).train()
    selected = set()
    for record in records(tiny_benchmark, "icon_count", 2):
        model(**training_row(tiny_checkpoint, tiny_benchmark, record)).loss.backward()
        selected |= set(pool_of(model).last.indices.flatten().tolist())
    assert selected and len(selected) < parts.setup.shape.slots
    for layer in pooled_layers(model).values():
        for key in ("lora_A", "lora_B"):
            grad = getattr(layer, key)[0].grad
            for slot in range(parts.setup.shape.slots):
                assert bool(grad[slot].any()) == (slot in selected), (key, slot)
            assert all(p.grad is None for p in getattr(layer, key)[1:])
    assert all(k.grad is None for k in pool_of(model).keys)


def test_trainer_and_evaluator_select_the_same_slots(
    stage_one, tiny_checkpoint: Path, tiny_benchmark: Path, tmp_path: Path
) -> None:
    ctx, parts, _ = stage_one
    trainer_model = randomize(parts.setup(base_model(tiny_checkpoint), TRAINING), 0, seed=2)
    saved = save_stage(parts.setup, trainer_model, tmp_path / "final", tiny_checkpoint)
    loaded = load_continual_llava_model(str(saved), torch.float32).eval()
    recs = records(tiny_benchmark, "icon_count", 3)
    trainer_model.train()
    chosen = []
    for record in recs:
        with torch.no_grad():
            trainer_model(**training_row(tiny_checkpoint, tiny_benchmark, record))
        last = pool_of(trainer_model).last
        chosen.append((last.indices[0], last.weights[0]))
    rows = eval_rows(tiny_checkpoint, tiny_benchmark, recs)
    with torch.no_grad():
        evaluator_logits = loaded(**rows).logits
    last = pool_of(loaded).last
    for i, (indices, weights) in enumerate(chosen):
        assert torch.equal(last.indices[i], indices)
        torch.testing.assert_close(last.weights[i], weights, rtol=0, atol=1e-6)
    with torch.no_grad():
        trainer_logits = trainer_model.eval()(**rows).logits
    torch.testing.assert_close(evaluator_logits, trainer_logits, rtol=0, atol=1e-6)
    assert not torch.allclose(evaluator_logits, base_model(tiny_checkpoint)(**rows).logits)


def safetensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("model*.safetensors")):
        out |= load_file(str(path))
    return out


def test_a_later_stage_keeps_the_base_and_the_earlier_slots(
    stage_one, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    ctx, parts, run = stage_one
    first = randomize(parts.setup(base_model(tiny_checkpoint), TRAINING), 0, seed=3)
    start = save_stage(parts.setup, first, tmp_path / "s1", tiny_checkpoint)
    METHOD.after_training(ctx, TrainedStage(start, None))
    assert ctx.state_file("continual_llava").is_file()

    ctx2 = context(ctx.job, 2, start, run)
    parts2 = METHOD.training(ctx2)
    second = parts2.setup(base_model(start), TRAINING).train()
    saved = load_file(str(start / SIDECAR))
    keys1 = saved["keys"][:, parts.setup.shape.task_slots(0)]
    assert torch.equal(pool_of(second).keys[0], keys1)
    trainable = [p for p in second.parameters() if p.requires_grad]
    assert any(p is pool_of(second).context[1] for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()
    for name, layer in pooled_layers(second).items():
        torch.testing.assert_close(layer.lora_B[0], saved[f"{name}.lora_B"][:4], rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_A[0], saved[f"{name}.lora_A"][:4], rtol=0, atol=0)
    out = save_stage(parts2.setup, second, tmp_path / "s2", tiny_checkpoint)
    base = safetensors_of(tiny_checkpoint)
    for model_dir in (start, out):
        tensors = safetensors_of(model_dir)
        assert tensors.keys() == base.keys()
        assert all(torch.equal(tensors[k], base[k]) for k in base)
    config = (out / SIDECAR_CONFIG).read_text()
    assert '"trained_tasks": 2' in config and "icon_count" in config and "attributes" in config


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"training": {"full_finetune": True}}, "full_finetune"),
        ({"consolidation": {"method": "sac"}}, "consolidation.method"),
    ],
)
def test_settings_it_cannot_use_fail_naming_the_key(
    tiny_benchmark: Path, tiny_checkpoint: Path, tmp_path: Path, extra, message
) -> None:
    with pytest.raises(LlavaCError, match=message):
        METHOD.training(context(job(tiny_benchmark, **extra), 1, tiny_checkpoint, tmp_path))


def test_a_later_stage_needs_the_pool(tiny_benchmark, tiny_checkpoint, tmp_path) -> None:
    with pytest.raises(LlavaCError, match="without a Continual LLaVA pool"):
        METHOD.training(context(job(tiny_benchmark), 2, tiny_checkpoint, tmp_path))


def test_cosine_is_per_group() -> None:
    keys = torch.zeros(2, 1, 2)
    keys[0, 0, 0] = keys[1, 0, 1] = 1.0
    sim = group_cosine(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), keys)
    torch.testing.assert_close(sim[0, :, 0], torch.tensor([1.0, 2**-0.5]))


class PoolDump(StepHook):
    """Writes the pool's state (keys, λ, memory, increments, task counters) after every optimizer
    step, one file per rank and step, named `resumed` by a worker restored from a checkpoint."""

    name = "pool_dump"

    def __init__(self, out: Path):
        self.out = out
        self.steps = torch.zeros((), dtype=torch.long)
        self.resumed = False

    def on_optimizer_step(self, model) -> dict[str, float]:
        import ray.train
        from safetensors.torch import save_file

        self.steps += 1
        inner = unwrap(model)
        pool = pool_of(inner)
        state = pool_tensors(inner) | {"tasks": torch.tensor([pool.current, pool.trained])}
        rank = ray.train.get_context().get_world_rank()
        attempt = "resumed" if self.resumed else "first"
        self.out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(self.out / f"rank{rank}-step{int(self.steps)}-{attempt}.safetensors"))
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"steps": self.steps}

    def load_state_dict(self, state, model) -> None:
        self.steps, self.resumed = state["steps"].clone(), True


def stage_run(benchmark: Path, checkpoint: Path, out: Path, *hooks: StepHook):
    """Stage 1 on 2 workers, 4 steps, checkpoints at 2 and 4, with test step hooks added."""
    from llava_c_ray.pipeline import spec_for
    from llava_c_ray.train.stage import run_stage

    job_ = job(
        benchmark,
        training={
            "lr": 5e-3,
            "per_device_batch": 4,
            "global_batch": 8,
            "max_steps": 4,
            "checkpoint_every": 2,
            "warmup_ratio": 0.0,
        },
        cluster={"num_workers": 2},
    )
    ctx = context(job_, 1, checkpoint, out)
    spec = spec_for(job_, bind(job_), ctx, out / "train")
    return job_, ctx, run_stage(dataclasses.replace(spec, step_hooks=(*spec.step_hooks, *hooks)))


@pytest.fixture(scope="module")
def trained_stage(ray_cluster, tiny_benchmark: Path, tiny_checkpoint: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cl_stage") / "stage"
    job_, ctx, result = stage_run(tiny_benchmark, tiny_checkpoint, out, PoolDump(out / "pool"))
    return job_, ctx, result, out / "pool"


@pytest.mark.integration
def test_a_stage_trains_the_task_slots_and_its_output_evaluates(
    trained_stage, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from llava_c_ray.evaluate.evaluator import EvalTask, evaluate_checkpoint

    job_, ctx, result, _ = trained_stage
    assert result.steps == 4 and result.adapter_dir is None
    saved = load_file(str(result.model_dir / SIDECAR))
    b = [v for k, v in saved.items() if k.endswith("lora_B")]
    assert all(t[:4].any() and not t[4:].any() for t in b)  # task 1's slots only
    base = safetensors_of(tiny_checkpoint)
    tensors = safetensors_of(result.model_dir)
    assert all(torch.equal(tensors[k], base[k]) for k in base)
    task = job_.task("icon_count")
    evaluated = evaluate_checkpoint(
        result.model_dir,
        [EvalTask(task.name, task.test, task.image_folder, task.scoring, task.instruction)],
        batch_size=4,
        max_new_tokens=6,
        max_samples=8,
        loader=METHOD.load_model,
        out=tmp_path / "eval.json",
    )
    assert len(evaluated.samples["icon_count"]) == 8


def test_the_7b_job_uses_the_derived_settings() -> None:
    from llava_c_ray.config import load_job
    from llava_c_ray.packaged_jobs import packaged_job

    job_ = load_job(
        packaged_job("continual_finetune_llava15_7b_continual_llava"), check_files=False
    )
    bound = bind(job_)
    p, t = bound.params, job_.training
    assert bound.method is METHOD and bound.rule.name == "none"
    assert (p.slots_per_task, p.rank, p.top_m, p.key_groups) == (8, 8, 4, 4)
    assert (p.key_lr, p.key_weight_decay, p.key_epochs) == (1e-3, 0.01, 3)
    assert (t.lr, t.epochs, t.schedule, t.warmup_ratio, t.train_projector) == (
        2e-5,
        1,
        "cosine",
        0.03,
        False,
    )


def test_a_restarted_worker_gets_the_pool_back(stage_one, tiny_checkpoint, tmp_path) -> None:
    """What the Trainer checkpoints (the wrapped model's save_pretrained) is what a restarted
    worker's StageTrainer loads back; the memory comes from the key state."""
    from llava_c_ray.train.trainer import load_saved_weights

    _, parts, _ = stage_one
    trained = randomize(parts.setup(base_model(tiny_checkpoint), TRAINING), 0, seed=4)
    trained.save_pretrained(tmp_path / "checkpoint-2")
    restarted = parts.setup(base_model(tiny_checkpoint), TRAINING)
    load_saved_weights(restarted, tmp_path / "checkpoint-2")
    params = dict(restarted.named_parameters())
    moved = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    assert moved and all(torch.equal(params[n], p) for n, p in moved.items())
    assert torch.equal(pool_of(restarted).memory, pool_of(trained).memory)


def test_the_evaluator_generates_several_tokens_per_prompt(
    stage_one, tiny_checkpoint: Path, tiny_benchmark: Path, tmp_path: Path
) -> None:
    """The evaluator's actor answers left-padded text-only and image prompts over several greedy
    steps, and the decoding steps keep the prompt's selection (found by `llava-c demo --methods
    continual_llava`: a decoding step was read as a new prompt and failed)."""
    from llava_c_ray.evaluate.evaluator import EvalActor, EvalTask, task_queries

    ctx, parts, _ = stage_one
    model = randomize(parts.setup(base_model(tiny_checkpoint), TRAINING), 0, seed=3)
    saved = save_stage(parts.setup, model, tmp_path / "final", tiny_checkpoint)
    actor = EvalActor(str(saved), "vicuna_v1", load_continual_llava_model)
    probe, task = ctx.job.general_probe, ctx.job.tasks[1]
    for queries in (
        task_queries(EvalTask("probe", probe.path, probe.image_folder, "f1"), 4),
        task_queries(EvalTask(task.name, task.test, task.image_folder, "exact"), 3),
    ):
        answers = actor.answer(queries, 6)
        prompt_selection = pool_of(actor.model).last.indices.clone()
        assert len(answers) == len(queries)
        actor.model(**encode_prompts([q.question for q in queries], actor.processor, None))
        if queries[0].image is None:
            assert torch.equal(pool_of(actor.model).last.indices, prompt_selection)


def dumps(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.stem: load_file(str(p)) for p in sorted(directory.glob("*.safetensors"))}


@pytest.mark.integration
def test_a_killed_worker_resumes_the_pool_state_of_an_uninterrupted_run(
    trained_stage, ray_cluster, tiny_benchmark: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Worker rank 1 is killed once after optimizer step 3; Ray Train restarts both workers
    from the step-2 checkpoint. The pool state (keys, λ, memory, increments, task counters) of
    the resumed workers equals the uninterrupted run's at steps 3 and 4 (so it was restored
    exactly at step 2: same data order, optimizer and CPU kernels), and the stage's outputs
    (sidecar, chosen slots) are bit-identical."""
    _, _, want, pool = trained_stage
    out = tmp_path / "stage"
    marker = out / "killed"
    kill = KillAtStep(3, marker, out / "train" / "ray_train")
    _, _, result = stage_run(tiny_benchmark, tiny_checkpoint, out, PoolDump(out / "pool"), kill)
    assert marker.exists(), "no worker was killed"
    assert result.steps == 4 and result.metrics["resumed_from"] == 2

    uninterrupted, killed = dumps(pool), dumps(out / "pool")
    assert sorted(uninterrupted) == [f"rank{r}-step{s}-first" for r in (0, 1) for s in range(1, 5)]
    resumed = sorted(name for name in killed if name.endswith("resumed"))
    assert resumed == [f"rank{r}-step{s}-resumed" for r in (0, 1) for s in (3, 4)]
    for name, state in killed.items():
        reference = uninterrupted[name.rsplit("-", 1)[0] + "-first"]
        assert state.keys() == reference.keys()
        for key, tensor in state.items():
            assert torch.equal(tensor, reference[key]), (name, key)

    got, sidecar = (load_file(str(r.model_dir / SIDECAR)) for r in (result, want))
    assert got.keys() == sidecar.keys()
    assert all(torch.equal(tensor, sidecar[key]) for key, tensor in got.items())
    config = json.loads((result.model_dir / SIDECAR_CONFIG).read_text())
    assert config == json.loads((want.model_dir / SIDECAR_CONFIG).read_text())
    assert config["chosen"] and config["trained_tasks"] == 1
