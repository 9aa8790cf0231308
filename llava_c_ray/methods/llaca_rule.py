"""The LLaCA adaptive-EMA rule (METHODS.md § llaca) as pure torch functions: no Ray, no Trainer.

After every optimizer step, for every trainable tensor θ with its clipped, averaged gradient g:

    a = ‖θ_t − θ*‖₁,  b = ‖g_t‖₁,  c = ‖g_t − g_{t−1}‖₁,  rate = 2(1 + b) / (a·c)
    rate ← 0.01 on the first step, or if a·c == 0, or if rate ∉ (0, 1)
    θ* ← (1 − rate)·θ* + rate·θ_t,  then g_{t−1} ← g_t

Source: the authors' CoIN fork (github.com/JingyangQiao/CoIN), `CoIN/peft/tuners/lora.py`
`LoraModel.ema_update` (lines 635-653), called after `optimizer.step()` and before `zero_grad`
(`llava/train/transformers/trainer.py` line 1893). There θ* is created as a copy of θ on a tensor's
first step and, lacking g_{t−1}, the code falls into its `except` branch and blends θ* with itself at
0.01, so θ* = θ up to rounding; here the first step copies θ into θ* exactly. A zero a·c gives
rate = inf, which the (0, 1) test turns into the fallback, as in the authors' code.
Every list entry needs a gradient: which tensors enter is the caller's choice (the authors'
`except` also gives 0.01 to a tensor whose grad is None).

Under ZeRO-2/3 each rank holds fp32 fragments, so the rule is split: `partial_sums` on the local
fragments, one all_reduce(SUM) of that [n_tensors, 3] tensor by the caller, `rates` from the global
sums, `ema_update_` on the local fragments. `step` runs the three for the unsharded case.
"""

from __future__ import annotations

import torch

FALLBACK_RATE = 0.01


def partial_sums(
    thetas: list[torch.Tensor],
    stars: list[torch.Tensor],
    grads: list[torch.Tensor],
    prev_grads: list[torch.Tensor],
) -> torch.Tensor:
    """Local L1 sums (a, b, c) of each list entry's fragment, shape [n_tensors, 3], float64.

    Summing these over the fragments of a tensor gives its global a, b, c.
    """
    a = torch._foreach_norm(torch._foreach_sub(thetas, stars), 1)
    b = torch._foreach_norm(grads, 1)
    c = torch._foreach_norm(torch._foreach_sub(grads, prev_grads), 1)
    return torch.stack([torch.stack(a), torch.stack(b), torch.stack(c)], dim=1).double()


def rates(sums: torch.Tensor, first_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor EMA rates and the mask of tensors that took the 0.01 fallback, from GLOBAL sums."""
    a, b, c = sums.unbind(dim=1)
    # a·c = 0 gives inf (1 + b ≥ 1), which the (0, 1) test rejects and torch.where keeps out.
    adaptive = 2 * (1 + b) / (a * c)
    use_adaptive = (adaptive > 0) & (adaptive < 1)
    if first_step:
        use_adaptive = torch.zeros_like(use_adaptive)
    return torch.where(use_adaptive, adaptive, FALLBACK_RATE), ~use_adaptive


def ema_update_(stars: list[torch.Tensor], thetas: list[torch.Tensor], rates: torch.Tensor) -> None:
    """θ* ← (1 − rate)·θ* + rate·θ in place, one rate per list entry."""
    torch._foreach_lerp_(stars, thetas, list(rates.to(stars[0].dtype).unbind()))


def step(
    thetas: list[torch.Tensor],
    stars: list[torch.Tensor],
    grads: list[torch.Tensor],
    prev_grads: list[torch.Tensor],
    first_step: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One unsharded LLaCA step: updates `stars` and `prev_grads` in place, returns (rates, fallback).

    On the first step `stars` and `prev_grads` are only buffers shaped like `thetas`: they become
    copies of θ and g.
    """
    if first_step:
        torch._foreach_copy_(stars, thetas)
        step_rates, fallback = rates(torch.zeros(len(thetas), 3, dtype=torch.float64), True)
    else:
        step_rates, fallback = rates(partial_sums(thetas, stars, grads, prev_grads), False)
        ema_update_(stars, thetas, step_rates)
    torch._foreach_copy_(prev_grads, grads)
    return step_rates, fallback
