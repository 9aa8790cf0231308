"""The α search end to end on the tiny model: Ray Tune trials leasing quick evaluation actors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_c_ray.config import job_from_dict
from llava_c_ray.errors import LlavaCError
from llava_c_ray.model.safetensors_io import LazyCheckpoint
from llava_c_ray.search.tune import search_alpha

pytestmark = pytest.mark.integration

GRID = [0.0, 0.1, 0.2, 0.5, 1.0]


def tiny_job(benchmark: Path, model: Path, **search):
    return job_from_dict(
        {
            "name": "search",
            "model": {"path": str(model)},
            "benchmark": {"path": str(benchmark)},
            "search": {"enabled": True, "space": GRID, "subset_size": 4, "num_actors": 2} | search,
            "eval": {"max_new_tokens": 8, "batch_size": 4},
            "cluster": {"num_workers": 1},
            "training": {"per_device_batch": 2, "global_batch": 2},
        }
    )


def search_first_task(job, base: Path, root: Path, name: str):
    """A search for stage 1 (no old tasks) reusing the module's factor cache."""
    return search_alpha(
        job,
        new=[job.tasks[0].name],
        old=[],
        base=base,
        factors=root / "factors",
        out=root / name,
    )


@pytest.fixture(scope="module")
def grid_search(ray_cluster, tiny_benchmark, tiny_checkpoint, tiny_tuned_pair, tmp_path_factory):
    job = tiny_job(tiny_benchmark, tiny_checkpoint, compare_modelmix=True)
    root = tmp_path_factory.mktemp("search")
    return job, root, search_second_task(job, tiny_checkpoint, tiny_tuned_pair[0], root)


def search_second_task(job, base: Path, adapter: Path, root: Path):
    """A search for stage 2 (the first task is old) of `adapter` trained from `base`."""
    names = [t.name for t in job.tasks]
    return search_alpha(
        job,
        new=names[1:2],
        old=names[:1],
        base=base,
        factors=root / "factors",
        out=root / "search",
        adapter=adapter,
    )


def test_grid_runs_through_tune_and_picks_the_argmax(grid_search) -> None:
    job, root, result = grid_search
    saved = json.loads((root / "search" / "trials.json").read_text())
    assert sorted(t["alpha"] for t in saved["trials"]) == GRID
    objectives = {t["alpha"]: t["objective"] for t in saved["trials"]}
    top = max(objectives.values())
    assert result.best_alpha == saved["best_alpha"] == min(a for a in GRID if objectives[a] == top)
    assert result.experiment_path.is_dir()
    assert len(list(result.experiment_path.glob("run_trial_*"))) == len(GRID)
    for trial in saved["trials"]:
        assert set(trial["scores"]) == {job.tasks[0].name, job.tasks[1].name, "general_probe"}
        assert trial["modelmix"]["objective"] >= 0
        assert trial["build_seconds"] >= 0 and trial["eval_seconds"] > 0


def test_the_actors_candidate_equals_the_consolidation_engine(
    grid_search, tiny_checkpoint, tiny_tuned_pair, tmp_path
) -> None:
    import ray

    from llava_c_ray.consolidate.engine import consolidate_checkpoint
    from llava_c_ray.search.actor import SearchActor

    job, root, _ = grid_search
    alpha = 0.35
    consolidate_checkpoint(
        tiny_checkpoint,
        tmp_path / "merged",
        adapter=tiny_tuned_pair[0],
        alpha=alpha,
        factors_cache=root / "factors",
        progress=False,
    )
    merged, base = LazyCheckpoint(tmp_path / "merged"), LazyCheckpoint(tiny_checkpoint)
    changed = [n for n in merged.keys() if not torch.equal(merged.get(n), base.get(n))]
    assert changed
    actor = ray.remote(num_cpus=1)(SearchActor).remote(
        str(tiny_checkpoint), str(root / "factors"), "vicuna_v1", "pad"
    )
    weights = ray.get(actor.weights.remote(alpha, "sac", changed))
    for name in changed:
        torch.testing.assert_close(weights[name], merged.get(name), rtol=1e-5, atol=1e-6)
    ray.kill(actor)


def test_side_paths_compute_like_the_merged_model(tiny_checkpoint, tiny_tuned_pair, tmp_path):
    """The hooks really change the forward pass: logits equal a model loaded from the merge."""
    from transformers import LlavaForConditionalGeneration

    from llava_c_ray.consolidate.engine import consolidate_checkpoint
    from llava_c_ray.consolidate.factors import compute_factors, load_factors
    from llava_c_ray.search.candidate import CandidateModel

    compute_factors(tiny_checkpoint, tmp_path / "factors", adapter=tiny_tuned_pair[0])
    consolidate_checkpoint(
        tiny_checkpoint,
        tmp_path / "merged",
        adapter=tiny_tuned_pair[0],
        alpha=0.2,
        factors_cache=tmp_path / "factors",
        progress=False,
    )
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    candidate = CandidateModel(model, *load_factors(tmp_path / "factors"))
    assert candidate.paths, "LoRA-shaped deltas should be applied as side paths"
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    ids = torch.arange(5, 40).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        candidate.set_alpha(0.2)
        torch.testing.assert_close(
            model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )
        candidate.set_alpha(0.0, "modelmix")  # ModelMix at α = 0 is the base model itself
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)


def test_asha_scores_growing_subsets(ray_cluster, tiny_benchmark, tiny_checkpoint, grid_search):
    job = tiny_job(tiny_benchmark, tiny_checkpoint, asha=True, space=[0.1, 0.5])
    _, root, _ = grid_search
    result = search_first_task(job, tiny_checkpoint, root, "asha")
    assert {t["rung"] for t in result.trials} <= {1, 2, 4}
    assert result.best_alpha in (0.1, 0.5)
    assert all(t["old"] is None for t in result.trials)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"space": []}, "search space is empty"),
        ({"space": [0.2, 1.5]}, "outside"),
        ({"objective": {"new": 0, "old": 0, "general": 0}}, "all objective weights are 0"),
        ({"sampler": "random", "space": [0.5, 0.1]}, "two increasing values"),
    ],
)
def test_bad_search_settings_fail_at_load(tiny_benchmark, search, message) -> None:
    with pytest.raises(LlavaCError, match=message):
        tiny_job(tiny_benchmark, Path("unused"), **search)


def test_weights_only_on_groups_absent_at_this_stage_fail_before_any_trial(
    tiny_benchmark, tmp_path
) -> None:
    job = tiny_job(tiny_benchmark, Path("unused"), objective={"new": 0, "old": 1, "general": 0})
    with pytest.raises(LlavaCError, match="this stage scores"):
        search_alpha(
            job,
            new=[job.tasks[0].name],
            old=[],
            base=tmp_path,
            factors=tmp_path / "f",
            out=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_more_actors_than_cpus_fails_before_any_trial(
    ray_cluster, grid_search, tiny_benchmark, tiny_checkpoint
) -> None:
    import ray

    _, root, _ = grid_search
    cpus = int(ray.cluster_resources()["CPU"])
    job = tiny_job(tiny_benchmark, tiny_checkpoint, num_actors=cpus + 1)
    with pytest.raises(LlavaCError, match="needs as many CPUs"):
        search_first_task(job, tiny_checkpoint, root, "too-many")
    assert not (root / "too-many").exists()


@pytest.mark.parametrize("sampler", ["random", "optuna"])
def test_random_and_optuna_samplers_draw_alpha_within_the_bounds(
    ray_cluster, grid_search, tiny_benchmark, tiny_checkpoint, sampler
) -> None:
    _, root, _ = grid_search
    job = tiny_job(
        tiny_benchmark, tiny_checkpoint, sampler=sampler, space=[0.1, 0.4], num_samples=3
    )
    result = search_first_task(job, tiny_checkpoint, root, sampler)
    alphas = [t["alpha"] for t in result.trials]
    assert len(alphas) == 3 and all(0.1 <= a <= 0.4 for a in alphas)
    assert len(set(alphas)) == 3
    assert (
        result.best_alpha
        == max(result.trials, key=lambda t: (t["objective"], -t["alpha"]))["alpha"]
    )


def test_a_general_floor_ranks_by_the_stage_start_probe(
    ray_cluster, tiny_benchmark, tiny_checkpoint, tiny_tuned_pair, tmp_path
) -> None:
    """The reference is θ̃_{t-1}'s probe score (= ModelMix at α = 0 on the same records); every
    trial is marked against floor × it, and the choice is `best_trial` under that threshold."""
    from llava_c_ray.search.objective import best_trial

    job = tiny_job(
        tiny_benchmark,
        tiny_checkpoint,
        compare_modelmix=True,
        general_floor=0.9,
        objective={"new": 1, "old": 1, "general": 0},
    )
    result = search_second_task(job, tiny_checkpoint, tiny_tuned_pair[0], tmp_path)
    saved = json.loads((tmp_path / "search" / "trials.json").read_text())
    at_zero = next(t for t in saved["trials"] if t["alpha"] == 0.0)
    assert saved["general_reference"] == pytest.approx(at_zero["modelmix"]["general"])
    assert saved["general_threshold"] == pytest.approx(0.9 * saved["general_reference"])
    for trial in saved["trials"]:
        assert trial["keeps_floor"] == (trial["general"] >= saved["general_threshold"] - 1e-9)
        assert trial["objective"] == pytest.approx((trial["new"] + trial["old"]) / 2)
    chosen = best_trial(saved["trials"], saved["general_threshold"])["alpha"]
    assert result.best_alpha == saved["best_alpha"] == chosen
