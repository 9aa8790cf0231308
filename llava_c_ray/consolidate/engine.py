"""Consolidate a whole checkpoint: tensor by tensor, spread over Ray tasks, into a new HF checkpoint.

W̃_t = W̃_{t-1} + U·diag(σ̃)·Vᵀ for every changed matrix (SAC), α·Δ for 1-D tensors and ModelMix,
unchanged tensors copied byte for byte. Changed tensors are consolidated in groups by Ray tasks that
read their inputs lazily and write their own output shards, so no tensor crosses the object store;
the driver streams the untouched tensors meanwhile and writes the index. Inputs are checked before
any output is written; the output is built in a temporary sibling directory (on storage every node
sees, like the inputs) and renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llava_c_ray.consolidate.lowrank import (
    Factors,
    add_rebuilt,
    dense_factors,
    lowrank_factors,
)
from llava_c_ray.consolidate.plan import Item, plan_adapter, plan_tuned
from llava_c_ray.consolidate.rules import RULES, get_rule
from llava_c_ray.consolidate.spectral import BOUNDARIES
from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import atomic_directory, refuse_overlap, refuse_replacing
from llava_c_ray.model.safetensors_io import INDEX_NAME, LazyCheckpoint, ShardWriter, dtype_bytes

GROUP_ELEMENTS = 1 << 25  # tensors go to Ray tasks in groups of about this many elements
SPECTRUM_KEEP = 32  # leading singular values kept in sac_stats.json for spectrum plots
STATS_NAME = "sac_stats.json"  # what was consolidated and how; also marks the output as ours


@dataclass(frozen=True)
class Request:
    """Everything a worker needs to consolidate its tensors (small and picklable)."""

    base: Path
    tuned: Path | None
    adapter: Path | None
    method: str
    alpha: float
    boundary: str
    factors_cache: Path | None


@dataclass
class ConsolidationResult:
    out: Path
    stats: list[dict[str, Any]]
    seconds: float


def check_request(request: Request, out: Path, overwrite: bool) -> None:
    if not get_rule(request.method, "method").consolidates:
        raise LlavaCError(
            f"rule {request.method!r} does not consolidate",
            fix=f"use one of: {', '.join(n for n, r in RULES.items() if r.consolidates)}",
        )
    if not 0 <= request.alpha <= 1:
        raise LlavaCError(
            f"alpha={request.alpha} is outside [0, 1]", fix="pass an α between 0 and 1"
        )
    if request.boundary not in BOUNDARIES:
        raise LlavaCError(
            f"unknown boundary {request.boundary!r}", fix=f"use one of: {', '.join(BOUNDARIES)}"
        )
    if (request.tuned is None) == (request.adapter is None):
        raise LlavaCError("give exactly one of a tuned checkpoint or an adapter")
    if not (request.base / "config.json").is_file():
        raise LlavaCError(
            "base checkpoint not found (no config.json)",
            path=request.base,
            fix="pass a Hugging Face checkpoint directory as --base",
        )
    refuse_overlap(
        out,
        [request.base, request.tuned, request.adapter],
        fix="choose an --out outside --base / --tuned / --adapter, and not above them",
    )
    refuse_replacing(out, overwrite, is_consolidated, "`llava-c consolidate` (no sac_stats.json)")


def is_consolidated(directory: Path) -> bool:
    """Whether `directory` is a checkpoint `consolidate_checkpoint` wrote (it holds the stats)."""
    try:
        stats = json.loads((directory / STATS_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(stats, dict) and {"method", "alpha", "tensors"} <= set(stats)


def plan(request: Request) -> list[Item]:
    base = LazyCheckpoint(request.base)
    if request.tuned is not None:
        return plan_tuned(base, LazyCheckpoint(request.tuned))
    return plan_adapter(base, request.adapter)[0]


def change_of(
    item: Item, base: torch.Tensor, tuned: LazyCheckpoint | None, adapter: LazyCheckpoint | None
):
    """The tensor's Δ as (dense Δ or None, LoRA (B, A, s) or None); (None, None) when unchanged."""
    if item.kind == "lora":
        return None, (adapter.get(item.lora_b), adapter.get(item.lora_a), item.scale)
    new = adapter.get(item.source_key) if item.kind == "replace" else tuned.get(item.name)
    if torch.equal(new, base):
        return None, None
    return new.double() - base.double(), None


def factors_for(item: Item, delta, lora, shape, cache: Path | None) -> Factors:
    """SVD factors of Δ, from the α-independent cache when present (SPEC.md §2.2, last note)."""
    cached = cache / f"{item.name}.safetensors" if cache else None
    if cached is not None and cached.is_file():
        from safetensors.torch import load_file

        t = load_file(str(cached))
        return Factors(t["U"], t["S"], t["Vh"], shape)
    factors = lowrank_factors(*lora, shape=shape) if lora is not None else dense_factors(delta)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {"U": factors.U.contiguous(), "S": factors.S, "Vh": factors.Vh.contiguous()},
            str(cached),
        )
    return factors


def consolidate_tensor(
    item: Item, base: torch.Tensor, delta, lora, request: Request
) -> tuple[torch.Tensor, dict | None]:
    """W̃ for one tensor and its stats (None for unchanged tensors)."""
    if delta is None and lora is None:
        return base, None
    shape = tuple(base.shape)
    rule = RULES[request.method]
    if rule.uses_factors(base.dim()):
        factors = factors_for(item, delta, lora, shape, request.factors_cache)
        sigma_tilde, k = rule.spectrum(factors, request.alpha, request.boundary)
        stats = spectrum_stats(item.name, rule.name, factors, sigma_tilde, k)
        return add_rebuilt(base, factors, sigma_tilde), stats
    if delta is None:
        b, a, s = lora
        delta = (
            s * b.double().reshape(b.shape[0], -1) @ a.double().reshape(a.shape[0], -1)
        ).reshape(shape)
    stats = {"name": item.name, "shape": shape, "rule": "α·Δ"}
    change = rule.dense_change(delta, request.alpha)
    return (base.float() + change.float()).to(base.dtype), stats


def spectrum_stats(
    name: str, rule: str, factors: Factors, sigma_tilde: torch.Tensor, k: int | None
) -> dict[str, Any]:
    s = factors.S
    sigma_1 = float(s[0]) if len(s) else 0.0
    energy = float((sigma_tilde**2).sum() / (s**2).sum()) if sigma_1 > 0 else 0.0
    return {
        "name": name,
        "shape": list(factors.shape),
        "rule": rule,
        "rank": int((s > s.max() * 1e-10).sum()) if sigma_1 > 0 else 0,
        "k": k,
        "sigma_1": sigma_1,
        "top_ratio": float(sigma_tilde[0] / s[0]) if sigma_1 > 0 else 0.0,
        "energy_kept": energy,
        "sigma": [float(v) for v in s[:SPECTRUM_KEEP]],
        "sigma_tilde": [float(v) for v in sigma_tilde[:SPECTRUM_KEEP]],
    }


def consolidate_group(
    request: Request, items: list[Item], part: Path
) -> tuple[list[str], int, list[dict]]:
    """Consolidate a group of tensors, read one at a time, into the shard file `part` (runs inside
    a Ray task, so no tensor crosses the object store); returns the names, their bytes, the stats."""
    base = LazyCheckpoint(request.base)
    tuned = LazyCheckpoint(request.tuned) if request.tuned else None
    adapter = (
        LazyCheckpoint(request.adapter, "adapter_model.safetensors") if request.adapter else None
    )
    tensors, stats = {}, []
    for item in items:
        weight = base.get(item.name)
        delta, lora = change_of(item, weight, tuned, adapter)
        tensor, stat = consolidate_tensor(item, weight, delta, lora, request)
        tensors[item.name] = tensor.contiguous()
        stats += [stat] if stat is not None else []
    save_file(tensors, str(part), metadata={"format": "pt"})
    return list(tensors), sum(t.numel() * t.element_size() for t in tensors.values()), stats


def group_items(
    items: list[Item], base: LazyCheckpoint, max_bytes: int, min_groups: int = 1
) -> list[list[Item]]:
    """Batches of tensors, each becoming one Ray task and one output shard: about GROUP_ELEMENTS
    elements (so Ray's per-task overhead stays small), at most `max_bytes` of output, and small
    enough that there are at least `min_groups` batches to spread over the workers."""
    metas = [base.meta(item.name) for item in items]
    counts = [int(torch.Size(shape).numel()) for shape, _ in metas]
    limit = min(GROUP_ELEMENTS, -(-sum(counts) // min_groups))
    groups, current, elements, size = [], [], 0, 0
    for item, count, (_, dtype) in zip(items, counts, metas, strict=True):
        nbytes = count * dtype_bytes(dtype)
        if current and (elements + count > limit or size + nbytes > max_bytes):
            groups.append(current)
            current, elements, size = [], 0, 0
        current.append(item)
        elements += count
        size += nbytes
    return groups + ([current] if current else [])


def consolidate_checkpoint(
    base: Path,
    out: Path,
    *,
    tuned: Path | None = None,
    adapter: Path | None = None,
    method: str = "sac",
    alpha: float = 0.2,
    boundary: str = "pad",
    num_cpus: int | None = None,
    overwrite: bool = False,
    factors_cache: Path | None = None,
    progress: bool = True,
    max_shard_bytes: int = 1 << 30,
) -> ConsolidationResult:
    """Consolidate `tuned` (or base + `adapter`) into `base` with SAC / ModelMix; write `out`."""
    request = Request(
        Path(base),
        tuned and Path(tuned),
        adapter and Path(adapter),
        method,
        alpha,
        boundary,
        factors_cache,
    )
    out = Path(out)
    check_request(request, out, overwrite)
    started = time.perf_counter()
    items = plan(request)
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        stats = write_consolidated(request, items, writer, num_cpus, progress)
        copy_side_files(request.base, tmp)
        (tmp / STATS_NAME).write_text(json.dumps(stats_summary(request, stats), indent=1))
    return ConsolidationResult(out, stats, time.perf_counter() - started)


def write_consolidated(
    request: Request, items: list[Item], writer: ShardWriter, num_cpus: int | None, progress: bool
) -> list[dict]:
    """Changed tensors go to Ray tasks that write their own shards into the output directory
    (which every node must see, like the inputs); meanwhile the driver streams the untouched base
    tensors across."""
    import ray
    from tqdm import tqdm

    from llava_c_ray.ray_session import ensure_ray

    ensure_ray()
    base = LazyCheckpoint(request.base)
    changed = {item.name for item in items}
    task = ray.remote(num_cpus=1, max_retries=3)(consolidate_group)
    window = num_cpus or max(1, int(ray.available_resources().get("CPU", 1)))
    groups = list(enumerate(group_items(items, base, writer.max_shard_bytes, 2 * window)))
    parts: dict[Any, Path] = {}
    stats: list[dict] = []
    # disable=None: drawn on a terminal only (a log file gets no bar redraws)
    bar = tqdm(
        total=len(base.keys()),
        desc="consolidate",
        unit="tensor",
        disable=None if progress else True,
    )

    def submit() -> None:
        while groups and len(parts) < window:
            index, group = groups.pop(0)
            part = writer.root / f"group-{index:05d}.safetensors"
            parts[task.remote(request, group, part)] = part

    submit()
    for name in base.keys():
        if name not in changed:
            writer.add(name, base.get(name))
            bar.update()
    while parts:
        (ref,), _ = ray.wait(list(parts), num_returns=1)
        names, size, group_stats = ray.get(ref)
        writer.adopt(parts.pop(ref), names, size)
        stats += group_stats
        bar.update(len(names))
        submit()
    writer.close()
    bar.close()
    return stats


def copy_side_files(base: Path, out: Path) -> None:
    """Config, tokenizer, processor and template files: everything of the base that is not weights."""
    for path in base.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX_NAME:
            shutil.copy2(path, out / path.name)


def stats_summary(request: Request, stats: list[dict]) -> dict[str, Any]:
    return {
        "method": request.method,
        "alpha": request.alpha,
        "boundary": request.boundary,
        "base": str(request.base),
        "source": str(request.tuned or request.adapter),
        "tensors": sorted(stats, key=lambda s: s["name"]),
    }
