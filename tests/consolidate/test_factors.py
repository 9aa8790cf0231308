"""Cached factors: one SVD, any α; the low-rank candidate equals the dense SAC computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava_c_ray.consolidate import engine
from llava_c_ray.consolidate.factors import compute_factors, lowrank_deltas
from llava_c_ray.consolidate.lowrank import consolidated_spectrum, dense_factors, rebuild
from llava_c_ray.errors import LlavaCError


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(12, 9, generator=generator),
        "conv": torch.randn(6, 2, 3, generator=generator),
        "b": torch.randn(9, generator=generator),
        "frozen": torch.randn(4, 4, generator=generator),
    }
    deltas = {
        "w": torch.randn(12, 3, generator=generator) @ torch.randn(3, 9, generator=generator),
        "conv": torch.randn(6, 2, 3, generator=generator),
        "b": torch.randn(9, generator=generator),
    }
    tuned = {name: base[name] + deltas.get(name, 0) for name in base}
    for name, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    return tmp_path / "base", tmp_path / "tuned", {n: tuned[n] - base[n] for n in deltas}


@pytest.mark.parametrize("boundary", ["pad", "truncate"])
def test_candidate_equals_dense_sac_for_each_alpha(checkpoints, tmp_path, boundary) -> None:
    base, tuned, deltas = checkpoints
    names = compute_factors(base, tmp_path / "cache", tuned=tuned)
    assert sorted(names) == ["b", "conv", "w"]
    for alpha in (0.1, 0.2, 0.7):
        candidate = lowrank_deltas(tmp_path / "cache", alpha, boundary)
        assert sorted(candidate.lowrank) == ["conv", "w"]
        torch.testing.assert_close(candidate.dense["b"], alpha * deltas["b"].double())
        for name in ("w", "conv"):
            factors = dense_factors(deltas[name].double())
            sigma, _ = consolidated_spectrum(factors, alpha, boundary)
            left, right = candidate.lowrank[name]
            expected = rebuild(factors, sigma).reshape(left.shape[0], -1)
            torch.testing.assert_close(left @ right, expected, rtol=1e-5, atol=1e-6)


def test_another_alpha_needs_no_svd(checkpoints, tmp_path, monkeypatch) -> None:
    base, tuned, _ = checkpoints
    compute_factors(base, tmp_path / "cache", tuned=tuned)

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD recomputed")

    monkeypatch.setattr(engine, "dense_factors", no_svd)
    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    assert set(lowrank_deltas(tmp_path / "cache", 0.5).lowrank) == {"conv", "w"}


def test_missing_cache_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LlavaCError, match="no factor cache"):
        lowrank_deltas(tmp_path, 0.2)
