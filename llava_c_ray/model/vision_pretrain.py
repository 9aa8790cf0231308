"""Contrastive image–caption pre-training of a LLaVA checkpoint's vision tower (CLIP's objective).

A real LLaVA starts from a CLIP that has learnt to see from hundreds of millions of captioned
images; the tiny built-in model's tower would otherwise only ever see the six general domains.
`pretrain_vision_tower` pairs the checkpoint's own vision tower with a small text tower, trains
both with the symmetric InfoNCE loss of CLIP (Radford et al., 2021, "Learning Transferable Visual
Models From Natural Language Supervision", eq. in Fig. 3) on the captioned scenes of
`data/synthetic/scenes.py`, and writes the checkpoint back with the trained tower. The text tower
is discarded, as LLaVA discards CLIP's.

Two departures from CLIP, both for a tiny world whose captions repeat: rows whose captions are
identical are all positives of each other (the target is uniform over them, so the loss never
pushes apart two drawings of one description), and the text embedding is the mean of the text
tower's last hidden states over the caption's tokens (CLIP pools at the end-of-text token; our
tokenizer's `</s>` id is 2, which transformers' CLIP treats as a legacy argmax-id pooling).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoProcessor, CLIPConfig, CLIPModel, LlavaForConditionalGeneration

from llava_c_ray.data.synthetic.scenes import GROUP, Scene, draw_scenes
from llava_c_ray.files import atomic_directory

RECORD = "vision_pretraining.json"
"""Written into the checkpoint: the recipe and the loss curve of its tower's pre-training."""


@dataclass(frozen=True)
class VisionRecipe:
    """Contrastive pre-training of the tiny tower: a few thousand drawn scenes, seconds per epoch."""

    groups: int = 1536
    """Scene groups drawn (`scenes.GROUP` scenes each, one property varied within a group)."""
    steps: int = 600
    batch_groups: int = 64
    lr: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.05
    text_hidden: int = 64
    text_layers: int = 2
    seed: int = 0


def contrastive_targets(captions: list[str]) -> torch.Tensor:
    """Row i's target distribution over the batch: uniform over the rows sharing its caption."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    codes = torch.tensor([ids[c] for c in captions])
    same = (codes[:, None] == codes[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross entropy over cosine similarities × scale, soft targets."""
    logits = scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    per_image = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    per_text = -(targets.T * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (per_image + per_text) / 2


def clip_around(llava: LlavaForConditionalGeneration, tokenizer, recipe: VisionRecipe):
    """A CLIPModel whose vision tower is (a copy of) the LLaVA's and whose text tower is small."""
    vision = llava.config.vision_config.to_dict()
    text = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": recipe.text_hidden,
        "intermediate_size": 2 * recipe.text_hidden,
        "num_hidden_layers": recipe.text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
    }
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
    clip.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    return clip


def encode(scenes: list[Scene], processor) -> tuple[torch.Tensor, dict, list[str]]:
    """Pixel values (the LLaVA processor's, as at training time), padded caption tokens, captions."""
    captions = [s.caption for s in scenes]
    pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")
    tokens = processor.tokenizer(captions, padding=True, padding_side="right", return_tensors="pt")
    return pixels["pixel_values"], tokens, captions


def text_embedding(clip: CLIPModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return clip.text_projection(pooled)


def image_embedding(clip: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    return clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)


def cosine_lr(step: int, recipe: VisionRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_clip(clip: CLIPModel, pixels, tokens, captions, recipe: VisionRecipe) -> list[float]:
    """Train both towers on batches of whole scene groups; returns the loss every 50 steps."""
    optimizer = torch.optim.AdamW(clip.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, recipe))
    generator = torch.Generator().manual_seed(recipe.seed)
    losses = []
    clip.train()
    for step in range(recipe.steps):
        chosen = torch.randperm(len(captions) // GROUP, generator=generator)[: recipe.batch_groups]
        rows = (chosen[:, None] * GROUP + torch.arange(GROUP)).flatten()
        targets = contrastive_targets([captions[i] for i in rows.tolist()])
        mask = tokens["attention_mask"][rows]
        width = int(mask.sum(1).max())  # right padding: the batch's longest caption
        loss = contrastive_loss(
            image_embedding(clip, pixels[rows]),
            text_embedding(clip, tokens["input_ids"][rows, :width], mask[:, :width]),
            clip.logit_scale.exp().clamp(max=100),
            targets,
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            losses.append(round(loss.item(), 4))
    return losses


def pretrain_vision_tower(model_dir: Path, out: Path, recipe: VisionRecipe | None = None) -> Path:
    """Copy the LLaVA checkpoint at `model_dir` to `out` with its vision tower pre-trained
    contrastively on drawn, captioned scenes (every other weight unchanged)."""
    recipe = recipe or VisionRecipe()
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(model_dir)
    clip = clip_around(llava, processor.tokenizer, recipe)
    pixels, tokens, captions = encode(draw_scenes(recipe.groups, recipe.seed), processor)
    losses = train_clip(clip, pixels, tokens, captions, recipe)
    llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    record = {
        "recipe": asdict(recipe),
        "distinct_captions": len(set(captions)),
        "loss_every_50_steps": losses,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with atomic_directory(Path(out)) as tmp:
        llava.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for extra in Path(model_dir).glob("*.json"):
            if not (tmp / extra.name).exists():
                (tmp / extra.name).write_bytes(extra.read_bytes())
        (tmp / RECORD).write_text(json.dumps(record, indent=2))
    return Path(out)
