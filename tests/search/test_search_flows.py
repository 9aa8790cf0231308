"""The α search as `llava-c search-alpha`, on the tiny model.

The search inside `llava-c run` is checked on the smoke job's run (tests/test_cluster_submit.py:
it searches α in both stages, and `ray job submit` runs it on a two-node cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llava_c_ray.cli import main
from tests.test_pipeline import write_job

pytestmark = pytest.mark.integration

SEARCH = {"enabled": True, "space": [0.1, 0.3, 0.6], "subset_size": 2, "num_actors": 2}


@pytest.fixture
def search_job(tmp_path, tiny_benchmark, tiny_checkpoint) -> Path:
    return write_job(tmp_path, tiny_benchmark, tiny_checkpoint, tasks=2, search=SEARCH)


def test_search_alpha_command(ray_cluster, search_job, tiny_checkpoint, tiny_tuned_pair, tmp_path):
    task = yaml.safe_load(search_job.read_text())["tasks"][1]["name"]
    args = ["search-alpha", "--base", str(tiny_checkpoint), "--adapter", str(tiny_tuned_pair[0])]
    args += ["--job", str(search_job), "--task", task, "--out", str(tmp_path / "s")]
    assert main([*args, "search.compare_modelmix=true"]) == 0
    saved = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert len(saved["trials"]) == 3 and all("modelmix" in t for t in saved["trials"])
    assert (tmp_path / "s" / f"alpha_{task}.png").is_file()
    before = (tmp_path / "s" / "trials.json").read_bytes()
    assert main(args) == 2  # the output exists: refused, nothing overwritten
    assert (tmp_path / "s" / "trials.json").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "nope"], "not in this job"),
        (["--task", "icon_count", "method.name=finetune"], "does not consolidate"),
        (["--task", "icon_count", "search.space=[0.2, 2.0]"], "outside"),
    ],
)
def test_search_alpha_bad_inputs(search_job, tiny_checkpoint, tmp_path, capsys, extra, message):
    args = ["search-alpha", "--base", str(tiny_checkpoint), "--tuned", str(tiny_checkpoint)]
    assert main([*args, "--job", str(search_job), "--out", str(tmp_path / "s"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
