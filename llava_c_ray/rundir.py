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

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llava_c_ray.config import JobConfig, dump_job
from llava_c_ray.errors import LlavaCError


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling and rename it over `path`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


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
    """A run directory and its manifest; every `record` rewrites manifest.json atomically.

    With a `mirror` URI (s3://, gs://, file://) every save also uploads what changed.
    """

    path: Path
    manifest: dict[str, Any]
    mirror: str | None = None

    @property
    def manifest_file(self) -> Path:
        return self.path / "manifest.json"

    def stage_dir(self, dirname: str) -> Path:
        return self.path / "stages" / dirname

    def stage(self, index: int) -> dict[str, Any]:
        stages = self.manifest["stages"]
        while len(stages) <= index:
            stages.append({"index": len(stages), "steps": {}})
        return stages[index]

    def step(self, index: int, step: str) -> dict[str, Any] | None:
        """The record of a finished step, or None if it has not finished."""
        record = self.stage(index)["steps"].get(step)
        return record if record and record.get("status") == "done" else None

    def record(self, index: int, step: str, **info: Any) -> None:
        """Mark a step done with its outputs and save the manifest."""
        self.stage(index)["steps"][step] = {"status": "done", "finished": time.time(), **info}
        self.save()

    def update_stage(self, index: int, **info: Any) -> None:
        self.stage(index).update(info)
        self.save()

    def save(self) -> None:
        self.manifest["updated"] = time.time()
        write_json_atomic(self.manifest_file, self.manifest)
        self.sync()

    def sync(self) -> None:
        """Upload the files the mirror lacks (a no-op without a mirror)."""
        if self.mirror:
            from llava_c_ray.storage import sync_up

            sync_up(self.path, self.mirror)


# Keys that change how a run reports or feeds its workers, never what it computes: a run reopened
# with only these changed (or added by a newer llava-c with their defaults) resumes.
RESULT_NEUTRAL_KEYS = frozenset(
    {"training.log_every", "training.prefetch_batches", "training.encode_cache_mb"}
)

# Keys added after runs existed, with the value that does what llava-c did before them: a run written
# without the key resumes under a config that holds that value.
ADDED_KEYS = {"training.group_by_length": False}
ADDED_UNCHANGED = frozenset(f"{key}: None -> {value!r}" for key, value in ADDED_KEYS.items())


def adopt(run: RunDir, job: JobConfig) -> RunDir:
    """Record `job` as the run's config: it differs from the old one in result-neutral keys only."""
    (run.path / "config.yaml").write_text(dump_job(job))
    run.manifest["config_hash"] = job.hash()
    run.save()
    return run


def open_run_dir(path: Path, job: JobConfig, *, force_new: bool = False) -> RunDir:
    """Create a run directory, or reopen one started with the same config to resume it.

    A directory holding a different job is refused with the differing keys (keys in
    `RESULT_NEUTRAL_KEYS`, and `ADDED_KEYS` at their former behaviour, do not count: the run resumes
    under the new config); with `force_new` it is
    moved aside to `<path>.old-<time>` (nothing is deleted) and a fresh run starts.
    """
    manifest_file = path / "manifest.json"
    if manifest_file.exists():
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as exc:
            raise LlavaCError(
                f"manifest is not valid JSON ({exc})", path=manifest_file, fix="use --force-new"
            ) from exc
        if manifest.get("config_hash") == job.hash():
            return RunDir(path, manifest)
        old = yaml.safe_load((path / "config.yaml").read_text()) or {}
        diffs = [
            d
            for d in config_differences(old, job.model_dump(mode="json"))
            if d.split(":")[0] not in RESULT_NEUTRAL_KEYS and d not in ADDED_UNCHANGED
        ]
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
    run = RunDir(
        path,
        {
            "job": job.name,
            "method": job.method.name,
            "config_hash": job.hash(),
            "created": time.time(),
            "stages": [],
        },
    )
    run.save()
    return run
