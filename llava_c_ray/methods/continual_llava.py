"""`continual_llava`: Continual LLaVA's increment pool on a frozen LVLM (Cao et al., "Continual LLaVA:
Continual Instruction Tuning in Large Vision-Language Models", arXiv 2411.02564, ICLR 2025
submission; METHODS.md § continual_llava).

What the public record gives. The paper's full text is not in the stored copies; the abstract
(arXiv 2411.02564 v2) and one public review of the ICLR submission (paperhub.cn/paper/rwmwFnmjAX)
give the method's shape; the numbers come from public code that derives from the authors'
(a LLaVA fork: `llava/model/language_model/llava_llama.py` [src derived llava_llama.py] and its
`retriever.py` [src derived retriever.py]; the authors' own repository holds only a README):

- the LVLM is frozen; per instruction, "dual increment embeddings" are low-rank weight increments
  [src paper abstract; review: "in Equation 5 the intrinsic and contextual embeddings are added
  as LoRA weights"];
- intrinsic increments: a low-rank pool of candidates, selected by their similarity with the user
  instruction [src paper abstract]. Pool of N = 8 slots per task × tasks
  [src derived llava_llama.py: `pool_size = 8*len(task_pool_index_range)`]; each slot one rank-8
  factor pair per decoder layer [src derived llava_llama.py `low_rank = 8`]; top-M = 4
  [`weight_topk = 4`]; the query cut into 4 groups of its dimension, cosine per group
  [`groups = 4`, `similarity_type = 'cosine'`]; keys orthogonally initialised per group, in blocks
  of key-dimension rows [src derived retriever.py `generate_orthogonal_matrix`]; the output
  factor of each slot zero, the input factor N(0, 1) [retriever.py: `low_rank_a` zeros,
  `low_rank_b` `nn.init.normal_`; ΔW = a^T·b is added to the weight, so `a` (r×out) is peft's B
  and `b` (r×in) peft's A], no α/r scale [retriever.py]. Selection weights = cosine / Σ cosine over
  the top-M [retriever.py `dis_weihgt / dis_weihgt.sum()`];
- the query: the first user turn [derived llava_llama.py `preprare_retreival_version = 'firstq'`]
  embedded by a frozen Sentence-BERT model, mean-pooled over its tokens
  [retriever.py: `sentence-transformers/nli-mpnet-base-v2`, earlier `nli-roberta-base-v2`];
- injection: ΔW added to the attention's output projection of every layer
  [src derived: the weight offset is added to the attention output `dense` weight
  (`self_output_forward`) in every layer; METHODS.md reports the paper's ablation finds the four
  projections unnecessary]. Here: `o_proj` of every decoder layer;
- training: keys learn with −mean cosine(query, selected keys), selection masked to the current
  task's slots during training, over the whole pool at inference with no task id
  [retriever.py `key_loss = -sim.mean()`; llava_llama.py `get_task_mask` in training,
  `disable_task_id = True` at inference];
- contextual increments: the increments chosen in earlier tasks, aggregated by a learnable
  weighted sum [src paper abstract]. The derived code has no contextual part; its form here
  follows METHODS.md: each earlier task's instance-averaged selection, stop-gradient, one
  learnable scalar per earlier task;
- two phases per task, keys (AdamW lr 1e-3, wd 0.01, 3 epochs) then increments with the LM loss,
  keys frozen (lr 2e-5, 1 epoch, cosine, warmup 0.03) [METHODS.md: derived code; these numbers
  are not in the stored copies found — unverified; phase 2's are the job's `training.*`].

Our choices [choice], each a named parameter or stated here:
- selection per row (the derived code averages the similarity over the batch and selects once
  per batch, which makes a row's increments depend on its batch-mates and the evaluator's batch
  size); cos ≤ 0 counts as 0 in the weights, uniform 1/M when no selected cosine is positive (the
  derived code divides by Σ cos + 1e-9, unstable when the sum is near 0 or negative);
- at inference the selection runs over the slots of the tasks trained so far (a later task's
  slots are untrained: zero output factor, initial key);
- contextual weights: per task t, λ_t ∈ R^{t-1} over the earlier tasks' memories m_s (the
  instance-averaged selection weights of task s over its training rows, computed after its key
  phase — the keys are frozen in phase 2, so the selection is that of training), initialised
  1/(t−1); at inference a row uses the λ of the task owning its most similar selected slot;
  ΔW_row = Σ_n (w_{row,n} + Σ_{s<t} λ_{t,s}·m_{s,n})·B_n·A_n;
- the key loss takes each group's own top-M as the derived code does; the phase runs as one Ray
  task with a training worker's resources (it needs only the sentence encoder and the keys, not
  the LVLM; on a cluster it runs where the training workers do, not beside the driver) before the
  stage's Ray Train run, which is phase 2; its result is
  `RUN_DIR/method/continual_llava_keys-NN.safetensors` (a rerun reuses it);
- the increments, keys and λ are float32 whatever the model's dtype; the projector stays frozen
  whatever `training.train_projector` says (the LVLM is frozen, src paper abstract);
- the built-in default encoder (`query_encoder: tiny`) is a 2-layer BERT built in code from
  `tiny_encoder_seed` over the start model's tokenizer, written once as a real checkpoint and
  loaded with `from_pretrained`; a job names a real one (a local Sentence-BERT directory).

How the query reaches the forward: a forward pre-hook on the LLaVA model decodes each row's
first user turn from `input_ids` with the checkpoint's own tokenizer (`first_user_turn`: after the
first `USER:`, the system line dropped, up to `ASSISTANT:`, `<image>` removed), embeds it one
text at a time (no dependence on batch padding) and calls the pool module, which sets the rows'
coefficients the wrapped `o_proj`s read. The Trainer, the evaluator's `generate` (first step; the
cached steps keep the prompt's selection) and the α-search actors go through the same hook, so the
same instruction selects the same slots. The pool and the increments are submodules called in
the forward (ZeRO-3 gathers them there).

Per layer the wrapped `o_proj` holds per task one A (S×r×in) and one B (S×out×r): only the
current task's pair (and its λ) trains, so earlier tasks' slots and keys never change, and a
slot with coefficient 0 gets a zero gradient. A stage's `model/` is the start checkpoint's HF
weights unchanged plus `continual_llava.safetensors` (keys G×N×d/G, λ T×T, memory T×N, per
wrapped layer `<name>.lora_A` N×r×in and `<name>.lora_B` N×out×r) and `continual_llava.json`
(shape, tasks trained, chosen slots per task, the encoder); `load_model` rebuilds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llava_c_ray.config import TaskConfig, TrainingConfig
from llava_c_ray.data.records import IMAGE_TOKEN, Record, read_records
from llava_c_ray.data.shards import read_shards
from llava_c_ray.data.template import prompt_segment, with_instruction
from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import load_hf_model
from llava_c_ray.files import write_json_atomic
from llava_c_ray.methods.base import (
    Method,
    Params,
    StageContext,
    TrainedStage,
    TrainingParts,
    register,
)
from llava_c_ray.methods.wrapping import unwrapped, wrap_linears
from llava_c_ray.ray_session import ensure_ray, worker_options
from llava_c_ray.train.hooks import ModelSetup

SIDECAR = "continual_llava.safetensors"
SIDECAR_CONFIG = "continual_llava.json"
ENCODER_DIR = "continual_llava_query_encoder"
KEYS_STATE = "continual_llava_keys"
STATE = "continual_llava"
TARGET = "o_proj"
POOL_MODULE = "continual_llava_pool"


class ContinualLLaVAParams(Params):
    slots_per_task: int = Field(default=8, gt=0)
    """S, pool slots added per task (N = S × tasks) [src derived llava_llama.py: 8]."""
    rank: int = Field(default=8, gt=0)
    """r of each slot's increment per layer [src derived llava_llama.py `low_rank = 8`]."""
    top_m: int = Field(default=4, gt=0)
    """M, slots selected per instruction [src derived llava_llama.py `weight_topk = 4`]."""
    key_groups: int = Field(default=4, gt=0)
    """G, groups of the query dimension compared separately [src derived `groups = 4`]."""
    query_encoder: str = "tiny"
    """A local sentence-encoder directory (HF AutoModel + tokenizer, e.g. nli-mpnet-base-v2 [src
    derived retriever.py]), or `tiny`: a 2-layer BERT built in code [choice]."""
    tiny_encoder_seed: int = 0
    """Seed of the built-in tiny encoder's weights [choice]."""
    increment_init_std: float = Field(default=1.0, gt=0)
    """Std of the input factors A at init; B = 0 [src derived retriever.py `normal_`]."""
    key_lr: float = Field(default=1e-3, gt=0)
    """Phase 1 (keys) AdamW lr [METHODS.md: derived code 1e-3, unverified]."""
    key_weight_decay: float = Field(default=0.01, ge=0)
    """Phase 1 AdamW weight decay [METHODS.md: derived code 0.01, unverified]."""
    key_epochs: int = Field(default=3, gt=0)
    """Phase 1 epochs over the task's instructions [METHODS.md: derived code 3, unverified]."""
    key_batch: int = Field(default=64, gt=0)
    """Phase 1 batch of instructions [choice]."""


@dataclass(frozen=True)
class PoolShape:
    tasks: int
    slots: int
    rank: int
    top_m: int
    groups: int
    query_dim: int

    @property
    def size(self) -> int:
        return self.tasks * self.slots

    def task_slots(self, task: int) -> slice:
        return slice(task * self.slots, (task + 1) * self.slots)


# ---------------------------------------------------------------- the math (pure functions)


def first_user_turn(text: str) -> str:
    """The instruction of a rendered conversation: its first user turn, after the first `USER:`
    (the system line before it dropped), up to `ASSISTANT:`, `<image>` removed, spaces collapsed."""
    head, tag, rest = text.partition("USER:")
    body = (rest if tag else head).split("ASSISTANT:", 1)[0]
    return " ".join(body.replace(IMAGE_TOKEN, " ").split())


def orthogonal_keys(shape: PoolShape, generator: torch.Generator) -> torch.Tensor:
    """G × N × d/G keys, each group's rows orthogonal in blocks of d/G rows (derived code's
    `generate_orthogonal_matrix`, which needs blocks once N exceeds d/G)."""
    width = shape.query_dim // shape.groups
    keys = torch.empty(shape.groups, shape.size, width)
    for group in keys:
        for start in range(0, shape.size, width):
            nn.init.orthogonal_(group[start : start + width], generator=generator)
    return keys


def group_cosine(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cos(q_g, k_{g,n}) per row, group and slot: (b, G, N) from queries (b, d), keys (G, N, d/G)."""
    q = F.normalize(queries.unflatten(-1, (keys.shape[0], -1)), dim=-1)  # b G c
    return torch.einsum("bgc,gnc->bgn", q, F.normalize(keys, dim=-1))


def select_slots(
    similarity: torch.Tensor, allowed: torch.Tensor, top_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of the top-M allowed slots per row of `similarity` (b, N): weights =
    max(cos, 0) / Σ max(cos, 0), uniform 1/M when no selected cosine is positive."""
    masked = similarity.masked_fill(~allowed, float("-inf"))
    values, indices = masked.topk(top_m, dim=-1)
    positive = values.clamp(min=0)
    total = positive.sum(-1, keepdim=True)
    uniform = torch.full_like(positive, 1.0 / top_m)
    weights = torch.where(total > 0, positive / total.clamp(min=1e-12), uniform)
    return indices, weights


def key_loss(similarity: torch.Tensor, top_m: int) -> torch.Tensor:
    """−mean cos over each (row, group)'s own top-M slots (derived retriever.py's `key_loss`);
    `similarity` (b, G, S) over the current task's slots."""
    selected = similarity.gather(-1, similarity.detach().topk(top_m, dim=-1).indices)
    return -selected.mean()


def train_keys(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    top_m: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch: int,
    seed: int,
) -> torch.Tensor:
    """Phase 1: the current task's keys (G, S, d/G) trained alone with `key_loss` on the task's
    query embeddings (n, d) by AdamW; returns the trained keys."""
    param = nn.Parameter(keys.detach().clone().float())
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(queries), generator=generator)
        for start in range(0, len(queries), batch):
            rows = queries[order[start : start + batch]]
            loss = key_loss(group_cosine(rows, param), top_m)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return param.detach()


# ---------------------------------------------------------------- the modules


class RowMix:
    """The coefficients (b, N) of the current forward's rows, shared by the wrapped layers."""

    coefficients: torch.Tensor | None = None


class PooledIncrementLinear(nn.Module):
    """A frozen nn.Linear plus the pool's increments: y = W·x + Σ_n c_{row,n}·B_n·A_n·x, with
    per task one A (S×r×in) and one B (S×out×r) so that a task's pair trains alone."""

    def __init__(self, base: nn.Linear, shape: PoolShape, mix: RowMix):
        super().__init__()
        self.base = base
        like = {"device": base.weight.device, "dtype": torch.float32}
        s, r = shape.slots, shape.rank
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.zeros(s, r, base.in_features, **like)) for _ in range(shape.tasks)
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(s, base.out_features, r, **like)) for _ in range(shape.tasks)
        )
        self.rank = r
        object.__setattr__(self, "mix", mix)  # shared state, not a submodule

    def increment(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (N×r×in) and B (N×out×r) of the whole pool."""
        return torch.cat(list(self.lora_A)), torch.cat(list(self.lora_B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        c = self.mix.coefficients
        if c is None:
            return out
        a, b = self.increment()
        # Σ_n c_n·B_n·A_n·x = [B_1 … B_N]·(c ⊗ 1_r ⊙ [A_1; …; A_N]·x): two matmuls for the pool.
        z = F.linear(x.to(a.dtype), a.flatten(0, 1)).unflatten(-1, (a.shape[0], self.rank))
        z = z * c.to(z.dtype).view(c.shape[0], *([1] * (z.dim() - 3)), c.shape[1], 1)
        delta = F.linear(z.flatten(-2), b.transpose(0, 1).flatten(1))
        return out + delta.to(out.dtype)


@dataclass
class Selection:
    indices: torch.Tensor
    """(b, M) slots selected per row."""
    weights: torch.Tensor
    """(b, M) their intrinsic weights."""
    owner: torch.Tensor
    """(b,) the task whose λ weighs the row's contextual increments."""


class IncrementPool(nn.Module):
    """Keys (per task G×S×d/G), contextual weights λ (per task, T), the memory of each finished
    task's instance-averaged selection (T×N, a buffer) and the selection itself."""

    def __init__(self, shape: PoolShape, mix: RowMix):
        super().__init__()
        self.shape = shape
        width = shape.query_dim // shape.groups
        self.keys = nn.ParameterList(
            nn.Parameter(torch.zeros(shape.groups, shape.slots, width)) for _ in range(shape.tasks)
        )
        self.context = nn.ParameterList(
            nn.Parameter(torch.zeros(shape.tasks)) for _ in range(shape.tasks)
        )
        # Not persistent: a restarted worker's checkpoint holds parameters only; the memory comes
        # from the stage's key state (it does not change in phase 2).
        self.register_buffer("memory", torch.zeros(shape.tasks, shape.size), persistent=False)
        self.current = 0
        """0-based task of the stage (training: selection over its slots only)."""
        self.trained = 0
        """Tasks trained so far (inference: selection over their slots)."""
        self.last: Selection | None = None
        object.__setattr__(self, "mix", mix)

    def all_keys(self) -> torch.Tensor:
        return torch.cat(list(self.keys), dim=1)

    def allowed(self, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(self.shape.size, dtype=torch.bool, device=device)
        if self.training:
            mask[self.shape.task_slots(self.current)] = True
        else:
            mask[: max(self.trained, 1) * self.shape.slots] = True
        return mask

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """The rows' coefficients (b, N): intrinsic top-M weights plus Σ_s λ_{t,s}·m_s."""
        keys = self.all_keys()
        queries = queries.to(keys.device, keys.dtype)
        similarity = group_cosine(queries, keys).mean(1)  # b N
        indices, weights = select_slots(similarity, self.allowed(keys.device), self.shape.top_m)
        intrinsic = torch.zeros_like(similarity).scatter(1, indices, weights)
        if self.training:
            owner = torch.full_like(indices[:, 0], self.current)
        else:
            owner = indices[:, 0] // self.shape.slots
        lam = torch.stack(list(self.context))[owner]  # b T
        earlier = torch.arange(self.shape.tasks, device=owner.device) < owner[:, None]
        contextual = (lam * earlier) @ self.memory.to(lam.dtype)
        self.last = Selection(indices.detach(), weights.detach(), owner)
        coefficients = intrinsic.detach() + contextual
        self.mix.coefficients = coefficients
        return coefficients


class QueryEncoder:
    """A frozen sentence encoder: mean of its last hidden states over the instruction's tokens,
    one text at a time (no dependence on the batch's padding); embeddings are cached by text."""

    def __init__(self, path: Path):
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        for text in texts:
            if text not in self.cache:
                batch = self.tokenizer(text, truncation=True, return_tensors="pt").to(device)
                hidden = self.model(**batch).last_hidden_state[0]
                mask = batch["attention_mask"][0].unsqueeze(-1).to(hidden.dtype)
                self.cache[text] = ((hidden * mask).sum(0) / mask.sum().clamp(min=1)).cpu()
                if len(self.cache) > 65536:
                    self.cache.pop(next(iter(self.cache)))
        return torch.stack([self.cache[text] for text in texts])


def is_decoding_step(ids: torch.Tensor | None, mask: torch.Tensor | None, kwargs: dict) -> bool:
    """A cached generation step: fewer new ids than the attention mask covers (transformers 5's
    generate does not always hand the cache to the model's forward as `past_key_values`)."""
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length():
        return True
    return ids is not None and mask is not None and ids.shape[1] < mask.shape[1]


class InstructionSelector:
    """Forward pre-hook on the LLaVA model: decode each row's first user turn from `input_ids`,
    embed it and let the pool set the rows' coefficients. A generation step with a filled cache
    keeps the prompt's coefficients."""

    def __init__(self, pool: IncrementPool, tokenizer: Any, encoder: QueryEncoder):
        self.pool, self.tokenizer, self.encoder = pool, tokenizer, encoder

    def instructions(self, ids: torch.Tensor, mask: torch.Tensor | None) -> list[str]:
        rows = list(ids) if mask is None else [r[m.bool()] for r, m in zip(ids, mask, strict=True)]
        return [
            first_user_turn(self.tokenizer.decode(row.tolist(), skip_special_tokens=True))
            for row in rows
        ]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if self.pool.mix.coefficients is not None and is_decoding_step(ids, mask, kwargs):
            return
        if ids is None:
            raise LlavaCError(
                "continual_llava selects its increments from the instruction's token ids, "
                "and this forward has none (inputs_embeds only)",
                fix="call the model with input_ids",
            )
        self.pool(self.encoder(self.instructions(ids, mask)))


# ---------------------------------------------------------------- building, saving, loading


def pooled_layers(model: nn.Module) -> dict[str, PooledIncrementLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PooledIncrementLinear)}


def target_names(model: nn.Module) -> list[str]:
    """Every decoder layer's attention output projection of the language model."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and ".language_model." in f".{name}."
        and name.rsplit(".", 1)[-1] == TARGET
    ]


def attach_pool(
    model: nn.Module, shape: PoolShape, tokenizer: Any, encoder: QueryEncoder
) -> IncrementPool:
    """Wrap every `o_proj` of `model`, add the pool module and the selecting pre-hook (all zero)."""
    mix = RowMix()
    wrap_linears(
        model,
        target_names(model),
        lambda base: PooledIncrementLinear(base, shape, mix),
        "continual_llava",
    )
    pool = IncrementPool(shape, mix).to(next(model.parameters()).device)
    model.add_module(POOL_MODULE, pool)
    model.register_forward_pre_hook(InstructionSelector(pool, tokenizer, encoder), with_kwargs=True)
    return pool


def pool_of(model: nn.Module) -> IncrementPool:
    return getattr(model, POOL_MODULE)


def reset_increments(model: nn.Module, std: float, generator: torch.Generator) -> None:
    """Derived code's init: every slot's A ~ N(0, std²), B = 0."""
    with torch.no_grad():
        for layer in pooled_layers(model).values():
            for a, b in zip(layer.lora_A, layer.lora_B, strict=True):
                a.copy_(torch.empty(a.shape).normal_(0.0, std, generator=generator))
                b.zero_()


def initial_context(shape: PoolShape) -> torch.Tensor:
    """λ_t = 1/(t−1) on each earlier task (uniform) [choice]; row t for (0-based) task t."""
    context = torch.zeros(shape.tasks, shape.tasks)
    for t in range(1, shape.tasks):
        context[t, :t] = 1.0 / t
    return context


def pool_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    pool = pool_of(model)
    tensors = {
        "keys": pool.all_keys(),
        "context": torch.stack(list(pool.context)),
        "memory": pool.memory,
    }
    for name, layer in pooled_layers(model).items():
        a, b = layer.increment()
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a, b
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def load_pool_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    pool = pool_of(model)
    shape = pool.shape
    targets: list[tuple[str, torch.Tensor]] = [
        ("keys", torch.cat(list(pool.keys), dim=1)),
        ("context", torch.stack(list(pool.context))),
    ]
    layers = pooled_layers(model)
    for name, layer in layers.items():
        targets += [
            (f"{name}.lora_A", layer.increment()[0]),
            (f"{name}.lora_B", layer.increment()[1]),
        ]
    for key, like in targets:
        saved = tensors.get(key)
        if saved is None or saved.shape != like.shape:
            raise LlavaCError(
                f"{SIDECAR}: {key} is missing or does not fit the pool "
                f"({None if saved is None else tuple(saved.shape)} vs {tuple(like.shape)})",
                path=source,
                fix="load the pool onto the base model and settings it was trained with",
            )
    with torch.no_grad():
        for t in range(shape.tasks):
            pool.keys[t].copy_(tensors["keys"][:, shape.task_slots(t)])
            pool.context[t].copy_(tensors["context"][t])
            for name, layer in layers.items():
                layer.lora_A[t].copy_(tensors[f"{name}.lora_A"][shape.task_slots(t)])
                layer.lora_B[t].copy_(tensors[f"{name}.lora_B"][shape.task_slots(t)])
        pool.memory.copy_(tensors["memory"])


@contextlib.contextmanager
def plain_model(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every wrapped `o_proj` swapped back for its frozen linear and the pool module
    removed (a standard HF model)."""
    layers = pooled_layers(model)
    pool = model._modules.pop(POOL_MODULE)
    try:
        with unwrapped(model, layers):
            yield model
    finally:
        model.add_module(POOL_MODULE, pool)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def saved_config(model_dir: Path) -> dict[str, Any]:
    config, sidecar = model_dir / SIDECAR_CONFIG, model_dir / SIDECAR
    if not (config.is_file() and sidecar.is_file()):
        raise LlavaCError(
            f"not a Continual LLaVA checkpoint (no {SIDECAR} and {SIDECAR_CONFIG} beside the weights)",
            path=model_dir,
            fix="load a stage model written by the `continual_llava` method",
        )
    return json.loads(config.read_text())


def encoder_path(model_dir: Path, config: dict[str, Any]) -> Path:
    path = Path(config["query_encoder"])
    return path if path.is_absolute() else model_dir / path


def attach_saved_pool(model: nn.Module, model_dir: Path) -> IncrementPool:
    """Wrap `model` as the stage in `model_dir` left it and load its pool."""
    from transformers import AutoTokenizer

    config = saved_config(model_dir)
    shape = PoolShape(**config["shape"])
    encoder = QueryEncoder(encoder_path(model_dir, config))
    pool = attach_pool(model, shape, AutoTokenizer.from_pretrained(model_dir), encoder)
    load_pool_tensors(model, load_file(str(model_dir / SIDECAR)), model_dir)
    pool.trained = pool.current = int(config["trained_tasks"])
    return pool


def load_continual_llava_model(model_dir: str, dtype: Any) -> nn.Module:
    """A stage's model: the HF checkpoint in `model_dir` with its increment pool (the
    evaluator's and the α-search actors' `ModelLoader`)."""
    model = load_hf_model(model_dir, dtype)
    attach_saved_pool(model, Path(model_dir))
    return model


class ContinualLLaVASetup(ModelSetup):
    """Phase 2 of task `task` (0-based): the frozen LVLM with the pool (carried from `carried`, or
    fresh from `training.seed`), the keys and memory of the stage's key phase (`key_state`), only
    this task's A, B (and λ) trained. Saved as the HF checkpoint plus the pool's sidecar."""

    def __init__(
        self,
        shape: PoolShape,
        task: int,
        key_state: Path,
        encoder: Path,
        bundle_encoder: bool,
        carried: Path | None,
        init_std: float,
        task_names: tuple[str, ...],
    ):
        self.shape, self.task, self.key_state = shape, task, key_state
        self.encoder, self.bundle_encoder = encoder, bundle_encoder
        self.carried, self.init_std, self.task_names = carried, init_std, task_names

    def __call__(self, model: nn.Module, training: TrainingConfig) -> nn.Module:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        pool = attach_pool(model, self.shape, tokenizer, QueryEncoder(self.encoder))
        if self.carried is None:
            reset_increments(model, self.init_std, torch.Generator().manual_seed(training.seed))
            with torch.no_grad():
                for t, row in enumerate(initial_context(self.shape)):
                    pool.context[t].copy_(row)
        else:
            load_pool_tensors(model, load_file(str(self.carried / SIDECAR)), self.carried)
        state = load_file(str(self.key_state))
        with torch.no_grad():
            pool.keys[self.task].copy_(state["keys"][:, self.shape.task_slots(self.task)])
            pool.memory.copy_(state["memory"])
        pool.current, pool.trained = self.task, self.task + 1
        model.requires_grad_(False)
        for layer in pooled_layers(model).values():
            layer.lora_A[self.task].requires_grad_(True)
            layer.lora_B[self.task].requires_grad_(True)
        pool.context[self.task].requires_grad_(self.task > 0)
        # Reentrant gradient checkpointing needs an input that requires grad to reach the pool.
        model.enable_input_require_grads()
        return model

    def save(self, model: nn.Module, final: Path) -> None:
        out = final / "model"
        with plain_model(model) as plain:
            plain.save_pretrained(out, max_shard_size="2GB")
        save_tensors_atomic(pool_tensors(model), out / SIDECAR)
        encoder_ref = ENCODER_DIR if self.bundle_encoder else str(self.encoder)
        if self.bundle_encoder:  # the built-in tiny encoder travels with the model
            shutil.copytree(self.encoder, out / ENCODER_DIR, dirs_exist_ok=True)
        chosen = json.loads(self.key_state.with_suffix(".json").read_text())
        earlier = (
            json.loads((self.carried / SIDECAR_CONFIG).read_text())["chosen"]
            if (self.carried is not None)
            else {}
        )
        write_json_atomic(
            out / SIDECAR_CONFIG,
            {
                "shape": asdict(self.shape),
                "trained_tasks": self.task + 1,
                "tasks": list(self.task_names),
                "query_encoder": encoder_ref,
                "chosen": {**earlier, **chosen},
            },
        )


# ---------------------------------------------------------------- the stage's steps


def task_instructions(tasks: list[TaskConfig], template: str, tokenizer: Any) -> list[str]:
    """The tasks' training instructions as the forward sees them: the first user turn rendered
    by the job's template, tokenised and decoded with the start model's tokenizer."""
    texts = []
    for task in tasks:
        path = Path(task.train)
        if path.is_dir():
            records = [record for record, _ in read_shards(path)]
        else:
            records = [Record.from_raw(raw) for raw in read_records(path)]
        for record in records:
            human = with_instruction(record.conversations[0].value, task.instruction)
            ids = tokenizer(prompt_segment(human, template, first=True))["input_ids"]
            texts.append(first_user_turn(tokenizer.decode(ids, skip_special_tokens=True)))
    return texts


def build_tiny_encoder(out: Path, tokenizer_source: Path, seed: int) -> Path:
    """A 2-layer BERT (hidden 64) over the start model's tokenizer, weights from `seed`, written
    as a real checkpoint (same seed, same weights)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)
    return out


def stage_encoder(ctx: StageContext, carried: Path | None) -> tuple[Path, bool]:
    """The stage's sentence encoder — the one the carried pool used, the job's, or the tiny one —
    and whether it is copied into every stage model (the tiny one)."""
    params: ContinualLLaVAParams = ctx.params
    if carried is not None:
        config = saved_config(carried)
        return encoder_path(carried, config), config["query_encoder"] == ENCODER_DIR
    if params.query_encoder == "tiny":
        built = build_tiny_encoder(
            ctx.state_dir / ENCODER_DIR, ctx.start_model, params.tiny_encoder_seed
        )
        return built, True
    path = Path(params.query_encoder).expanduser().absolute()
    if not (path / "config.json").is_file():
        raise LlavaCError(
            "method.params.query_encoder is not a local Hugging Face model directory",
            path=path,
            fix="download a sentence encoder (e.g. sentence-transformers/nli-mpnet-base-v2) and "
            "point method.params.query_encoder at it, or use `tiny`",
        )
    return path, False


@dataclass(frozen=True)
class KeyState:
    """Phase 1's result: the pool's keys (G×N×d/G) with the task's trained, the memory (T×N)
    with the task's row, and how often each of its slots is chosen over the task's rows."""

    keys: torch.Tensor
    memory: torch.Tensor
    chosen: dict[int, int]


def task_key_state(
    tasks: list[TaskConfig],
    template: str,
    tokenizer_dir: Path,
    encoder_dir: Path,
    shape: PoolShape,
    task: int,
    carried: Path | None,
    params: ContinualLLaVAParams,
    seed: int,
) -> KeyState:
    """Phase 1 of task `task` (0-based) over the stage's training instructions: its keys trained
    from the carried pool's (or the orthogonal init from `seed`), its memory row = the
    instance-averaged selection over its slots. `key_phase` runs it as a Ray task."""
    from transformers import AutoTokenizer

    if carried is None:
        keys = orthogonal_keys(shape, torch.Generator().manual_seed(seed))
        memory = torch.zeros(shape.tasks, shape.size)
    else:  # only the keys and memory of the sidecar, not its increments
        with safe_open(str(carried / SIDECAR), framework="pt") as saved:
            keys, memory = saved.get_tensor("keys"), saved.get_tensor("memory")
    instructions = task_instructions(tasks, template, AutoTokenizer.from_pretrained(tokenizer_dir))
    queries = QueryEncoder(encoder_dir)(instructions)
    slots = shape.task_slots(task)
    keys[:, slots] = train_keys(
        queries,
        keys[:, slots],
        top_m=shape.top_m,
        lr=params.key_lr,
        weight_decay=params.key_weight_decay,
        epochs=params.key_epochs,
        batch=params.key_batch,
        seed=seed,
    )
    allowed = torch.zeros(shape.size, dtype=torch.bool)
    allowed[slots] = True
    indices, weights = select_slots(group_cosine(queries, keys).mean(1), allowed, shape.top_m)
    memory[task] = torch.zeros(len(queries), shape.size).scatter(1, indices, weights).mean(0)
    chosen = Counter(indices.flatten().tolist())
    return KeyState(keys.contiguous(), memory.contiguous(), dict(sorted(chosen.items())))


def key_phase(ctx: StageContext, shape: PoolShape, encoder: Path, carried: Path | None) -> Path:
    """Phase 1 as one Ray task with a training worker's resources (`task_key_state`), its result
    in `RUN_DIR/method/continual_llava_keys-NN.safetensors` (+ `.json`, the chosen slots);
    reused when present. The encoder runs on the task's CPU, as in the training forward."""
    import ray

    out = ctx.state_file(KEYS_STATE)
    if out.is_file() and out.with_suffix(".json").is_file():
        return out
    ensure_ray()
    remote = ray.remote(**worker_options(ctx.job.cluster))(task_key_state)
    state: KeyState = ray.get(
        remote.remote(
            ctx.tasks(),
            ctx.job.model.template,
            ctx.start_model,
            encoder,
            shape,
            ctx.stage.index - 1,
            carried,
            ctx.params,
            ctx.job.training.seed,
        )
    )
    save_tensors_atomic({"keys": state.keys, "memory": state.memory}, out)
    chosen = {str(slot): count for slot, count in state.chosen.items()}
    write_json_atomic(out.with_suffix(".json"), dict.fromkeys(ctx.stage.tasks, chosen))
    return out


def continual_llava_training(ctx: StageContext) -> TrainingParts:
    from transformers import AutoConfig

    params: ContinualLLaVAParams = ctx.params
    t = ctx.job.training
    if t.full_finetune:
        raise LlavaCError(
            "continual_llava keeps the LVLM frozen and trains its increment pool",
            fix="set training.full_finetune=false",
        )
    if params.top_m > params.slots_per_task:
        raise LlavaCError(
            f"method.params.top_m = {params.top_m} exceeds method.params.slots_per_task = "
            f"{params.slots_per_task} (training selects among the task's own slots)",
            fix="lower method.params.top_m or raise method.params.slots_per_task",
        )
    carried = ctx.start_model if (ctx.start_model / SIDECAR).is_file() else None
    if carried is None and ctx.stage.index > 1:
        raise LlavaCError(
            f"stage {ctx.stage.index} starts from a model without a Continual LLaVA pool",
            path=ctx.start_model,
            fix="start from the previous continual_llava stage's model (rerun the job from its "
            "first stage)",
        )
    encoder_dir, bundle = stage_encoder(ctx, carried)
    dim = int(AutoConfig.from_pretrained(encoder_dir).hidden_size)  # the weights stay unloaded
    if dim % params.key_groups:
        raise LlavaCError(
            f"the query encoder's dimension {dim} does not split into "
            f"method.params.key_groups = {params.key_groups} groups",
            path=encoder_dir,
            fix="choose key_groups dividing the encoder's hidden size",
        )
    shape = PoolShape(
        tasks=len(ctx.stages),
        slots=params.slots_per_task,
        rank=params.rank,
        top_m=params.top_m,
        groups=params.key_groups,
        query_dim=dim,
    )
    if carried is not None and PoolShape(**saved_config(carried)["shape"]) != shape:
        raise LlavaCError(
            "the stage-start pool was built with other settings than this stage's",
            path=carried,
            fix="keep method.params and the task list the same in every stage",
        )
    key_state = key_phase(ctx, shape, encoder_dir, carried)
    return TrainingParts(
        setup=ContinualLLaVASetup(
            shape,
            ctx.stage.index - 1,
            key_state,
            encoder_dir,
            bundle,
            carried,
            params.increment_init_std,
            tuple(n for s in ctx.stages for n in s.tasks),
        )
    )


def keep_stage_state(ctx: StageContext, trained: TrainedStage) -> None:
    """The stage's pool (keys, λ, memory, increments) and chosen slots under `RUN_DIR/method/`."""
    out = ctx.state_file(STATE)
    shutil.copy2(trained.model / SIDECAR, out.with_name(f".{out.name}.tmp"))
    out.with_name(f".{out.name}.tmp").replace(out)
    write_json_atomic(out.with_suffix(".json"), saved_config(trained.model))


METHOD = register(
    Method(
        name="continual_llava",
        summary="frozen LVLM; a pool of low-rank o_proj increments selected per instruction "
        "by a sentence encoder (never merged)",
        adds="top-M pool increments by instruction similarity plus λ-weighted earlier tasks' "
        "choices; keys trained first, then increments",
        source="Cao et al., Continual LLaVA (arXiv 2411.02564)",
        params=ContinualLLaVAParams,
        training=continual_llava_training,
        consolidation="none",
        consolidable=False,
        after_training=keep_stage_state,
        load_model=load_continual_llava_model,
    )
)
