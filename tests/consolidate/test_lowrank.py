"""The low-rank SVD path equals the dense computation (SPEC.md §2.2)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llava_c_ray.consolidate.lowrank import (
    add_rebuilt,
    consolidated_spectrum,
    dense_factors,
    lowrank_factors,
    rebuild,
)
from llava_c_ray.consolidate.rules import RULES

shapes = st.tuples(
    st.integers(1, 24), st.integers(1, 24), st.integers(1, 8), st.integers(0, 10_000)
)


@settings(max_examples=60, deadline=None)
@given(shapes, st.floats(0, 1), st.sampled_from(["pad", "truncate"]))
def test_lowrank_equals_dense(shape, alpha, boundary) -> None:
    m, n, r, seed = shape
    gen = torch.Generator().manual_seed(seed)
    b, a = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
    low = lowrank_factors(b, a, 2.0)
    dense = dense_factors(2.0 * b.double() @ a.double())
    assert torch.allclose(rebuild(low, low.S), 2.0 * b.double() @ a.double(), atol=1e-8)
    s_low, k_low = consolidated_spectrum(low, alpha, boundary)
    s_dense, k_dense = consolidated_spectrum(dense, alpha, boundary)
    assert torch.allclose(rebuild(low, s_low), rebuild(dense, s_dense), atol=1e-6)


def test_conv_kernel_reshaped_and_restored() -> None:
    delta = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    factors = dense_factors(delta)
    assert factors.full_rank == 8
    assert torch.allclose(rebuild(factors, factors.S), delta)


def test_alpha_one_keeps_rank_one_delta() -> None:
    """A rank-1 Δ: σ = (s, 0, …); with α = 1 the window is 1 and σ̃_1 = σ_1 + σ_2 = σ_1."""
    b, a = torch.randn(6, 1), torch.randn(1, 5)
    factors = lowrank_factors(b, a, 1.0)
    tilde, k = consolidated_spectrum(factors, 1.0, "pad")
    assert k == 1
    assert torch.allclose(rebuild(factors, tilde), (b @ a).double(), atol=1e-8)


def test_scale_is_applied() -> None:
    b, a = torch.randn(5, 2), torch.randn(2, 4)
    assert (
        pytest.approx((3.0 * lowrank_factors(b, a, 1.0).S).tolist()) == lowrank_factors(b, a, 3.0).S
    )


@pytest.mark.parametrize("boundary", ["pad", "truncate"])
def test_consolidated_delta_lora_equals_dense(boundary) -> None:
    gen = torch.Generator().manual_seed(3)
    b, a = torch.randn(20, 4, generator=gen), torch.randn(4, 15, generator=gen)
    from_lora = RULES["sac"].change(0.3, boundary, lora=(b, a, 1.5))
    from_dense = RULES["sac"].change(0.3, boundary, delta=1.5 * b.double() @ a.double())
    torch.testing.assert_close(from_lora, from_dense, rtol=1e-5, atol=1e-8)
    assert torch.linalg.matrix_rank(from_lora) <= 4


def test_consolidated_delta_of_a_vector_is_modelmix() -> None:
    vector = torch.arange(5.0)
    torch.testing.assert_close(RULES["sac"].change(0.2, delta=vector), 0.2 * vector.double())
    with pytest.raises(ValueError, match="exactly one"):
        RULES["sac"].change(0.2)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_add_rebuilt_equals_the_float64_sum_in_the_weight_dtype(dtype, tolerance) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=gen).to(dtype)
    factors = lowrank_factors(
        torch.randn(48, 6, generator=gen), torch.randn(6, 40, generator=gen), 0.5
    )
    sigma = consolidated_spectrum(factors, 0.3, "pad")[0]
    expected = weight.double() + rebuild(factors, sigma)
    got = add_rebuilt(weight, factors, sigma)
    assert got.dtype == dtype and got.shape == weight.shape
    assert torch.allclose(
        got.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max()
    )
