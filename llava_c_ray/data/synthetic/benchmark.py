"""Write the built-in benchmark: LLaVA-format JSON + PNG images for every task and split.

Layout of `OUT/benchmark.json` (all paths relative to OUT):

```
{"name": "llava-c-builtin", "seed": 0, "scale": "small", "image_folder": "images",
 "general":   [TASK, ...],   # six general domains, continual-pretraining order
 "continual": [TASK, ...],   # five continual fine-tuning tasks, in order
 "inquiry": {"path": "inquiry.json"},                      # unlabeled text-only inquiries (UIR)
 "general_probe": {"val": ..., "test": ..., "image_folder": "images", "scoring": "f1"}}
TASK = {"name", "train", "val", "test", "image_folder", "suffix", "scoring", "chance"}
(`suffix` is the task instruction, already part of every question.)
```

The five continual tasks are balanced: each answer of a task is equally frequent in every split, and
their `chance` is 1/#answers. A general task's `chance` is the score of always giving the most
frequent training answer (a majority baseline), measured with its own scorer. Same seed →
byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llava_c_ray.data.scoring import score
from llava_c_ray.data.synthetic import domains
from llava_c_ray.data.synthetic.domains import Domain, Sample
from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import atomic_directory


@dataclass(frozen=True)
class TaskSpec:
    name: str
    domain: Domain
    scoring: str
    instruction: str
    train_scale: int = 1  # × the scale's training size: reading words needs more examples
    answers: tuple[str, ...] = ()
    """The answers every split is balanced over (each equally often, so chance = 1/#answers);
    empty for open answers."""


GENERAL = (
    TaskSpec("text_qa", domains.text_qa, "f1", domains.WORD_SUFFIX),
    TaskSpec("captions", domains.captions, "f1", domains.CAPTION_PROMPT),
    TaskSpec("ocr", domains.ocr, "exact", domains.WORD_SUFFIX, train_scale=2),
    TaskSpec("scene_text", domains.scene_text, "exact", domains.WORD_SUFFIX, train_scale=2),
    TaskSpec("spatial", domains.spatial, "exact", domains.WORD_SUFFIX),
    TaskSpec("grounding", domains.grounding, "bbox", domains.GROUNDING_PROMPT),
)
LETTERS = tuple("ABCD")
CONTINUAL = (
    TaskSpec("icon_count", domains.icon_count, "choice", domains.LETTER_SUFFIX, answers=LETTERS),
    TaskSpec(
        "attributes",
        domains.attributes,
        "exact",
        domains.WORD_SUFFIX,
        answers=(*domains.OBJECT_SIZES, *domains.NEW_SHAPES),
    ),
    TaskSpec("count_math", domains.count_math, "exact", domains.WORD_SUFFIX, answers=tuple("0123")),
    TaskSpec(
        "bar_chart", domains.bar_chart, "choice", domains.LETTER_AT_END_SUFFIX, answers=LETTERS[:2]
    ),
    TaskSpec("line_plot", domains.line_plot, "choice", domains.LETTER_SUFFIX, answers=LETTERS),
)
PROBE_DOMAINS = (
    domains.text_qa,
    domains.captions,
    domains.ocr,
    domains.scene_text,
    domains.spatial,
)
SIZES = {
    "test": {"general": 16, "continual": 24, "val": 4, "test": 8, "probe": 2, "inquiry": 16},
    "small": {
        "general": 400,
        "continual": 1200,
        "val": 32,
        "test": 64,
        "probe": 20,
        "inquiry": 240,
    },
    "full": {
        "general": 2000,
        "continual": 1200,
        "val": 100,
        "test": 200,
        "probe": 60,
        "inquiry": 1000,
    },
}
SENTENCE_SHARE = 0.25  # share of general training samples asking for full-sentence answers


class Writer:
    """Writes records and PNGs under one root, keeping ids and (question, image) pairs unique."""

    def __init__(self, root: Path):
        self.root = root
        self.seen: set[str] = set()

    def key(self, sample: Sample) -> str:
        digest = hashlib.sha1(sample.question.encode())
        if sample.image is not None:
            digest.update(sample.image.tobytes())
        return digest.hexdigest()

    def fresh(self, draw_sample, rng: random.Random) -> Sample:
        """A sample not written before (up to 50 tries; tiny domains may repeat after that)."""
        for _ in range(50):
            sample = draw_sample(rng)
            if self.key(sample) not in self.seen:
                break
        self.seen.add(self.key(sample))
        return sample

    def record(self, record_id: str, sample: Sample, image_dir: str) -> dict:
        human = sample.question
        record: dict = {"id": record_id}
        if sample.image is not None:
            rel = f"{image_dir}/{record_id}.png"
            path = self.root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            sample.image.save(buf, format="PNG")
            path.write_bytes(buf.getvalue())
            record["image"] = rel
            human = f"<image>\n{human}"
        record["conversations"] = [
            {"from": "human", "value": human},
            {"from": "gpt", "value": sample.answer},
        ]
        return record

    def split(self, name: str, image_dir: str, samples: list[Sample]) -> str:
        records = [
            self.record(f"{image_dir}-{name}-{i:05d}", s, image_dir) for i, s in enumerate(samples)
        ]
        rel = f"{image_dir}/{name}.json"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_text(json.dumps(records, indent=1))
        return rel


BALANCE_TRIES = 10_000


def draw_answer(domain: Domain, rng: random.Random, answer: str) -> Sample:
    """A sample of `domain` whose answer is `answer` (rejection sampling)."""
    for _ in range(BALANCE_TRIES):
        sample = domain(rng, "word")
        if sample.answer == answer:
            return sample
    raise LlavaCError(f"{domain.__name__} drew no answer {answer!r} in {BALANCE_TRIES} tries")


def balanced_answers(rng: random.Random, n: int, answers: tuple[str, ...]) -> list[str]:
    """`n` answers, each of `answers` equally often (±1), in a random order."""
    targets = [answers[i % len(answers)] for i in range(n)]
    rng.shuffle(targets)
    return targets


def draw_many(
    writer: Writer,
    rng: random.Random,
    n: int,
    domain: Domain,
    sentence_share: float = 0.0,
    answers: tuple[str, ...] = (),
):
    """`n` fresh samples; with `answers`, each of them is the answer equally often."""
    if answers:
        return [
            writer.fresh(lambda r, a=a: draw_answer(domain, r, a), rng)
            for a in balanced_answers(rng, n, answers)
        ]

    def one(r: random.Random) -> Sample:
        style = "sentence" if r.random() < sentence_share else "word"
        return domain(r, style)

    return [writer.fresh(one, rng) for _ in range(n)]


def majority_baseline(train: list[Sample], test: list[Sample], rule: str) -> float:
    common = Counter(s.answer for s in train).most_common(1)[0][0]
    return 100.0 * sum(score(common, s.answer, rule) for s in test) / len(test)


def chance_level(spec: TaskSpec, train: list[Sample], test: list[Sample]) -> float:
    """1/#answers for a balanced task, else the majority-answer baseline."""
    if spec.answers:
        return 100.0 / len(spec.answers)
    return majority_baseline(train, test, spec.scoring)


def write_task(
    writer: Writer, spec: TaskSpec, rng: random.Random, sizes: dict, n_train: int
) -> dict:
    share = SENTENCE_SHARE if spec in GENERAL and spec.domain in PROBE_DOMAINS else 0.0
    # Held-out splits first, so the training split is the one that avoids their samples.
    test = draw_many(writer, rng, sizes["test"], spec.domain, answers=spec.answers)
    val = draw_many(writer, rng, sizes["val"], spec.domain, answers=spec.answers)
    train = draw_many(writer, rng, n_train, spec.domain, share, spec.answers)
    entry = {"name": spec.name, "image_folder": "images", "suffix": spec.instruction}
    for split, samples in (("train", train), ("val", val), ("test", test)):
        entry[split] = writer.split(split, spec.name, samples)
    entry["scoring"] = spec.scoring
    entry["chance"] = round(chance_level(spec, train, test), 2)
    return entry


def write_probe(writer: Writer, rng: random.Random, n: int) -> dict:
    """The general probe: full-sentence questions over the general domains (held out)."""
    probe = {"image_folder": "images", "scoring": "f1"}
    for split in ("test", "val"):
        samples = [
            writer.fresh(lambda r, d=d: d(r, "sentence"), rng)
            for d in PROBE_DOMAINS
            for _ in range(n)
        ]
        probe[split] = writer.split(split, "general_probe", samples)
    return probe


def write_inquiries(root: Path, rng: random.Random, n: int) -> dict:
    """Unlabeled, text-only inquiries for UIR: the questions of every domain, no image, no answer."""
    all_domains = [spec.domain for spec in (*GENERAL, *CONTINUAL)]
    records = []
    for i in range(n):
        sample = rng.choice(all_domains)(rng, rng.choice(("word", "sentence")))
        records.append(
            {
                "id": f"inquiry-{i:05d}",
                "conversations": [{"from": "human", "value": sample.question}],
            }
        )
    (root / "inquiry.json").write_text(json.dumps(records, indent=1))
    return {"path": "inquiry.json"}


def generate_benchmark(
    out: Path, *, seed: int = 0, scale: str = "small", overwrite: bool = False
) -> Path:
    """Generate the whole benchmark into `out` (written to a temporary sibling, renamed at the end)."""
    if scale not in SIZES:
        raise LlavaCError(f"unknown scale {scale!r}", fix=f"use one of: {', '.join(SIZES)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LlavaCError(
            "output directory exists and is not empty", path=out, fix="choose a new --out"
        )
    sizes = SIZES[scale]
    with atomic_directory(out, overwrite) as tmp:
        writer = Writer(tmp)
        index = {"name": "llava-c-builtin", "seed": seed, "scale": scale, "image_folder": "images"}
        for group, specs in (("general", GENERAL), ("continual", CONTINUAL)):
            index[group] = [
                write_task(
                    writer,
                    spec,
                    random.Random(f"{seed}-{spec.name}"),
                    sizes,
                    sizes[group] * spec.train_scale,
                )
                for spec in specs
            ]
        index["general_probe"] = write_probe(writer, random.Random(f"{seed}-probe"), sizes["probe"])
        index["inquiry"] = write_inquiries(tmp, random.Random(f"{seed}-inquiry"), sizes["inquiry"])
        (tmp / "benchmark.json").write_text(json.dumps(index, indent=2))
    return out


def benchmark_texts(root: Path) -> list[str]:
    """Every question and answer of a benchmark (to train the tiny model's tokenizer on)."""
    texts = []
    for path in sorted(root.rglob("*.json")):
        if path.name == "benchmark.json":
            continue
        for record in json.loads(path.read_text()):
            texts.extend(turn["value"] for turn in record["conversations"])
    return texts
