"""Whole-checkpoint consolidation on a real tiny LLaVA checkpoint, through Ray tasks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llava_c_ray.consolidate import engine
from llava_c_ray.consolidate.engine import consolidate_checkpoint
from llava_c_ray.consolidate.lowrank import consolidated_spectrum, dense_factors, rebuild
from llava_c_ray.errors import LlavaCError
from llava_c_ray.model.safetensors_io import LazyCheckpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tuned_pair(tiny_tuned_pair: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_tuned_pair


def reference(base: Path, tuned: Path, alpha: float) -> dict[str, torch.Tensor]:
    """The in-memory computation: dense SVD per changed matrix, α·Δ for vectors."""
    b, t = LazyCheckpoint(base), LazyCheckpoint(tuned)
    out = {}
    for name in b.keys():
        w, w_t = b.get(name).double(), t.get(name).double()
        delta = w_t - w
        if torch.equal(w_t, w):
            out[name] = b.get(name)
        elif delta.dim() < 2:
            out[name] = (w + alpha * delta).to(b.get(name).dtype)
        else:
            factors = dense_factors(delta)
            sigma, _ = consolidated_spectrum(factors, alpha, "pad")
            out[name] = (w + rebuild(factors, sigma)).to(b.get(name).dtype)
    return out


def test_adapter_and_tuned_paths_equal_the_reference(
    ray_cluster, tiny_checkpoint, tuned_pair, tmp_path
) -> None:
    adapter, tuned = tuned_pair
    via_adapter = consolidate_checkpoint(
        tiny_checkpoint, tmp_path / "a", adapter=adapter, alpha=0.3, progress=False
    )
    via_tuned = consolidate_checkpoint(
        tiny_checkpoint, tmp_path / "t", tuned=tuned, alpha=0.3, progress=False
    )
    expected = reference(tiny_checkpoint, tuned, 0.3)
    base = LazyCheckpoint(tiny_checkpoint)
    for result in (via_adapter, via_tuned):
        got = LazyCheckpoint(result.out)
        assert sorted(got.keys()) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.allclose(got.get(name).double(), tensor.double(), atol=1e-5), name
    changed = {s["name"] for s in via_adapter.stats}
    untouched = [n for n in base.keys() if n not in changed]
    assert untouched and all(
        torch.equal(base.get(n), LazyCheckpoint(via_adapter.out).get(n)) for n in untouched
    )
    assert (via_adapter.out / "sac_stats.json").is_file()
    assert (via_adapter.out / "tokenizer.json").is_file()


def test_output_loads_with_from_pretrained(
    ray_cluster, tiny_checkpoint, tuned_pair, tmp_path
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = consolidate_checkpoint(
        tiny_checkpoint, tmp_path / "m", adapter=tuned_pair[0], progress=False
    ).out
    LlavaForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)


def test_modelmix_is_alpha_delta(ray_cluster, tiny_checkpoint, tuned_pair, tmp_path) -> None:
    out = consolidate_checkpoint(
        tiny_checkpoint,
        tmp_path / "mm",
        tuned=tuned_pair[1],
        method="modelmix",
        alpha=0.25,
        progress=False,
    ).out
    base, tuned, got = (
        LazyCheckpoint(tiny_checkpoint),
        LazyCheckpoint(tuned_pair[1]),
        LazyCheckpoint(out),
    )
    for name in base.keys():
        expected = base.get(name).double() + 0.25 * (
            tuned.get(name).double() - base.get(name).double()
        )
        assert torch.allclose(got.get(name).double(), expected, atol=1e-6), name


def test_factor_cache_reused_for_another_alpha(
    ray_cluster, tiny_checkpoint, tuned_pair, tmp_path, monkeypatch
) -> None:
    cache = tmp_path / "factors"
    consolidate_checkpoint(
        tiny_checkpoint,
        tmp_path / "c1",
        adapter=tuned_pair[0],
        alpha=0.2,
        factors_cache=cache,
        progress=False,
    )
    assert list(cache.glob("*.safetensors"))
    first = consolidate_checkpoint(
        tiny_checkpoint, tmp_path / "c2", adapter=tuned_pair[0], alpha=0.5, progress=False
    )
    cached = consolidate_checkpoint(
        tiny_checkpoint,
        tmp_path / "c3",
        adapter=tuned_pair[0],
        alpha=0.5,
        factors_cache=cache,
        progress=False,
    )
    a, b = LazyCheckpoint(first.out), LazyCheckpoint(cached.out)
    assert all(torch.allclose(a.get(n), b.get(n), atol=1e-6) for n in a.keys())


def test_bad_inputs_fail_before_writing(ray_cluster, tiny_checkpoint, tuned_pair, tmp_path) -> None:
    adapter, tuned = tuned_pair
    with pytest.raises(LlavaCError, match="alpha"):
        consolidate_checkpoint(tiny_checkpoint, tmp_path / "x", adapter=adapter, alpha=1.5)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("not ours")
    with pytest.raises(LlavaCError, match="exists"):
        consolidate_checkpoint(tiny_checkpoint, tmp_path / "exists", adapter=adapter)
    truncated = tmp_path / "truncated"
    shutil.copytree(tuned, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LlavaCError, match="truncated"):
        consolidate_checkpoint(tiny_checkpoint, tmp_path / "y", tuned=truncated)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mismatched_checkpoints_rejected(
    ray_cluster, tiny_checkpoint, tuned_pair, tmp_path
) -> None:
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tuned_pair[1], other)
    tensors = load_file(str(other / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LlavaCError, match="shape or dtype"):
        consolidate_checkpoint(tiny_checkpoint, tmp_path / "z", tuned=other)
    tensors[name] = torch.zeros(1)
    del tensors[name]
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LlavaCError, match="names differ"):
        consolidate_checkpoint(tiny_checkpoint, tmp_path / "z", tuned=other)


def test_interrupted_run_leaves_no_output(
    ray_cluster, tiny_checkpoint, tuned_pair, tmp_path, monkeypatch
) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(engine, "copy_side_files", crash)
    with pytest.raises(RuntimeError, match="killed"):
        consolidate_checkpoint(
            tiny_checkpoint, tmp_path / "out", adapter=tuned_pair[0], progress=False
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("min_groups", "max_bytes"), [(1, 1 << 30), (4, 1 << 30), (1, 3 * 64 * 64 * 4)]
)
def test_groups_cover_every_tensor_once_within_their_limits(
    tmp_path: Path, min_groups: int, max_bytes: int
) -> None:
    from safetensors.torch import save_file

    from llava_c_ray.consolidate.plan import Item

    tensors = {f"layers.{i}.weight": torch.zeros(64, 64) for i in range(8)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    items = [Item(name=name, kind="tuned") for name in tensors]
    groups = engine.group_items(items, LazyCheckpoint(tmp_path), max_bytes, min_groups)
    assert [item for group in groups for item in group] == items
    assert len(groups) >= min_groups
    assert all(len(group) * 64 * 64 * 4 <= max_bytes for group in groups)
