"""Consolidation streams: the driver's peak memory is bounded by a shard and a few tensors, not the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.integration

SCRIPT = """
import json, resource, sys
from pathlib import Path
import ray
from llava_c_ray.consolidate.engine import consolidate_checkpoint
ray.init(address=sys.argv[4])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
consolidate_checkpoint(Path(sys.argv[1]), Path(sys.argv[3]), adapter=Path(sys.argv[2]), progress=False,
                       max_shard_bytes=8 << 20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "after_kb": after}))
"""


def test_peak_driver_memory_bounded(ray_cluster, tmp_path: Path) -> None:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    tensors = {
        f"language_model.model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 1024)
        for i in range(48)
    }
    save_file(
        tensors, str(base / "model.safetensors"), metadata={"format": "pt"}
    )  # 192 MiB, largest 4 MiB
    (base / "config.json").write_text("{}")
    lora = {}
    for i in range(48):
        prefix = f"base_model.model.model.language_model.layers.{i}.mlp.up_proj"
        lora[f"{prefix}.lora_A.weight"] = torch.randn(4, 1024)
        lora[f"{prefix}.lora_B.weight"] = torch.randn(1024, 4)
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    )
    del tensors
    address = ray_cluster.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(base), str(adapter), str(tmp_path / "out"), address],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    grown_mib = (usage["after_kb"] - usage["before_kb"]) / 1024
    print(
        f"driver peak memory grew by {grown_mib:.0f} MiB while consolidating a 192 MiB checkpoint"
    )
    assert grown_mib < 96
