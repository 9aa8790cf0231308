"""A run whose storage.path is a URI: mirrored after every step, resumed on a machine without it."""

from __future__ import annotations

import json
import shutil

import pytest

from llava_c_ray.config import load_job
from llava_c_ray.pipeline import run_job
from tests.test_pipeline import write_job

pytestmark = pytest.mark.integration


def test_uri_storage_mirrors_and_resumes(ray_cluster, tiny_benchmark, tiny_checkpoint, tmp_path):
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    job_file = write_job(tmp_path, tiny_benchmark, tiny_checkpoint, tasks=1)
    overrides = [f"storage.path=file://{remote}", f"storage.local_cache={cache}"]
    results = run_job(load_job(job_file, overrides))
    mirrored = remote / "t"
    local = cache / "t"
    for name in ("manifest.json", "results.json", "stages/01-icon_count/model/config.json"):
        assert (mirrored / name).read_bytes() == (local / name).read_bytes(), name
    finished = json.loads((mirrored / "manifest.json").read_text())
    shutil.rmtree(cache)  # a new machine: nothing local
    again = run_job(load_job(job_file, overrides))
    assert again.accuracy_matrix == results.accuracy_matrix
    steps = [s["steps"] for s in json.loads((local / "manifest.json").read_text())["stages"]]
    assert steps == [s["steps"] for s in finished["stages"]]  # nothing was recomputed
