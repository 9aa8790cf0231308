"""Streaming safetensors I/O: sharded write + index, lazy reads by name, clear errors on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava_c_ray.errors import LlavaCError
from llava_c_ray.model.safetensors_io import INDEX_NAME, LazyCheckpoint, ShardWriter, dtype_bytes


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        f"layer.{i}.weight": torch.randn(16, 8, generator=generator, dtype=torch.float32)
        for i in range(5)
    } | {"norm.bias": torch.arange(8, dtype=torch.bfloat16)}


def test_sharded_round_trip(tmp_path: Path) -> None:
    tensors = sample_tensors()
    writer = ShardWriter(tmp_path, max_shard_bytes=16 * 8 * 4 * 2)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert not list(tmp_path.glob("part-*"))
    checkpoint = LazyCheckpoint(tmp_path)
    assert checkpoint.keys() == list(tensors)
    assert checkpoint.meta("norm.bias") == ((8,), "BF16")
    for name, tensor in tensors.items():
        assert torch.equal(checkpoint.get(name), tensor)


def test_adopted_shards_join_the_index(tmp_path: Path) -> None:
    tensors = sample_tensors()
    names = list(tensors)
    writer = ShardWriter(tmp_path)
    writer.add(names[0], tensors[names[0]])
    save_file({n: tensors[n] for n in names[1:]}, str(tmp_path / "group-00000.safetensors"))
    writer.adopt(tmp_path / "group-00000.safetensors", names[1:], 0)
    writer.close()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    checkpoint = LazyCheckpoint(tmp_path)
    assert sorted(checkpoint.keys()) == sorted(names)
    assert all(torch.equal(checkpoint.get(n), t) for n, t in tensors.items())


@pytest.mark.parametrize(
    ("dtype", "size"),
    [
        ("F64", 8),
        ("F32", 4),
        ("BF16", 2),
        ("F16", 2),
        ("F8_E4M3", 1),
        ("I64", 8),
        ("U8", 1),
        ("BOOL", 1),
    ],
)
def test_dtype_bytes(dtype: str, size: int) -> None:
    assert dtype_bytes(dtype) == size


def test_single_file_checkpoint(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    checkpoint = LazyCheckpoint(tmp_path)
    assert checkpoint.shard_files() == ["model.safetensors"]
    assert "layer.3.weight" in checkpoint
    assert torch.equal(checkpoint.get("layer.3.weight"), tensors["layer.3.weight"])


def test_missing_weights_named(tmp_path: Path) -> None:
    with pytest.raises(LlavaCError, match="no model.safetensors"):
        LazyCheckpoint(tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    save_file(sample_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LlavaCError, match="unreadable or truncated"):
        LazyCheckpoint(tmp_path).get("layer.4.weight")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        '{"metadata": {}}',
        '{"weight_map": ["a"]}',
        '{"weight_map": {"a": 1}}',
    ],
    ids=["not-json", "list", "no-weight-map", "map-is-list", "file-not-string"],
)
def test_corrupt_index_is_a_named_error(text: str, tmp_path: Path) -> None:
    (tmp_path / INDEX_NAME).write_text(text)
    with pytest.raises(LlavaCError, match="corrupt index") as err:
        LazyCheckpoint(tmp_path)
    assert INDEX_NAME in str(err.value)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "a/../../x"])
def test_weight_map_outside_the_checkpoint_is_refused(target: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    save_file(sample_tensors(), str(tmp_path / "outside.safetensors"))
    (checkpoint / INDEX_NAME).write_text(json.dumps({"weight_map": {"norm.bias": target}}))
    with pytest.raises(LlavaCError, match="outside the checkpoint directory") as err:
        LazyCheckpoint(checkpoint)
    assert "norm.bias" in str(err.value) and target in str(err.value)


def test_symlinked_shards_of_a_hub_cache_snapshot_are_read(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot links its files to ../../blobs; the names stay inside."""
    tensors = sample_tensors()
    (tmp_path / "blobs").mkdir()
    snapshot = tmp_path / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    save_file(tensors, str(tmp_path / "blobs" / "1234"))
    (snapshot / "model.safetensors").symlink_to(tmp_path / "blobs" / "1234")
    index = {"weight_map": dict.fromkeys(tensors, "model.safetensors")}
    (snapshot / INDEX_NAME).write_text(json.dumps(index))
    assert torch.equal(LazyCheckpoint(snapshot).get("norm.bias"), tensors["norm.bias"])
