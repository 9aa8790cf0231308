"""Parquet shards of validated LLaVA records that carry their image bytes.

Workers on other nodes then need no shared image folder. `prepare_shards` writes
`part-NNNNN.parquet` files and a `manifest.json` (counts, source sha256, schema version) into a
temporary directory and renames it into place (`atomic_directory`); `read_shards` gives the
records and image bytes back; `ray_dataset` opens the shards of one or more directories as a Ray
Data dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llava_c_ray.data.records import Record, load_records
from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import atomic_directory, refuse_overlap, refuse_replacing

SCHEMA_VERSION = 1
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("image_bytes", pa.binary()),
        ("conversations", pa.string()),
    ]
)


def prepare_shards(
    path: Path,
    image_folder: Path | None,
    out: Path,
    *,
    records_per_shard: int = 1000,
    mode: str = "strict",
    overwrite: bool = False,
    max_pixels: int | None = None,
    skip_hint: str | None = None,
) -> Path:
    """Validate `path` and write its records (with image bytes) as Parquet shards into `out`.

    `out` may not be, hold or lie inside the data file or the image folder, and `overwrite`
    replaces only a directory this function wrote (one with its manifest)."""
    out = Path(out)
    skipped = out.with_name(f"{out.name}.skipped.json") if mode == "skip" else None
    inputs = [Path(path), *([Path(image_folder)] if image_folder else [])]
    for target in [out, *([skipped] if skipped else [])]:
        refuse_overlap(
            target,
            inputs,
            fix="choose an --out outside the data file and the image folder, not above them",
        )
    refuse_replacing(
        out, overwrite, is_shard_directory, "`llava-c data prepare` (no shard manifest)"
    )
    records = load_records(
        path,
        image_folder,
        mode=mode,
        skipped_out=skipped,
        max_pixels=max_pixels,
        skip_hint=skip_hint,
    )
    if not records:
        raise LlavaCError(
            "no valid records: every record was skipped",
            path=path,
            fix=f"correct the records listed in {skipped}",
        )
    with atomic_directory(out, overwrite) as tmp:
        shards = [
            write_shard(
                records[i : i + records_per_shard],
                image_folder,
                tmp / f"part-{i // records_per_shard:05d}.parquet",
            )
            for i in range(0, len(records), records_per_shard)
        ]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": str(path),
            "source_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "records": len(records),
            "with_image": sum(r.image is not None for r in records),
            "shards": shards,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def is_shard_directory(directory: Path) -> bool:
    """Whether `directory` holds a manifest written by `prepare_shards`."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and {"schema_version", "source_sha256", "shards"} <= set(
        manifest
    )


def write_shard(records: list[Record], image_folder: Path | None, path: Path) -> str:
    rows = {
        "id": [r.id for r in records],
        "image": [r.image for r in records],
        "image_bytes": [
            (Path(image_folder) / r.image).read_bytes() if r.image else None for r in records
        ],
        "conversations": [json.dumps(r.to_raw()["conversations"]) for r in records],
    }
    pq.write_table(pa.table(rows, schema=SCHEMA), path)
    return path.name


def read_manifest(directory: Path) -> dict:
    manifest = Path(directory) / "manifest.json"
    if not manifest.is_file():
        raise LlavaCError(
            "no manifest.json", path=directory, fix="prepare it with `llava-c data prepare`"
        )
    return json.loads(manifest.read_text())


def read_shards(directory: Path) -> Iterator[tuple[Record, bytes | None]]:
    """Every record of a prepared directory with its image bytes (None for text-only records)."""
    for shard in read_manifest(directory)["shards"]:
        table = pq.read_table(Path(directory) / shard)
        for row in table.to_pylist():
            yield row_record(row), row["image_bytes"]


def row_record(row: dict) -> Record:
    """The record of one shard row (as read by pyarrow or Ray Data)."""
    raw = {
        "id": row["id"],
        "image": row["image"],
        "conversations": json.loads(row["conversations"]),
    }
    return Record.from_raw(raw)


def is_current(directory: Path, source: Path) -> bool:
    """Whether `directory` holds shards prepared from the current contents of `source`."""
    if not (Path(directory) / "manifest.json").is_file():
        return False
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return read_manifest(directory)["source_sha256"] == digest


def ray_dataset(directories: list[Path], *, seed: int | None = None):
    """The shards of prepared directories as one `ray.data.Dataset` (one row per record, image
    bytes and the shard's `path` included), rows in a fixed order: the files' own, or a seeded
    shuffle of them when `seed` is given.

    Read with Ray Data's file-based Parquet reader in tasks that hold no CPU: the newer reader
    lists files in a task that needs one CPU, and on a machine whose CPUs all belong to Ray Train
    workers that task never starts. Reading is I/O; the workers decode images and tokenize.
    """
    import ray.data
    from ray.data.datasource import FileShuffleConfig

    files = [str(Path(d) / s) for d in directories for s in read_manifest(d)["shards"]]
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        dataset = ray.data.read_parquet(
            files,
            num_cpus=0,
            include_paths=True,
            shuffle=(
                FileShuffleConfig(seed=seed, reseed_after_execution=False)
                if seed is not None
                else None
            ),
        )
    finally:
        context.use_datasource_v2 = previous
    dataset.context.execution_options.preserve_order = True
    return dataset
