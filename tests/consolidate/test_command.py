"""`llava-c consolidate` through an argparse parser built with `register`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from llava_c_ray.consolidate.command import register
from llava_c_ray.errors import LlavaCError
from llava_c_ray.model.safetensors_io import LazyCheckpoint, ShardWriter


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="llava-c")
    register(root.add_subparsers(dest="command", required=True))
    return root


def perturbed_copy(base: Path, out: Path) -> str:
    """A tuned checkpoint equal to the base except one 2-D weight; returns that weight's name."""
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    checkpoint = LazyCheckpoint(base)
    changed = next(n for n in checkpoint.keys() if len(checkpoint.meta(n)[0]) == 2)
    writer = ShardWriter(out)
    for name in checkpoint.keys():
        tensor = checkpoint.get(name)
        writer.add(name, tensor + 0.1 if name == changed else tensor)
    writer.close()
    return changed


@pytest.mark.integration
def test_command_writes_a_consolidated_checkpoint(
    ray_cluster, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    changed = perturbed_copy(tiny_checkpoint, tmp_path / "tuned")
    argv = ["consolidate", "--base", str(tiny_checkpoint), "--tuned", str(tmp_path / "tuned")]
    argv += ["--method", "modelmix", "--alpha", "0.5", "--out", str(tmp_path / "out")]
    args = parser().parse_args(argv)
    assert args.handler(args) == 0
    assert "1 tensors consolidated" in capsys.readouterr().out
    base, out = LazyCheckpoint(tiny_checkpoint), LazyCheckpoint(tmp_path / "out")
    expected = (base.get(changed).double() + 0.05).to(base.get(changed).dtype)
    torch.testing.assert_close(out.get(changed), expected)


def test_alpha_outside_range_fails_before_output(tiny_checkpoint: Path, tmp_path: Path) -> None:
    argv = ["consolidate", "--base", str(tiny_checkpoint), "--tuned", str(tiny_checkpoint)]
    args = parser().parse_args(argv + ["--alpha", "1.5", "--out", str(tmp_path / "out")])
    with pytest.raises(LlavaCError, match="outside"):
        args.handler(args)
    assert not (tmp_path / "out").exists()


def test_tuned_and_adapter_are_exclusive(tmp_path: Path) -> None:
    argv = ["consolidate", "--base", "b", "--tuned", "t", "--adapter", "a", "--out", "o"]
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
