"""The stage data stream: Ray Data shards → per-epoch shuffled micro-batches, resumable by position;
and the optimizer-step count of a stage."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from llava_c_ray.config import TrainingConfig
from llava_c_ray.data.records import load_records
from llava_c_ray.data.shards import prepare_shards, ray_dataset, read_manifest
from llava_c_ray.errors import LlavaCError
from llava_c_ray.train.spec import StageSpec, TrainFile
from llava_c_ray.train.stage import SHARDS, prepare_data
from llava_c_ray.train.stream import ShardStream, encoded_bytes, row_length


@pytest.fixture(scope="module")
def shards(tiny_benchmark: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tiny_benchmark / "icon_count" / "train.json"
    out = tmp_path_factory.mktemp("stream") / "00-icon_count-train"
    return prepare_shards(source, tiny_benchmark / "images", out, records_per_shard=8)


def ids_stream(shard, **kwargs) -> ShardStream:
    return ShardStream(
        shard, batch_size=4, encode=lambda row: row["id"], collate=list, seed=3, **kwargs
    )


def first(stream: ShardStream, count: int) -> list[list[str]]:
    return list(itertools.islice(stream, count))


@pytest.mark.integration
def test_epochs_reshuffle_and_a_resumed_stream_continues_where_it_stopped(
    ray_cluster, shards: Path
) -> None:
    dataset = ray_dataset([shards], seed=0)
    records = dataset.count()
    per_epoch = -(-records // 4)
    batches = first(ids_stream(dataset.iterator()), 2 * per_epoch + 3)
    epochs = [sum(batches[i * per_epoch : (i + 1) * per_epoch], []) for i in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == records
    assert epochs[0] != epochs[1], "the second epoch must be reshuffled"
    assert batches == first(ids_stream(dataset.iterator()), len(batches)), "seeded"
    start = per_epoch + 2  # past an epoch boundary
    assert first(ids_stream(dataset.iterator(), start=start), 4) == batches[start : start + 4]


@pytest.mark.integration
def test_encoding_ahead_keeps_the_order_and_surfaces_errors(ray_cluster, shards: Path) -> None:
    dataset = ray_dataset([shards], seed=0)
    in_line = first(ids_stream(dataset.iterator(), prefetch_batches=0), 5)
    assert first(ids_stream(dataset.iterator(), prefetch_batches=3), 5) == in_line

    def broken(row):
        raise ValueError(f"cannot decode {row['id']}")

    stream = ShardStream(
        dataset.iterator(), batch_size=4, encode=broken, collate=list, seed=3, prefetch_batches=2
    )
    with pytest.raises(ValueError, match="cannot decode"):
        first(stream, 1)


@pytest.fixture(scope="module")
def text_shards(tiny_benchmark: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tiny_benchmark / "text_qa" / "train.json"
    out = tmp_path_factory.mktemp("stream") / "01-text_qa-train"
    return prepare_shards(source, None, out, records_per_shard=8)


def padded_length(batches: list[list[int]]) -> int:
    return sum(len(batch) * max(batch) for batch in batches)


@pytest.mark.integration
def test_grouping_by_length_pads_less_and_keeps_epochs_and_resume(
    ray_cluster, shards: Path, text_shards: Path
) -> None:
    dataset = ray_dataset([shards, text_shards], seed=0)
    records = dataset.count()
    per_epoch = -(-records // 4)

    def stream(group: bool, **kwargs) -> ShardStream:
        return ShardStream(
            dataset.iterator(),
            batch_size=4,
            encode=lambda row: (row_length(row)[1], row["id"]),
            collate=list,
            seed=3,
            shuffle_buffer=16,
            group_by_length=group,
            **kwargs,
        )

    grouped, plain = first(stream(True), 2 * per_epoch), first(stream(False), 2 * per_epoch)
    for epoch in range(2):
        rows = sum(grouped[epoch * per_epoch : (epoch + 1) * per_epoch], [])
        assert sorted(r[1] for r in rows) == sorted(dataset.to_pandas()["id"])

    def lengths(batches):
        return [[length for length, _ in batch] for batch in batches]

    assert padded_length(lengths(grouped)) < padded_length(lengths(plain))
    assert grouped[:per_epoch] != grouped[per_epoch:], "reshuffled every epoch"
    start = per_epoch - 1
    assert first(stream(True, start=start), 3) == grouped[start : start + 3]


@pytest.mark.integration
def test_encoded_rows_are_reused_in_later_epochs_within_the_budget(
    ray_cluster, shards: Path
) -> None:
    dataset = ray_dataset([shards], seed=0)
    records = dataset.count()
    per_epoch = -(-records // 4)
    encoded: list[str] = []

    def encode(row):
        encoded.append(row["id"])
        return {"id": row["id"], "pixel_values": torch.zeros(256)}

    def stream(megabytes: float) -> ShardStream:
        return ShardStream(
            dataset.iterator(),
            batch_size=4,
            encode=encode,
            collate=lambda rows: [r["id"] for r in rows],
            seed=3,
            prefetch_batches=0,  # no row encoded ahead of what the test takes
            encode_cache_mb=megabytes,
        )

    plain = first(stream(0), 3 * per_epoch)
    assert len(encoded) == 3 * records
    encoded.clear()
    assert first(stream(1), 3 * per_epoch) == plain
    assert len(encoded) == records, "each row encoded once"
    encoded.clear()
    row_bytes = encoded_bytes({"id": "x", "pixel_values": torch.zeros(256)})
    half = (records // 2) * row_bytes / 2**20  # room for half of the rows
    assert first(stream(half), 3 * per_epoch) == plain
    assert len(encoded) == records + 2 * (records - records // 2)


@pytest.mark.integration
def test_an_empty_shard_is_an_error(ray_cluster, shards: Path) -> None:
    empty = ray_dataset([shards]).limit(0)
    with pytest.raises(LlavaCError, match="data shard is empty"):
        first(ids_stream(empty.iterator()), 1)


def spec(shape: tuple[int, int, int], epochs: float) -> StageSpec:
    workers, per_device, accumulation = shape
    training = TrainingConfig(
        per_device_batch=per_device,
        global_batch=per_device * workers * accumulation,
        epochs=epochs,
    )
    return StageSpec(
        name="t",
        init=Path("."),
        out=Path("."),
        train_files=(),
        training=training,
        num_workers=workers,
    )


@given(
    st.integers(1, 5000),
    st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 8)),
    st.sampled_from([0.5, 1.0, 2.0, 3.0]),
)
def test_optimizer_steps_cover_the_epochs_by_less_than_a_step(records, shape, epochs) -> None:
    workers, per_device, accumulation = shape
    assume(records >= workers)  # fewer records than workers is refused before training
    steps = spec(shape, epochs).optimizer_steps(records)
    micro_batches = -(-(records // workers) // per_device)  # one worker's, per epoch
    consumed = steps * accumulation
    assert consumed >= epochs * micro_batches  # every row seen `epochs` times
    assert consumed < epochs * micro_batches + accumulation  # by less than one step more


def test_max_steps_overrides_epochs() -> None:
    stage = spec((2, 4, 2), 3.0)
    stage = StageSpec(
        **{**stage.__dict__, "training": stage.training.model_copy(update={"max_steps": 7})}
    )
    assert stage.optimizer_steps(10_000) == 7


@pytest.mark.integration
def test_stage_data_from_json_and_prepared_shards(
    ray_cluster, tiny_benchmark: Path, shards: Path, tmp_path: Path
) -> None:
    source = tiny_benchmark / "attributes" / "train.json"
    stage = StageSpec(
        name="joint",
        init=Path("."),
        out=tmp_path,
        train_files=(
            TrainFile(source, tiny_benchmark / "images", "Answer with one word."),
            TrainFile(shards, None, "Answer with the letter."),
        ),
        training=TrainingConfig(),
    )
    data = prepare_data(stage)
    written = tmp_path / SHARDS / "00"
    assert data.directories == (written, shards)
    assert (
        data.records
        == len(load_records(source, check_images=False)) + read_manifest(shards)["records"]
    )
    stamp = (written / "manifest.json").stat().st_mtime_ns
    assert prepare_data(stage) == data
    assert (written / "manifest.json").stat().st_mtime_ns == stamp, "unchanged file: reused"
    rows = ray_dataset(list(data.directories)).take_all()
    assert {data.instructions[str(Path(r["path"]).parent)] for r in rows} == {
        "Answer with one word.",
        "Answer with the letter.",
    }
