"""The run directory (SPEC.md §4): a manifest updated atomically after every step, so a rerun resumes.

```
RUN_DIR/config.yaml          the resolved job config the run was started with
RUN_DIR/manifest.json        config hash; per stage: steps with status, outputs, timings; alpha
RUN_DIR/results.json         tasks, accuracy_matrix, general, metrics
RUN_DIR/accuracy_matrix.csv
RUN_DIR/stages/NN-<name>/    train/, model/, sac_stats.json, eval.json
RUN_DIR/plots/*.png
```
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llava_c_ray.config import JobConfig, dump_job, result_neutral_keys
from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import write_json_atomic
from llava_c_ray.run_records import Manifest, StageRecord, StepRecord


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as `key: old -> new`."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [
            d for k in keys for d in config_differences(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    if old != new:
        return [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
    return []


@dataclass
class RunDir:
    """A run directory and its typed manifest; every `record` rewrites manifest.json atomically.

    With a `mirror` URI (s3://, gs://, file://) every save also uploads what changed.
    """

    path: Path
    manifest: Manifest
    mirror: str | None = None

    @property
    def manifest_file(self) -> Path:
        return self.path / "manifest.json"

    def stage_dir(self, dirname: str) -> Path:
        return self.path / "stages" / dirname

    def stage(self, index: int) -> StageRecord:
        stages = self.manifest.stages
        while len(stages) <= index:
            stages.append(StageRecord(index=len(stages)))
        return stages[index]

    def record(self, index: int, record: StepRecord) -> None:
        """Mark a step of stage `index` done with its outputs and save the manifest."""
        setattr(self.stage(index).steps, record.step, record)
        self.save()

    def update_stage(self, index: int, **info: Any) -> None:
        stage = self.stage(index)
        for key, value in info.items():
            setattr(stage, key, value)
        self.save()

    def save(self) -> None:
        self.manifest.updated = time.time()
        write_json_atomic(
            self.manifest_file, self.manifest.model_dump(mode="json", exclude_none=True)
        )
        self.sync()

    def sync(self) -> None:
        """Upload what changed to the mirror (a no-op without a mirror)."""
        if self.mirror:
            from llava_c_ray.storage import sync_up

            sync_up(self.path, self.mirror)


def read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise LlavaCError(
            f"manifest is not a llava-c manifest ({exc.error_count()} problem(s), first: "
            f"{exc.errors()[0]['msg']} at {'.'.join(str(p) for p in exc.errors()[0]['loc'])})",
            path=path,
            fix="use --force-new (moves the run aside) or another --run-dir",
        ) from None


def stored_differences(path: Path, job: JobConfig) -> list[str]:
    """How `job` differs from the config a run was started with, in keys that affect results.

    The stored config is validated through the current schema first, so a key added since the run
    started takes its default (what llava-c did before it existed) and does not count; keys whose
    field says they do not affect results (`result_neutral_keys`) never count."""
    stored = yaml.safe_load((path / "config.yaml").read_text()) or {}
    try:
        old = JobConfig.model_validate(stored).model_dump(mode="json")
    except ValidationError as exc:
        return [f"the stored config does not validate under this llava-c: {exc.errors()[0]['msg']}"]
    neutral = result_neutral_keys()
    return [
        d
        for d in config_differences(old, job.model_dump(mode="json"))
        if d.split(":")[0] not in neutral
    ]


def adopt(run: RunDir, job: JobConfig) -> RunDir:
    """Record `job` as the run's config: it differs from the old one in result-neutral keys only."""
    (run.path / "config.yaml").write_text(dump_job(job))
    run.manifest.config_hash = job.hash()
    run.save()
    return run


def open_run_dir(path: Path, job: JobConfig, *, force_new: bool = False) -> RunDir:
    """Create a run directory, or reopen one started with the same config to resume it.

    A directory holding a different job is refused with the differing keys (`stored_differences`:
    keys added since, at their defaults, and result-neutral keys do not count — the run resumes
    under the new config); with `force_new` it is moved aside to `<path>.old-<time>` (nothing is
    deleted) and a fresh run starts.
    """
    manifest_file = path / "manifest.json"
    if manifest_file.exists():
        manifest = read_manifest(manifest_file)
        if manifest.config_hash == job.hash():
            return RunDir(path, manifest)
        diffs = stored_differences(path, job)
        if not diffs:
            return adopt(RunDir(path, manifest), job)
        if not force_new:
            raise LlavaCError(
                "this run directory holds a different job:\n  " + "\n  ".join(diffs[:20]),
                path=path,
                fix="rerun with the original config, choose another --run-dir, or pass --force-new "
                "(moves the old run aside)",
            )
        shutil.move(path, path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    elif path.exists() and any(path.iterdir()):
        raise LlavaCError(
            "run directory exists, is not empty and has no manifest.json",
            path=path,
            fix="choose an empty or new --run-dir",
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(dump_job(job))
    manifest = Manifest(
        job=job.name, method=job.method.name, config_hash=job.hash(), created=time.time()
    )
    run = RunDir(path, manifest)
    run.save()
    return run
