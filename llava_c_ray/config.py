"""The job config schema: one pydantic model per YAML section, checked on construction.

A job file is YAML; `load_job(path, overrides)` applies `key=value` overrides (`training.lr=1e-4`,
`tasks.0.name=iconqa`), validates everything and returns a `JobConfig`. Every mistake becomes one
`LlavaCError` that names the key and the fix. Relative data paths are resolved against the current
working directory (the repo root locally, the `--working-dir` under `ray job submit`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llava_c_ray.errors import LlavaCError

TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
RESULT_NEUTRAL = {"affects_results": False}
"""Marks a field that changes how a run logs, reads ahead or caches, never what it computes: a run
directory reopened with only such keys changed resumes under the new config."""
Scoring = Literal["exact", "choice", "bbox", "f1"]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated, and no
    float may be inf or nan (no key of the schema means "unbounded" by one)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    @field_validator("*", mode="after")
    @classmethod
    def _absolute_paths(cls, value: Any) -> Any:
        """Data paths are taken from the current directory and kept absolute: Ray workers run
        elsewhere."""
        return value.expanduser().absolute() if isinstance(value, Path) else value


class ModelConfig(Section):
    path: str = "tiny"
    """A local HF LLaVA checkpoint directory, or `tiny` for the built-in tiny model."""
    template: Literal["vicuna_v1", "plain"] = "vicuna_v1"
    """Conversation template used to tokenise training and evaluation prompts."""


class DataFile(Section):
    path: Path
    """A LLaVA-format JSON/JSONL file."""
    image_folder: Path | None = None
    """Folder that the records' `image` fields are relative to (None for text-only data)."""
    scoring: Scoring = "f1"
    """How answers in this file are scored (general probe only)."""


class ProbeConfig(DataFile):
    val: Path | None = None
    """Held-out validation part of the probe, used by the α search (never `path`, the test part)."""


class TaskConfig(Section):
    name: str = Field(pattern=TASK_NAME_PATTERN)
    """Short unique task name; used in stage directory names."""
    train: Path
    """Training split: LLaVA JSON/JSONL, or a directory written by `llava-c data prepare`."""
    val: Path | None = None
    """Validation split, used by the α search (never the test split)."""
    test: Path
    """Test split, evaluated after every stage."""
    image_folder: Path | None = None
    """Folder the records' `image` fields are relative to."""
    instruction: str = ""
    """Task-specific instruction suffix, e.g. "Answer the question using a single word or phrase."."""
    scoring: Scoring = "exact"
    """Scoring rule of SPEC.md §3: exact | choice | bbox | f1."""
    chance: float | None = Field(default=None, ge=0, le=100)
    """Chance-level score of the task (for reports), if known."""


class BenchmarkConfig(Section):
    path: Path
    """A built-in benchmark directory (holding benchmark.json), as written by `llava-c data synth`."""
    setting: Literal["continual", "general"] = "continual"
    """Which task list of the benchmark to run: the five new tasks, or the six general domains."""
    tasks: list[str] | None = None
    """Run only these tasks of the setting, in this order (None = all, in the benchmark's order)."""


class UIRConfig(Section):
    weight: float = Field(default=1.0, ge=0)
    """λ in L = L_llava + λ·L_uir (SPEC.md §2.1); 0 turns UIR off."""
    rows_per_step: int = Field(default=1, ge=1)
    """Packed inquiry rows appended to every micro-batch."""
    inquiries_per_row: int = Field(default=8, ge=1)
    """At most this many inquiries are packed into one row; a row never grows past the longest
    training row of its micro-batch, so the inquiries do not lengthen the padded batch."""


class DataConfig(Section):
    max_image_pixels: int | None = Field(default=None, gt=0)
    """Largest image (width × height) a record may carry; larger ones are invalid records.
    None = the data layer's limit (`data/validate.py` MAX_IMAGE_PIXELS, 50 MP)."""
    on_error: Literal["strict", "skip"] = "strict"
    """Invalid training records: `strict` stops before the first stage, naming them; `skip`
    trains on the rest and writes the skipped ids to RUN_DIR/skipped/<task>.json."""


class MethodConfig(Section):
    name: str = "llava_c"
    """A registered method (`llava-c methods` lists them)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The method's own parameters (`llava-c methods` lists them with their defaults); checked
    by the method when the job is loaded."""


class TrainingConfig(Section):
    full_finetune: bool = False
    """Train all language-model weights instead of LoRA (used to pre-train the tiny base model)."""
    train_vision_tower: bool = False
    """With `full_finetune`, train the vision tower too (LLaVA-1.5 keeps its CLIP frozen)."""
    lora_r: int = Field(default=128, gt=0)
    """LoRA rank r."""
    lora_alpha: float = Field(default=256.0, gt=0)
    """LoRA alpha (scale = lora_alpha / r)."""
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the LoRA path."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Language-model modules that get LoRA adapters."""
    train_projector: bool = True
    """Train the multimodal projector in full."""
    lr: float = Field(default=2e-5, gt=0)
    """Peak learning rate of the LoRA (or full) weights."""
    projector_lr: float | None = Field(default=None, gt=0)
    """Learning rate of the projector (defaults to `lr`)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    """Fraction of optimizer steps spent warming up."""
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the task's training split."""
    max_steps: int | None = Field(default=None, gt=0)
    """Stop after this many optimizer steps (overrides `epochs`)."""
    per_device_batch: int = Field(default=16, gt=0)
    """Micro-batch size per worker."""
    global_batch: int = Field(default=128, gt=0)
    """Samples per optimizer step = per_device_batch × workers × gradient accumulation."""
    max_length: int = Field(default=2048, gt=0)
    """Token length cap per training row."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto` = bf16 on GPUs, fp32 on CPUs."""
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO (GPUs only)."""
    zero_stage: Literal[2, 3] = 3
    """DeepSpeed ZeRO stage when strategy is deepspeed."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Global gradient-norm clip."""
    seed: int = 0
    """Seed of data order, LoRA init and dropout."""
    log_every: int = Field(default=10, gt=0, json_schema_extra=RESULT_NEUTRAL)
    """Log the loss terms, learning rate and tokens/s (console, TensorBoard) every N optimizer
    steps, averaged over them."""
    checkpoint_every: int = Field(default=50, gt=0)
    """Report a Ray Train checkpoint every N optimizer steps."""
    max_failures: int = Field(default=2, ge=0)
    """Worker-group restarts allowed per stage (resuming from the last checkpoint)."""
    prefetch_batches: int = Field(default=2, ge=0, json_schema_extra=RESULT_NEUTRAL)
    """Micro-batches read and encoded ahead of each training worker's step."""
    shuffle_buffer: int = Field(default=256, gt=0)
    """Rows of the worker's data shard shuffled together (reseeded every epoch)."""
    encode_cache_mb: int = Field(default=1024, ge=0, json_schema_extra=RESULT_NEUTRAL)
    """Memory per worker for encoded rows (pixel values, token ids) reused in later epochs; rows
    past it are encoded again every epoch. 0 turns the cache off."""
    group_by_length: bool = False
    """Put rows of like modality and length in the same micro-batch (within each shuffle window)
    so that less of it is padding, as LLaVA's `group_by_modality_length` does. Off by default:
    such micro-batches hold mostly one kind of question, and the built-in base trained with them
    learnt spatial relations and grounding far worse (28 / 45 instead of 72 / 98) for 18 % less
    time per step."""

    @property
    def effective_projector_lr(self) -> float:
        return self.projector_lr if self.projector_lr is not None else self.lr


class ConsolidationConfig(Section):
    method: str | None = None
    """Consolidation rule after each stage (sac | modelmix | none, from the rule registry);
    None takes the method's own."""
    alpha: float = Field(default=0.2, ge=0, le=1)
    """Consolidation strength α of SAC / ModelMix (SPEC.md §2.2)."""
    boundary: Literal["pad", "truncate"] = "pad"
    """Sliding-window boundary: pad with σ_R (paper eq. 6) or truncate at R (Algorithm 1)."""


class ObjectiveWeights(Section):
    new: float = Field(default=1.0, ge=0)
    """Weight of the new task's validation score."""
    old: float = Field(default=1.0, ge=0)
    """Weight of the mean validation score of the previous tasks."""
    general: float = Field(default=1.0, ge=0)
    """Weight of the general-probe validation score."""

    @model_validator(mode="after")
    def _not_all_zero(self) -> ObjectiveWeights:
        if self.new == self.old == self.general == 0:
            raise ValueError("all objective weights are 0; give at least one a positive weight")
        return self


class SearchConfig(Section):
    enabled: bool = False
    """Search α with Ray Tune after every stage."""
    space: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2, 0.35, 0.5])
    """Candidate α values (grid), or [low, high] bounds for the random / optuna samplers."""
    sampler: Literal["grid", "random", "optuna"] = "grid"
    """How candidates are drawn."""
    num_samples: int = Field(default=8, gt=0)
    """Trials for the random / optuna samplers."""
    subset_size: int = Field(default=64, gt=0)
    """Validation records per task used to score a candidate."""
    num_actors: int = Field(default=2, gt=0)
    """Quick evaluation actors scoring candidates in parallel."""
    asha: bool = False
    """Early-stop weak candidates with ASHA over growing subset sizes."""
    objective: ObjectiveWeights = Field(default_factory=ObjectiveWeights)
    """Weights of new-task, old-task and general scores in the objective."""
    general_floor: float | None = Field(default=None, ge=0, le=1)
    """Keep the general probe at ≥ this fraction of the stage-start model's probe score (same
    validation records): candidates below it rank after every candidate that keeps it, and among
    themselves by probe score. None: the objective alone decides."""
    compare_modelmix: bool = False
    """Also score ModelMix at every α, for the α plot (the choice stays with the job's method)."""
    seed: int = 0
    """Seed of the random / optuna samplers."""

    @model_validator(mode="after")
    def _bounds_for_samplers(self) -> SearchConfig:
        if self.sampler != "grid" and (len(self.space) != 2 or self.space[0] >= self.space[1]):
            raise ValueError(
                f"sampler={self.sampler} draws α from [low, high]: give search.space as two "
                f"increasing values, e.g. [0.05, 0.5] (got {self.space})"
            )
        return self

    @field_validator("space")
    @classmethod
    def _space_in_range(cls, space: list[float]) -> list[float]:
        if not space:
            raise ValueError("the search space is empty; list at least one α in [0, 1]")
        bad = [a for a in space if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"α values {bad} are outside [0, 1]")
        return space


class EvalConfig(Section):
    batch_size: int = Field(default=16, gt=0)
    """Prompts per generation batch."""
    max_new_tokens: int = Field(default=32, gt=0)
    """Greedy generation length cap."""
    evaluate_unseen: bool = True
    """Evaluate tasks not trained yet too (zero-shot and forward transfer become visible)."""
    max_samples: int | None = Field(default=None, gt=0)
    """Cap on test records per task (None = all)."""
    num_actors: int = Field(default=1, gt=0)
    """Evaluation actors (each loads the model once)."""
    lmms_tasks: list[str] = Field(default_factory=list)
    """lmms-eval tasks (or groups, tags) run on every stage's model beside the built-in
    evaluation, their scores in results.json (needs the `eval` extra; docs/lmms-eval.md)."""
    lmms_include_path: list[Path] = Field(default_factory=list)
    """Task directories for lmms-eval beside its own (`llava-c eval tasks JOB --out DIR`)."""
    lmms_limit: int | None = Field(default=None, gt=0)
    """Cap on documents per lmms-eval task (None = all)."""

    @field_validator("lmms_include_path", mode="after")
    @classmethod
    def _absolute_include_path(cls, value: list[Path]) -> list[Path]:
        return [path.expanduser().absolute() for path in value]


class ClusterConfig(Section):
    num_workers: int = Field(default=2, gt=0)
    """Ray Train workers per stage."""
    use_gpu: bool = False
    """One GPU per training worker."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs reserved per training worker."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra custom Ray resources per worker (e.g. an accelerator type)."""


class StorageConfig(Section):
    path: str = "runs"
    """Where run directories go: a local path, NFS mount, or s3:// / gs:// URI."""
    local_cache: Path = Field(
        default=Path("runs-cache"), validate_default=True, json_schema_extra=RESULT_NEUTRAL
    )
    """With a URI `path`: the local working copy of the run directory, mirrored to the URI after
    every step (and fetched from it to resume on a new machine)."""


class JobConfig(Section):
    name: str = "job"
    """Job name; the default run directory is `<storage.path>/<name>`."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    benchmark: BenchmarkConfig | None = None
    """Take tasks, inquiry set and general probe from a built-in benchmark directory."""
    tasks: list[TaskConfig] = Field(default_factory=list)
    inquiry: DataFile | None = None
    """Unlabeled text-only inquiries for UIR."""
    general_probe: ProbeConfig | None = None
    """Held-out general-ability probe evaluated at every stage."""
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    uir: UIRConfig = Field(default_factory=UIRConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    consolidation: ConsolidationConfig = Field(default_factory=ConsolidationConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not re.fullmatch(TASK_NAME_PATTERN, name):
            raise ValueError(
                "use letters, digits, '_', '-' and '.' only (it names the run directory)"
            )
        return name

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if not self.tasks:
            raise ValueError("no tasks: list `tasks` or point `benchmark.path` at a benchmark")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {dup}")
        t, c = self.training, self.cluster
        per_step = t.per_device_batch * c.num_workers
        if t.global_batch % per_step:
            raise ValueError(
                f"training.global_batch={t.global_batch} is not divisible by per_device_batch × "
                f"cluster.num_workers = {t.per_device_batch} × {c.num_workers} = {per_step}; "
                f"use a multiple of {per_step}"
            )
        if t.strategy == "deepspeed" and not c.use_gpu:
            raise ValueError(
                "training.strategy=deepspeed needs cluster.use_gpu=true; use ddp on CPUs"
            )
        self._check_search_splits()
        return self

    def _check_search_splits(self) -> None:
        """The α search scores on validation splits only, so the ones it weighs must exist."""
        if not self.search.enabled:
            return
        weights = self.search.objective
        if weights.new > 0 or weights.old > 0:
            missing = [t.name for t in self.tasks if t.val is None]
            if missing:
                raise ValueError(
                    f"search.enabled needs a `val` split for every task; missing for {missing}"
                )
        uses_probe = weights.general > 0 or self.search.general_floor is not None
        if uses_probe and (self.general_probe is None or self.general_probe.val is None):
            raise ValueError(
                "search.objective.general > 0 and search.general_floor need general_probe.val (a "
                "validation part of the probe); add it, or set search.objective.general=0 and "
                "search.general_floor=null"
            )

    @property
    def gradient_accumulation(self) -> int:
        return self.training.global_batch // (
            self.training.per_device_batch * self.cluster.num_workers
        )

    def task(self, name: str) -> TaskConfig:
        """The task called `name`, or an error listing the job's tasks."""
        for task in self.tasks:
            if task.name == name:
                return task
        known = ", ".join(t.name for t in self.tasks)
        raise LlavaCError(f"task {name!r} is not in this job", fix=f"use one of: {known}")

    def hash(self) -> str:
        """Stable hash of the resolved config (the run directory records it)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_job(
    path: str | Path, overrides: tuple[str, ...] | list[str] = (), *, check_files: bool = True
) -> JobConfig:
    """Read a job YAML, apply `key=value` overrides, validate, and check the data files exist."""
    path = Path(path)
    if path.is_dir():
        raise LlavaCError(
            "the job file is a directory", path=path, fix="pass the path of a job YAML inside it"
        )
    if not path.is_file():
        raise LlavaCError("job file not found", path=path, fix="pass the path of a job YAML")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LlavaCError(f"not valid YAML: {exc}", path=path, fix="fix the YAML syntax") from exc
    if not isinstance(data, dict):
        raise LlavaCError(
            "a job file must be a mapping of sections",
            path=path,
            fix="write `section: {key: value}` at the top level (see `llava-c jobs show demo`)",
        )
    return job_from_dict(data, overrides, source=path, check_files=check_files)


def job_from_dict(
    data: dict[str, Any],
    overrides: tuple[str, ...] | list[str] = (),
    *,
    source: str | Path = "<job>",
    check_files: bool = True,
) -> JobConfig:
    """Validate a job given as a dict (the same rules as `load_job`)."""
    data = json.loads(json.dumps(data, default=str))
    # benchmark.* first: the benchmark fills `tasks`, which later overrides may then address.
    first = [o for o in overrides if o.startswith("benchmark.")]
    for item in first:
        apply_override(data, item)
    if data.get("benchmark"):
        expand_benchmark(data, source)
    for item in overrides:
        if item not in first:
            apply_override(data, item)
    try:
        job = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise LlavaCError(
            describe_validation_error(exc),
            path=source,
            fix="correct these keys in the job file or in the key=value overrides",
        ) from None
    if check_files:
        check_data_files(job, source)
    return job


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in nested dicts/lists; the value is parsed as YAML (`1e-4`, `true`, `[1, 2]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise LlavaCError(f"override {item!r} is not key=value", fix="write e.g. training.lr=1e-4")
    *parents, leaf = key.split(".")
    node: Any = data
    for i, part in enumerate(parents):
        node = _child(node, part, key)
        if not isinstance(node, dict | list):
            raise LlavaCError(
                f"override {key!r}: {'.'.join(parents[: i + 1])} is not a section",
                fix="address a key inside a section, e.g. training.lr=1e-4",
            )
    value = override_value(key, raw)
    if isinstance(node, list):
        node[_list_index(node, leaf, key)] = value
    else:
        node[leaf] = value


def override_value(key: str, raw: str) -> Any:
    """The YAML value of an override; plain YAML only (no tags such as `!!python/...`)."""
    if not raw:
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LlavaCError(
            f"override {key}={raw!r}: the value is not plain YAML ({problem})",
            fix="write a plain YAML value: a number (1e-4), true/false, a list [a, b] "
            "or a quoted string",
        ) from None


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, key)]
    return node.setdefault(part, {})


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise LlavaCError(
            f"override {key!r}: {part!r} is not an index of a list of {len(node)}",
            fix=f"use an index from 0 to {len(node) - 1}",
        )
    return int(part)


def expand_benchmark(data: dict[str, Any], source: str | Path) -> None:
    """Fill tasks / inquiry / general probe from a built-in benchmark's `benchmark.json`."""
    bench = data["benchmark"]
    path = bench.get("path") if isinstance(bench, dict) else None
    if not isinstance(path, str) or not path:
        raise LlavaCError("benchmark needs a `path`", path=source, fix="set benchmark.path: DIR")
    root = Path(path)
    index_file = root / "benchmark.json"
    if not index_file.is_file():
        raise LlavaCError(
            "no benchmark.json in the benchmark directory",
            path=root,
            fix=f"build it with `llava-c data synth --out {root}`",
        )
    index = read_benchmark_index(index_file)
    setting = bench.get("setting", "continual")
    if setting not in BENCHMARK_SETTINGS:
        raise LlavaCError(
            f"benchmark.setting={setting!r} is not a setting",
            path=source,
            fix=f"use one of: {', '.join(BENCHMARK_SETTINGS)}",
        )
    tasks = index.get(setting)
    if not isinstance(tasks, list) or not all(
        isinstance(t, dict) and isinstance(t.get("name"), str) for t in tasks
    ):
        raise LlavaCError(
            f"{setting!r} is not a list of tasks with a `name` each",
            path=index_file,
            fix=f"rebuild the benchmark with `llava-c data synth --out {root}`",
        )
    chosen = chosen_tasks(tasks, bench, root) if not data.get("tasks") else []
    try:
        fill_from_benchmark(data, index, chosen, root)
    except (KeyError, TypeError, AttributeError) as exc:
        raise LlavaCError(
            f"an entry is missing or has the wrong type ({type(exc).__name__}: {exc})",
            path=index_file,
            fix=f"rebuild the benchmark with `llava-c data synth --out {root}`",
        ) from None


def fill_from_benchmark(
    data: dict[str, Any], index: dict[str, Any], tasks: list[dict], root: Path
) -> None:
    """Tasks, inquiry and general probe of the job from the benchmark's, where the job has none."""
    if not data.get("tasks"):
        data["tasks"] = [_benchmark_task(root, t) for t in tasks]
    if not data.get("inquiry") and index.get("inquiry"):
        data["inquiry"] = {"path": str(root / index["inquiry"]["path"])}
    probe = index.get("general_probe")
    if not data.get("general_probe") and probe:
        data["general_probe"] = {
            "path": str(root / probe["test"]),
            "val": str(root / probe["val"]) if probe.get("val") else None,
            "image_folder": str(root / probe["image_folder"]),
            "scoring": probe.get("scoring", "f1"),
        }


BENCHMARK_SETTINGS = ("continual", "general")


def read_benchmark_index(index_file: Path) -> dict[str, Any]:
    """A benchmark's `benchmark.json`: a mapping of settings to task lists."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise LlavaCError(
            f"not valid JSON ({exc})",
            path=index_file,
            fix=f"rebuild the benchmark with `llava-c data synth --out {index_file.parent}`",
        ) from None
    if not isinstance(index, dict):
        raise LlavaCError(
            f"expected a JSON object of settings, got {type(index).__name__}",
            path=index_file,
            fix=f"rebuild the benchmark with `llava-c data synth --out {index_file.parent}`",
        )
    return index


def chosen_tasks(tasks: list[dict], bench: dict[str, Any], root: Path) -> list[dict]:
    """The benchmark's tasks named by `benchmark.tasks`, in that order (all when unset)."""
    names = bench.get("tasks")
    if names is None:
        return tasks
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        example = names if isinstance(names, str) else "name_a,name_b"
        raise LlavaCError(
            f"benchmark.tasks must be a list of task names, got {names!r}",
            fix=f"write a YAML list, e.g. benchmark.tasks=[{example}]",
        )
    by_name = {t["name"]: t for t in tasks}
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise LlavaCError(
            f"benchmark.tasks {unknown or names} do not name tasks of this benchmark",
            path=root / "benchmark.json",
            fix=f"choose from {list(by_name)}",
        )
    return [by_name[n] for n in names]


def _benchmark_task(root: Path, task: dict[str, Any]) -> dict[str, Any]:
    entry = {k: task[k] for k in ("name", "instruction", "scoring", "chance") if k in task}
    for split in ("train", "val", "test", "image_folder"):
        if task.get(split):
            entry[split] = str(root / task[split])
    return entry


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: the dotted key, what is wrong, what the key means, and the fix."""
    lines = [f"invalid job config ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = err["loc"]
        key = ".".join(str(p) for p in loc) or "(job)"
        msg = err["msg"].removeprefix("Value error, ")
        section = _section_of(loc)
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _suggestion(section, str(loc[-1]))
        elif loc:
            msg += f" (got {err.get('input')!r})"
            field = section.model_fields.get(str(loc[-1])) if section else None
            if field is not None and field.description:
                msg += f" — {field.description}"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _section_of(loc: tuple) -> type[BaseModel] | None:
    """The schema section that holds the last key of `loc` (list indices skipped)."""
    section: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = section.model_fields.get(part)
        annotation = field.annotation if field else None
        inner = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        models = [a for a in inner if issubclass(a, BaseModel)]
        if not models:
            return None
        section = models[0]
    return section


def _suggestion(section: type[BaseModel] | None, key: str) -> str:
    if section is None:
        return ""
    close = difflib.get_close_matches(key, list(section.model_fields), n=1)
    return (
        f"; did you mean {close[0]!r}?"
        if close
        else f"; known keys: {sorted(section.model_fields)}"
    )


def check_data_files(job: JobConfig, source: str | Path = "<job>") -> None:
    """Every data file and image folder named by the job must exist; list all that do not."""
    missing = [f"  {key}: {path}" for key, path in _data_paths(job) if not Path(path).exists()]
    if missing:
        raise LlavaCError(
            "data files not found:\n" + "\n".join(missing),
            path=source,
            fix="correct the paths (relative paths are taken from the current directory)",
        )


def _data_paths(job: JobConfig) -> list[tuple[str, Path]]:
    paths: list[tuple[str, Path]] = []
    for i, task in enumerate(job.tasks):
        for split in ("train", "val", "test", "image_folder"):
            value = getattr(task, split)
            if value is not None:
                paths.append((f"tasks.{i}.{split} ({task.name})", value))
    for key in ("inquiry", "general_probe"):
        data_file = getattr(job, key)
        if data_file is not None:
            paths.append((f"{key}.path", data_file.path))
            for field in ("val", "image_folder"):
                value = getattr(data_file, field, None)
                if value is not None:
                    paths.append((f"{key}.{field}", value))
    for i, path in enumerate(job.eval.lmms_include_path):
        paths.append((f"eval.lmms_include_path.{i}", path))
    return paths


def result_neutral_keys(section: type[BaseModel] | None = None, prefix: str = "") -> frozenset[str]:
    """Dotted keys of the fields marked `RESULT_NEUTRAL`, through the nested sections."""
    keys: set[str] = set()
    for name, field in (section or JobConfig).model_fields.items():
        if field.json_schema_extra == RESULT_NEUTRAL:
            keys.add(prefix + name)
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            keys |= result_neutral_keys(inner, f"{prefix}{name}.")
    return frozenset(keys)


def dump_job(job: JobConfig) -> str:
    """The resolved config as YAML (what `llava-c config show` prints)."""
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
