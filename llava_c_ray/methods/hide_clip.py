"""What HiDe routes on: CLIP embeddings of a question's image and of its user turn, and the task
anchors — their means over a stage's training rows, computed by a pool of Ray actors.

- image: CLIP's projected image embedding (`image_embeds`) [src Ghy0501/HiDe-LLaVA
  llava/model/multimodal_encoder/clip_encoder.py:51], of the very `pixel_values` the LLaVA
  processor makes for the model (the authors feed CLIP the LLaVA input too: their vision tower is
  that CLIP [src llava_arch.py:130, :156]); so the CLIP's image size must be the processor's.
- text: CLIP's text embedding (the final-layer state of the end-of-text token, `pooler_output`,
  not projected [src clip_encoder.py:122]) of the first user turn without the system line and the
  image placeholder, at most 77 tokens [src llava_arch.py:165-176]. It is cut from the prompt text
  (`routing_text`) both when the anchors are computed and at inference, where the routed model
  decodes it back from `input_ids` — one function, so both see the same text.
- anchors: exact means over the whole training split [choice: the authors keep a running mean per
  training batch, llava_arch.py:181-194]; rows without an image count for the text anchor only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llava_c_ray.config import ClusterConfig, TaskConfig
from llava_c_ray.data.records import IMAGE_TOKEN, Record, load_records
from llava_c_ray.data.template import prompt_text, with_instruction
from llava_c_ray.errors import LlavaCError
from llava_c_ray.model.tiny_clip import CLIP_TEXT_POSITIONS

ROWS_PER_CHUNK = 256
BATCH = 32


def routing_text(prompt: str) -> str:
    """The first user turn of a prompt, without the system line, the role tags and `<image>`."""
    turn = prompt.split("USER:", 1)[-1].split(" ASSISTANT", 1)[0]
    return turn.replace(IMAGE_TOKEN, "").strip()


def record_text(record: Record, instruction: str, template: str) -> str:
    """`routing_text` of the prompt a training record's first turn becomes."""
    question = with_instruction(record.question, instruction)
    return routing_text(prompt_text(question, template, image=record.image is not None))


class ClipFeatures(nn.Module):
    """A CLIP checkpoint (both towers, float32, frozen) and its tokenizer, loaded offline."""

    def __init__(self, clip_dir: Path):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        if not (Path(clip_dir) / "config.json").is_file():
            raise LlavaCError(
                "not a CLIP checkpoint directory (no config.json)",
                path=clip_dir,
                fix="point method.params.clip_path at a local CLIP checkpoint with both towers "
                "(e.g. a copy of openai/clip-vit-large-patch14-336), or leave it unset",
            )
        self.clip_dir = Path(clip_dir)
        self.clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
        self.clip.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(clip_dir)

    def text_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids (each ending with the end-of-text token, ≤ 77), mask, last index."""
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        rows = []
        for text in texts:
            ids = self.tokenizer(text)["input_ids"]
            if eos is not None and (not ids or ids[-1] != eos):
                ids = [*ids, eos]
            rows.append(
                ids[: CLIP_TEXT_POSITIONS - 1] + ids[-1:] if len(ids) > CLIP_TEXT_POSITIONS else ids
            )
        width = max(len(ids) for ids in rows)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows])
        return input_ids, mask, torch.tensor([len(ids) - 1 for ids in rows])

    @torch.no_grad()
    def text(self, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings (rows × d_text): the end-of-text token's final state."""
        device = self.clip.logit_scale.device
        input_ids, mask, last = self.text_ids(texts)
        hidden = self.clip.text_model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device)
        ).last_hidden_state
        return hidden[torch.arange(len(texts), device=device), last.to(device)]

    @torch.no_grad()
    def image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's projected image embeddings (rows × d_image) of LLaVA-processed images."""
        size = self.clip.config.vision_config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise LlavaCError(
                f"the CLIP's image size is {size}, the LLaVA processor makes "
                f"{tuple(pixel_values.shape[-2:])} images",
                path=self.clip_dir,
                fix="use a CLIP whose image size is the LLaVA processor's (LLaVA-1.5: "
                "clip-vit-large-patch14-336), or leave method.params.clip_path unset",
            )
        pooled = self.clip.vision_model(
            pixel_values=pixel_values.to(self.clip.logit_scale.device, torch.float32)
        ).pooler_output
        return self.clip.visual_projection(pooled)


@dataclass(frozen=True)
class AnchorRows:
    """Rows of a JSON split: their routing texts and image paths (None for text-only rows)."""

    texts: tuple[str, ...]
    images: tuple[str | None, ...]


@dataclass(frozen=True)
class AnchorShard:
    """One parquet shard of a prepared split (`llava-c data prepare`)."""

    directory: Path
    shard: str
    instruction: str
    template: str


class AnchorActor:
    """Holds the CLIP and the LLaVA image processor; sums the embeddings of chunks of rows."""

    def __init__(self, clip_dir: str, llava_dir: str):
        from transformers import AutoImageProcessor

        self.features = ClipFeatures(Path(clip_dir))
        self.image_processor = AutoImageProcessor.from_pretrained(llava_dir)

    def sums(self, chunk: AnchorRows | AnchorShard) -> dict[str, torch.Tensor]:
        """Σ image embeddings, their count, Σ text embeddings, their count (float64)."""
        from PIL import Image

        if isinstance(chunk, AnchorShard):
            chunk = shard_rows(chunk)
        out = {"image": torch.zeros(()), "images": 0, "text": torch.zeros(()), "texts": 0}
        for start in range(0, len(chunk.texts), BATCH):
            texts = list(chunk.texts[start : start + BATCH])
            out["text"] = out["text"] + self.features.text(texts).double().sum(0)
            out["texts"] += len(texts)
            paths = [p for p in chunk.images[start : start + BATCH] if p is not None]
            if paths:
                images = [
                    Image.open(io.BytesIO(p) if isinstance(p, bytes) else p).convert("RGB")
                    for p in paths
                ]
                pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
                out["image"] = out["image"] + self.features.image(pixels).double().sum(0)
                out["images"] += len(paths)
        return out


def shard_rows(shard: AnchorShard) -> AnchorRows:
    import pyarrow.parquet as pq

    from llava_c_ray.data.shards import row_record

    rows = pq.read_table(shard.directory / shard.shard).to_pylist()
    records = [(row_record(row), row["image_bytes"]) for row in rows]
    return AnchorRows(
        tuple(record_text(r, shard.instruction, shard.template) for r, _ in records),
        tuple(image for _, image in records),
    )


def anchor_chunks(task: TaskConfig, template: str) -> list[AnchorRows | AnchorShard]:
    """A task's training split cut into chunks for the actors."""
    from llava_c_ray.data.shards import read_manifest

    if Path(task.train).is_dir():
        shards = read_manifest(task.train)["shards"]
        return [AnchorShard(Path(task.train), s, task.instruction, template) for s in shards]
    records = load_records(task.train, task.image_folder)
    chunks = []
    for start in range(0, len(records), ROWS_PER_CHUNK):
        part = records[start : start + ROWS_PER_CHUNK]
        chunks.append(
            AnchorRows(
                tuple(record_text(r, task.instruction, template) for r in part),
                tuple(
                    str(Path(task.image_folder or ".") / r.image) if r.image else None for r in part
                ),
            )
        )
    return chunks


def compute_anchors(
    clip_dir: Path,
    llava_dir: Path,
    tasks: list[TaskConfig],
    template: str,
    *,
    num_actors: int = 2,
    cluster: ClusterConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a^img, a^txt): the mean CLIP image and text embeddings over the training rows of `tasks`
    (one stage's), each chunk of rows summed by one of `num_actors` Ray actors, each with a
    training worker's resources (`cluster`; the default: one CPU)."""
    import ray

    from llava_c_ray.ray_session import ensure_ray, worker_options

    chunks = [c for task in tasks for c in anchor_chunks(task, template)]
    ensure_ray()
    actor_class = ray.remote(**worker_options(cluster or ClusterConfig(cpus_per_worker=1)))(
        AnchorActor
    )
    actors = [
        actor_class.remote(str(clip_dir), str(llava_dir))
        for _ in range(max(1, min(num_actors, len(chunks))))
    ]
    refs = [actors[i % len(actors)].sums.remote(c) for i, c in enumerate(chunks)]
    parts = ray.get(refs)
    for actor in actors:
        ray.kill(actor)
    texts = sum(p["texts"] for p in parts)
    if not texts:
        raise LlavaCError(
            "no training rows to compute HiDe's anchors from",
            path=tasks[0].train if tasks else None,
            fix="give the stage's tasks training rows",
        )
    text = sum(p["text"] for p in parts) / texts
    images = sum(p["images"] for p in parts)
    # No image in the split: a zero image anchor (cosine 0 with every image) [choice].
    image = sum(p["image"] for p in parts) / images if images else None
    if image is None:
        from transformers import CLIPConfig

        image = torch.zeros(CLIPConfig.from_pretrained(clip_dir).projection_dim)
    return image.float(), text.float()
