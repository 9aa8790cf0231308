"""The evaluator's routing record: a routed model's eval.json holds, per task, each expert's mean
weight and the share of questions sent to their own task's expert (and each sample's weights); a
plain model's eval.json has no routing at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from llava_c_ray.evaluate.evaluator import (
    EvalActor,
    EvalTask,
    RoutedModel,
    batches,
    evaluation_result,
    load_hf_model,
    own_expert_index,
    task_queries,
    write_eval,
)
from llava_c_ray.run_records import EvalOutput

EXPERTS = ["icon_count", "attributes"]
EVEN, ODD = [0.9, 0.1], [0.3, 0.7]


class AlternatingRouter(nn.Module):
    """A stand-in routed model: generates with the plain model and routes the batch's even rows
    mostly to the first expert, its odd rows mostly to the second."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.expert_names = list(EXPERTS)
        self.last_weights: torch.Tensor | None = None

    def generate(self, **batch):
        rows = batch["input_ids"].shape[0]
        self.last_weights = torch.tensor([ODD if i % 2 else EVEN for i in range(rows)])
        return self.model.generate(**batch)


def routed_loader(model_dir: str, dtype) -> AlternatingRouter:
    return AlternatingRouter(load_hf_model(model_dir, dtype))


def eval_tasks(benchmark: Path) -> list[EvalTask]:
    images = benchmark / "images"
    return [
        EvalTask("icon_count", benchmark / "icon_count" / "test.json", images, "choice"),
        EvalTask("attributes", benchmark / "attributes" / "test.json", images, "exact"),
        EvalTask("line_plot", benchmark / "line_plot" / "test.json", images, "choice"),
    ]


def evaluate_in_process(checkpoint: Path, benchmark: Path, loader, out: Path) -> dict:
    """`evaluate_checkpoint` without Ray: one actor answers every batch; eval.json read back."""
    tasks = eval_tasks(benchmark)
    queries = [q for t in tasks for q in task_queries(t, 3 if t.name == "icon_count" else 2)]
    work = batches(queries, 4)
    actor = EvalActor(str(checkpoint), "vicuna_v1", loader)
    answered = [actor.answer_routed(b, 2) for b in work]
    assert [a.texts for a in answered] == [actor.answer(b, 2) for b in work]
    write_eval(out, checkpoint, evaluation_result(tasks, work, answered))
    return json.loads(out.read_text())


def test_a_routed_models_eval_json_records_its_routing_per_task(
    tiny_checkpoint: Path, tiny_benchmark: Path, tmp_path: Path
) -> None:
    saved = evaluate_in_process(tiny_checkpoint, tiny_benchmark, routed_loader, tmp_path / "e.json")
    routing = EvalOutput.model_validate(saved).routing
    assert routing is not None and routing.experts == EXPERTS
    # icon_count: rows 0, 1, 2 of one batch → even, odd, even; own expert 0 chosen by rows 0, 2.
    icon = routing.tasks["icon_count"]
    assert icon.rows == 3 and icon.mean_weights == pytest.approx([0.7, 0.3])
    assert icon.own_expert == pytest.approx(200 / 3)
    # attributes: even, odd; own expert 1 chosen by the odd row only.
    assert routing.tasks["attributes"].own_expert == pytest.approx(50.0)
    # A task without an expert has weights but no own-expert share.
    assert routing.tasks["line_plot"].own_expert is None
    assert routing.tasks["line_plot"].mean_weights == pytest.approx([0.6, 0.4])
    weights = [s["routing"] for s in saved["samples"]["icon_count"]]
    assert weights == [pytest.approx(w) for w in (EVEN, ODD, EVEN)]


def test_a_plain_models_eval_json_has_no_routing(
    tiny_checkpoint: Path, tiny_benchmark: Path, tmp_path: Path
) -> None:
    saved = evaluate_in_process(tiny_checkpoint, tiny_benchmark, load_hf_model, tmp_path / "e.json")
    assert "routing" not in saved
    assert all("routing" not in s for rows in saved["samples"].values() for s in rows)
    assert EvalOutput.model_validate(saved).routing is None


def test_the_protocol_is_the_two_attributes() -> None:
    assert isinstance(AlternatingRouter(nn.Linear(1, 1)), RoutedModel)
    assert not isinstance(nn.Linear(1, 1), RoutedModel)


def test_a_tasks_own_expert_is_the_one_trained_on_it() -> None:
    assert own_expert_index("b", ["a", "b"]) == 1
    assert own_expert_index("c", ["a", "b+c"]) == 1  # a multi-task stage's expert
    assert own_expert_index("bc", ["a", "b+c"]) is None
    assert own_expert_index("general_probe", ["a"]) is None
