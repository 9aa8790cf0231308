"""The LLaCA adaptive-EMA rule (METHODS.md § llaca): hand-computed cases, a reference loop, shards."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llava_c_ray.methods.llaca_rule import (
    FALLBACK_RATE,
    ema_update_,
    partial_sums,
    rates,
    step,
)

SHAPES = [(7,), (4, 5), (3, 2, 6), (64,), (2, 33)]


def sums_of(*triples: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(triples, dtype=torch.float64)


def random_state(seed: int, scale: float = 1.0) -> tuple[list[torch.Tensor], ...]:
    """θ_t, θ*, g_t, g_{t−1} for SHAPES; scale > 1 pushes the rates into the adaptive range."""
    gen = torch.Generator().manual_seed(seed)
    return tuple([scale * torch.randn(shape, generator=gen) for shape in SHAPES] for _ in range(4))


def reference_step(
    thetas: list[torch.Tensor],
    stars: list[torch.Tensor],
    grads: list[torch.Tensor],
    prev_grads: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[float], list[bool]]:
    """The rule typed out per tensor in plain Python, as in the authors' `ema_update`."""
    new_stars, used, fell_back = [], [], []
    for theta, star, g, g_prev in zip(thetas, stars, grads, prev_grads, strict=True):
        a = (theta - star).abs().sum().item()
        b = g.abs().sum().item()
        c = (g - g_prev).abs().sum().item()
        rate = 2 * (1 + b) / (a * c) if a * c != 0 else math.inf
        fell_back.append(not 0 < rate < 1)
        if fell_back[-1]:
            rate = 0.01
        new_stars.append((1 - rate) * star + rate * theta)
        used.append(rate)
    return new_stars, used, fell_back


def clone(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def test_rate_in_range_is_used() -> None:
    # a=4, b=1, c=5: rate = 2·2/20 = 0.2
    r, fallback = rates(sums_of((4.0, 1.0, 5.0)), first_step=False)
    assert r.tolist() == pytest.approx([0.2])
    assert fallback.tolist() == [False]


def test_hand_computed_partial_sums_and_update() -> None:
    theta, star = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])  # a = 4
    g, g_prev = torch.tensor([0.5, -0.5]), torch.tensor([3.0, -3.0])  # b = 1, c = 5
    assert partial_sums([theta], [star], [g], [g_prev]).tolist() == [[4.0, 1.0, 5.0]]
    stars, prev = [star.clone()], [g_prev.clone()]
    r, fallback = step([theta], stars, [g], prev, first_step=False)
    assert r.tolist() == pytest.approx([0.2]) and fallback.tolist() == [False]
    assert torch.allclose(stars[0], torch.tensor([0.8 * 1 + 0.2 * 3, 0.8 * 1 + 0.2 * -1]))
    assert torch.equal(prev[0], g)


@pytest.mark.parametrize(
    ("triple", "why"),
    [
        ((1.0, 1.0, 1.0), "rate = 4 ≥ 1"),
        ((2.0, 0.0, 1.0), "rate = 1 exactly, not < 1"),
        ((3.0, 2.0, 0.0), "c = 0"),
        ((0.0, 2.0, 3.0), "a = 0"),
        ((0.0, 0.0, 0.0), "a = c = 0"),
        ((1e200, 0.0, 1e200), "a·c overflows: rate = 0 exactly, not > 0"),
        ((math.inf, 1.0, 1.0), "rate = 0 from an infinite norm"),
        ((math.nan, 1.0, 1.0), "nan norm"),
    ],
)
def test_fallback_cases(triple: tuple[float, float, float], why: str) -> None:
    r, fallback = rates(sums_of(triple), first_step=False)
    assert r.tolist() == [0.01], why
    assert fallback.tolist() == [True], why


def test_fallback_update_is_one_percent() -> None:
    theta, star = torch.tensor([100.0]), torch.tensor([0.0])  # a = 100
    g, g_prev = torch.tensor([1.0]), torch.tensor([0.0])  # b = c = 1: rate = 2·2/100 = 0.04
    stars = [star.clone()]
    r, fallback = step([theta], stars, [g], [g_prev.clone()], first_step=False)
    assert r.tolist() == pytest.approx([0.04]) and not fallback.any()
    g_prev = g.clone()  # c = 0: fallback, θ* = 0.99·θ* + 0.01·θ
    before = stars[0].clone()
    r, fallback = step([theta], stars, [g], [g_prev], first_step=False)
    assert r.tolist() == [0.01] and fallback.all()
    assert torch.allclose(stars[0], 0.99 * before + 0.01 * theta)


def test_first_step_falls_back_even_in_range() -> None:
    r, fallback = rates(sums_of((4.0, 1.0, 5.0), (1.0, 1.0, 1.0)), first_step=True)
    assert r.tolist() == [FALLBACK_RATE] * 2
    assert fallback.tolist() == [True, True]


def test_first_step_makes_star_theta_and_keeps_grads() -> None:
    thetas, stars, grads, prev_grads = random_state(seed=1)
    r, fallback = step(thetas, stars, grads, prev_grads, first_step=True)
    assert r.tolist() == [FALLBACK_RATE] * len(SHAPES)
    assert fallback.all()
    for star, theta, prev, g in zip(stars, thetas, prev_grads, grads, strict=True):
        assert torch.equal(star, theta) and star.data_ptr() != theta.data_ptr()
        assert torch.equal(prev, g) and prev.data_ptr() != g.data_ptr()


@pytest.mark.parametrize(("seed", "scale"), [(0, 1.0), (1, 3.0), (2, 0.01), (3, 10.0)])
def test_step_matches_reference_loop(seed: int, scale: float) -> None:
    thetas, stars, grads, prev_grads = random_state(seed, scale)
    expected, expected_rates, expected_fallback = reference_step(thetas, stars, grads, prev_grads)
    r, fallback = step(thetas, stars, grads, prev_grads, first_step=False)
    assert r.tolist() == pytest.approx(expected_rates, rel=1e-6)
    assert fallback.tolist() == expected_fallback
    for star, want in zip(stars, expected, strict=True):
        assert torch.allclose(star, want, rtol=1e-6, atol=1e-7)


def test_reference_cases_cover_both_branches() -> None:
    assert not any(reference_step(*random_state(seed=1, scale=3.0))[2])
    assert all(reference_step(*random_state(seed=2, scale=0.01))[2])


def split_in_two(tensors: list[torch.Tensor], cuts: list[int]) -> list[list[torch.Tensor]]:
    """Flatten each tensor and cut it at `cuts`: the fragments two ZeRO ranks would hold."""
    pairs = [(t.flatten()[:cut], t.flatten()[cut:]) for t, cut in zip(tensors, cuts, strict=True)]
    return [[pair[k].clone() for pair in pairs] for k in range(2)]


def sharded_step(state: tuple[list[torch.Tensor], ...], global_sums: bool) -> list[torch.Tensor]:
    """Run the rule on two shards; with `global_sums` the partial sums are added like all_reduce."""
    gen = torch.Generator().manual_seed(7)
    cuts = [int(torch.randint(1, t.numel(), (1,), generator=gen)) for t in state[0]]
    thetas, stars, grads, prev_grads = (split_in_two(tensors, cuts) for tensors in state)
    shards = [(thetas[k], stars[k], grads[k], prev_grads[k]) for k in range(2)]
    local = [partial_sums(*shard) for shard in shards]
    for k, (shard_thetas, shard_stars, _, _) in enumerate(shards):
        sums = local[0] + local[1] if global_sums else local[k]
        ema_update_(shard_stars, shard_thetas, rates(sums, first_step=False)[0])
    return [
        torch.cat([first, second]).reshape(theta.shape)
        for first, second, theta in zip(stars[0], stars[1], state[0], strict=True)
    ]


def test_two_shards_with_summed_norms_equal_unsharded() -> None:
    state = random_state(seed=3, scale=3.0)
    unsharded = clone(state[1])
    _, fallback = step(state[0], unsharded, state[2], clone(state[3]), first_step=False)
    assert not fallback.any(), "the adaptive branch must be taken for the test to discriminate"
    sharded = sharded_step(state, global_sums=True)
    for got, want in zip(sharded, unsharded, strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_two_shards_with_local_norms_differ() -> None:
    state = random_state(seed=3, scale=3.0)
    unsharded = clone(state[1])
    step(state[0], unsharded, state[2], clone(state[3]), first_step=False)
    local = sharded_step(state, global_sums=False)
    assert not all(
        torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        for got, want in zip(local, unsharded, strict=True)
    )


def test_empty_fragment_contributes_zero() -> None:
    empty = [torch.empty(0)]
    assert partial_sums(empty, empty, empty, empty).tolist() == [[0.0, 0.0, 0.0]]


norms = st.floats(min_value=0.0, allow_infinity=True) | st.just(math.nan)


@given(st.lists(st.tuples(norms, norms, norms), min_size=1, max_size=20), st.booleans())
def test_rates_always_in_open_unit_interval(
    triples: list[tuple[float, float, float]], first_step: bool
) -> None:
    r, fallback = rates(sums_of(*triples), first_step)
    assert torch.isfinite(r).all()
    assert ((r > 0) & (r < 1)).all()
    assert (r[fallback] == FALLBACK_RATE).all()
