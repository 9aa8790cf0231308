"""Run-directory storage on local disk, NFS, `s3://` or `gs://` through pyarrow filesystems (SPEC: run dir)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from llava_c_ray.errors import LlavaCError


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path) for a local path, NFS mount path or a pyarrow URI (s3://, gs://, file://, mock://)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:
        raise LlavaCError(
            f"cannot open storage URI: {error}",
            path=uri,
            fix="use a local path, an NFS mount path, or an s3:// / gs:// URI with credentials configured",
        ) from error


def join(path: str, *parts: str) -> str:
    """Join path parts with '/' as pyarrow filesystems expect."""
    return "/".join([path.rstrip("/"), *(part.strip("/") for part in parts)])


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    """True when a file or directory exists at path."""
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(filesystem: pafs.FileSystem, path: str) -> None:
    """Create a directory and its parents; no error if it exists."""
    filesystem.create_dir(path, recursive=True)


def write_json_atomic(filesystem: pafs.FileSystem, path: str, data: Any) -> None:
    """Write JSON to a temporary sibling, then move it over path (readers never see half a file)."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        makedirs(filesystem, parent)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with filesystem.open_output_stream(temporary) as stream:
        stream.write(json.dumps(data, indent=2, sort_keys=True).encode())
    filesystem.move(temporary, path)


def read_json(filesystem: pafs.FileSystem, path: str) -> Any:
    """Read a JSON file; a missing or malformed file raises LlavaCError."""
    if not exists(filesystem, path):
        raise LlavaCError("file not found", path=path, fix="check the run directory / storage path")
    with filesystem.open_input_stream(path) as stream:
        text = stream.read().decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise LlavaCError(
            f"invalid JSON: {error}", path=path, fix="delete or repair the file"
        ) from error


def copy_tree(source_uri: str, destination_uri: str) -> None:
    """Copy a file or directory tree between any two storage URIs (e.g. a run dir to s3://)."""
    source_fs, source_path = resolve(source_uri)
    destination_fs, destination_path = resolve(destination_uri)
    if not exists(source_fs, source_path):
        raise LlavaCError("nothing to copy", path=source_uri, fix="check the source path")
    makedirs(destination_fs, destination_path.rsplit("/", 1)[0] or destination_path)
    pafs.copy_files(
        source_path,
        destination_path,
        source_filesystem=source_fs,
        destination_filesystem=destination_fs,
    )


def is_remote(uri: str) -> bool:
    """True for a URI (s3://, gs://, file://, mock://); False for a local or NFS path."""
    return "://" in str(uri)


def sync_up(local: Path, uri: str) -> int:
    """Upload the files under `local` that `uri` lacks or holds at another size; returns how many.

    Run-directory files are written once (checkpoints) or replaced whole (JSON, CSV, PNG), so
    size is a sufficient change test between pushes.
    """
    filesystem, root = resolve(uri)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file() and ".tmp-" not in p.name)
    remote = {
        info.path: info.size
        for info in filesystem.get_file_info(
            pafs.FileSelector(root, recursive=True, allow_not_found=True)
        )
    }
    changed = [
        p
        for p in files
        if remote.get(join(root, p.relative_to(local).as_posix())) != p.stat().st_size
    ]
    for path in changed:
        target = join(root, path.relative_to(local).as_posix())
        makedirs(filesystem, target.rsplit("/", 1)[0])
        pafs.copy_files(
            str(path),
            target,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=filesystem,
        )
    return len(changed)


def sync_down(uri: str, local: Path) -> bool:
    """Fetch a run directory from `uri` into an absent or empty `local` (resume on a new machine)."""
    filesystem, root = resolve(uri)
    if not exists(filesystem, join(root, "manifest.json")):
        return False
    if Path(local).exists() and any(Path(local).iterdir()):
        return False
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        root,
        str(local),
        source_filesystem=filesystem,
        destination_filesystem=pafs.LocalFileSystem(),
    )
    return True
