"""α-independent SVD factors of every change, and the low-rank candidate delta for one α.

The SVD of Δ does not depend on α (SPEC.md §2.2, last note), so the α search computes the factors
once with `compute_factors` and builds each candidate with `lowrank_deltas`: per matrix the
consolidated change U·diag(σ̃)·Vh as the pair (U·diag(σ̃), Vh), applicable like a LoRA adapter,
and per 1-D tensor the dense ModelMix change α·Δ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_c_ray.consolidate.engine import Request, change_of, factors_for, plan
from llava_c_ray.consolidate.lowrank import Factors
from llava_c_ray.consolidate.rules import RULES
from llava_c_ray.consolidate.spectral import Boundary
from llava_c_ray.errors import LlavaCError
from llava_c_ray.model.safetensors_io import LazyCheckpoint

VECTORS_NAME = "vectors.safetensors"


@dataclass
class CandidateDelta:
    """W̃_t − W̃_{t-1} for one α: `lowrank[name] = (U·diag(σ̃), Vh)` (2-D, out × rest) and
    `dense[name]` for 1-D tensors. Matrix products are out × rest: reshape to the parameter."""

    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]


def compute_factors(
    base: Path, cache: Path, *, tuned: Path | None = None, adapter: Path | None = None
) -> list[str]:
    """Write (U, σ, Vh) of every changed matrix and Δ of every changed vector into `cache`.

    Returns the names of the changed tensors. The per-matrix files are the ones
    `consolidate_checkpoint(factors_cache=cache)` reads, so consolidating any α from this cache
    costs no SVD.
    """
    if (tuned is None) == (adapter is None):
        raise LlavaCError("give exactly one of a tuned checkpoint or an adapter", path=base)
    request = Request(Path(base), tuned, adapter, "sac", 0.0, "pad", Path(cache))
    base_ckpt = LazyCheckpoint(request.base)
    tuned_ckpt = LazyCheckpoint(tuned) if tuned else None
    adapter_ckpt = LazyCheckpoint(adapter, "adapter_model.safetensors") if adapter else None
    vectors, names = {}, []
    for item in plan(request):
        weight = base_ckpt.get(item.name)
        delta, lora = change_of(item, weight, tuned_ckpt, adapter_ckpt)
        if delta is None and lora is None:
            continue
        names.append(item.name)
        if weight.dim() < 2:
            vectors[item.name] = dense_vector(delta, lora, tuple(weight.shape))
        else:
            factors_for(item, delta, lora, tuple(weight.shape), request.factors_cache)
    request.factors_cache.mkdir(parents=True, exist_ok=True)
    save_file(vectors, str(request.factors_cache / VECTORS_NAME))
    return names


def dense_vector(delta, lora, shape: tuple[int, ...]) -> torch.Tensor:
    if delta is not None:
        return delta.contiguous()
    b, a, scale = lora
    return (scale * b.double() @ a.double()).reshape(shape).contiguous()


def load_factors(cache: Path) -> tuple[dict[str, Factors], dict[str, torch.Tensor]]:
    """The cached (U, σ, Vh) of every changed matrix and Δ of every changed vector."""
    cache = Path(cache)
    if not (cache / VECTORS_NAME).is_file():
        raise LlavaCError(
            "no factor cache here", path=cache, fix="run compute_factors into this directory first"
        )
    matrices = {}
    for path in sorted(cache.glob("*.safetensors")):
        if path.name == VECTORS_NAME:
            continue
        saved = load_file(str(path))
        shape = (saved["U"].shape[0], saved["Vh"].shape[1])
        matrices[path.name.removesuffix(".safetensors")] = Factors(
            saved["U"], saved["S"], saved["Vh"], shape
        )
    return matrices, load_file(str(cache / VECTORS_NAME))


def lowrank_deltas(
    cache: Path, alpha: float, boundary: Boundary = "pad", rule: str = "sac"
) -> CandidateDelta:
    """The change of every cached tensor for one α under `rule`, from cached factors only (no SVD)."""
    matrices, vectors = load_factors(cache)
    lowrank = {}
    for name, factors in matrices.items():
        sigma_tilde, _ = RULES[rule].spectrum(factors, alpha, boundary)
        lowrank[name] = (factors.U * sigma_tilde, factors.Vh)
    dense = {name: RULES[rule].dense_change(delta, alpha) for name, delta in vectors.items()}
    return CandidateDelta(lowrank, dense)
