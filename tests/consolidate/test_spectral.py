"""Property tests of the SAC spectrum rule (SPEC.md §2.2) against brute force and hand computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llava_c_ray.consolidate.spectral import modelmix, sac_spectrum, window_size

spectra = st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=24).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64)
)
alphas = st.floats(0, 1)
boundaries = st.sampled_from(["pad", "truncate"])


def brute_window(sigma: list[float], alpha: float, boundary: str) -> int:
    """k = argmin_k ((1/k)·Σ_{j=1}^{k+1} σ_j − α·σ_1)², written out term by term."""
    r = len(sigma)

    def at(j: int) -> float:  # 1-based σ_j with the boundary rule
        if j <= r:
            return sigma[j - 1]
        return sigma[-1] if boundary == "pad" else 0.0

    objective = [
        (sum(at(j) for j in range(1, k + 2)) / k - alpha * sigma[0]) ** 2 for k in range(1, r + 1)
    ]
    best = min(objective)
    return 1 + next(i for i, v in enumerate(objective) if v <= best + 1e-9 * (1 + best))


def brute_spectrum(sigma: list[float], k: int, boundary: str) -> list[float]:
    r = len(sigma)
    out = []
    for i in range(1, r + 1):
        terms = [
            sigma[j - 1] if j <= r else (sigma[-1] if boundary == "pad" else 0.0)
            for j in range(i, i + k + 1)
        ]
        out.append(sum(terms) / k)
    return out


@settings(max_examples=200, deadline=None)
@given(spectra, alphas, boundaries)
def test_window_minimises_the_objective(sigma, alpha, boundary) -> None:
    k = window_size(sigma, alpha, boundary)
    brute = brute_window(sigma.tolist(), alpha, boundary)
    assert 1 <= k <= len(sigma)
    # Ties may be broken differently only within float error: compare objective values.
    assert objective(sigma.tolist(), k, alpha, boundary) == pytest.approx(
        objective(sigma.tolist(), brute, alpha, boundary), abs=1e-9
    )


def objective(sigma: list[float], k: int, alpha: float, boundary: str) -> float:
    """σ̃_1 is the window mean (1/k)·Σ_{j=1}^{k+1} σ_j, so the objective is (σ̃_1 − α·σ_1)²."""
    return (brute_spectrum(sigma, k, boundary)[0] - alpha * sigma[0]) ** 2


@settings(max_examples=200, deadline=None)
@given(spectra, alphas, boundaries)
def test_spectrum_matches_written_formula_and_is_non_increasing(sigma, alpha, boundary) -> None:
    tilde, k = sac_spectrum(sigma, alpha, boundary)
    assert tilde.tolist() == pytest.approx(brute_spectrum(sigma.tolist(), k, boundary), abs=1e-9)
    assert all(a >= b - 1e-9 for a, b in zip(tilde.tolist(), tilde.tolist()[1:], strict=False))


@settings(max_examples=100, deadline=None)
@given(spectra, alphas)
def test_pad_and_truncate_agree_when_last_singular_value_is_zero(sigma, alpha) -> None:
    sigma = torch.cat([sigma, torch.zeros(1, dtype=sigma.dtype)])
    pad, k_pad = sac_spectrum(sigma, alpha, "pad")
    trunc, k_trunc = sac_spectrum(sigma, alpha, "truncate")
    assert k_pad == k_trunc
    assert torch.allclose(pad, trunc)


@settings(max_examples=100, deadline=None)
@given(spectra, alphas, boundaries)
def test_zero_singular_values_stay_zero(sigma, alpha, boundary) -> None:
    """The consolidated delta never has higher rank than Δ."""
    padded = torch.cat([sigma, torch.zeros(5, dtype=sigma.dtype)])
    tilde, _ = sac_spectrum(padded, alpha, boundary)
    assert torch.count_nonzero(tilde) <= torch.count_nonzero(padded)


def test_hand_computed_3x3() -> None:
    """σ = (6, 3, 0), α = 0.5, pad: objective(k) = ((1/k)·Σ_{j≤k+1} σ_j − 3)²."""
    sigma = torch.tensor([6.0, 3.0, 0.0], dtype=torch.float64)
    # k=1: (6+3)/1 = 9 → 36;  k=2: (6+3+0)/2 = 4.5 → 2.25;  k=3: (6+3+0+0)/3 = 3 → 0.
    assert window_size(sigma, 0.5, "pad") == 3
    tilde, k = sac_spectrum(sigma, 0.5, "pad")
    # σ̃_1 = (6+3+0+0)/3 = 3, σ̃_2 = (3+0+0+0)/3 = 1, σ̃_3 = 0.
    assert k == 3 and tilde.tolist() == pytest.approx([3.0, 1.0, 0.0])
    u, _, vh = torch.linalg.svd(torch.randn(3, 3, dtype=torch.float64))
    delta = u @ torch.diag(sigma) @ vh
    new = u @ torch.diag(tilde) @ vh
    assert torch.linalg.svdvals(new).tolist() == pytest.approx([3.0, 1.0, 0.0], abs=1e-9)
    assert torch.linalg.matrix_rank(new) <= torch.linalg.matrix_rank(delta)


def test_modelmix_is_alpha_delta() -> None:
    delta = torch.randn(4, 5)
    assert torch.equal(modelmix(delta, 0.3), 0.3 * delta)


def test_alpha_out_of_range_rejected() -> None:
    with pytest.raises(ValueError, match="alpha"):
        sac_spectrum(torch.ones(3), 1.5)
