"""Run-directory storage on local disk, NFS, `s3://` or `gs://` through pyarrow filesystems (SPEC: run dir)."""

from __future__ import annotations

import hashlib
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


SYNC_STATE = ".sync-state.json"  # in the local run directory: what was pushed where; never uploaded
HASH_LIMIT = 64 << 20  # files up to this size are compared by content


def fingerprint(path: Path) -> str:
    """The content hash of a file of at most HASH_LIMIT bytes (JSON, YAML, CSV, plots: rewritten
    in place, possibly at equal size), else its size and mtime (checkpoints: written once)."""
    stat = path.stat()
    if stat.st_size > HASH_LIMIT:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_fingerprints(local: Path) -> dict[str, str]:
    """Every file under `local` (but temporaries and the sync state) by relative path."""
    return {
        p.relative_to(local).as_posix(): fingerprint(p)
        for p in sorted(Path(local).rglob("*"))
        if p.is_file() and ".tmp-" not in p.name and p.name != SYNC_STATE
    }


def read_sync_state(local: Path, uri: str) -> dict[str, str]:
    """The fingerprints last pushed from `local` to `uri`; empty (push everything) if unknown."""
    try:
        state = json.loads((Path(local) / SYNC_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state.get(uri, {}) if isinstance(state, dict) else {}


def write_sync_state(local: Path, uri: str, fingerprints: dict[str, str]) -> None:
    write_json_atomic(pafs.LocalFileSystem(), str(Path(local) / SYNC_STATE), {uri: fingerprints})


def sync_up(local: Path, uri: str) -> int:
    """Upload the files under `local` that `uri` lacks or holds at another size, or whose
    `fingerprint` changed since the last push to `uri`; returns how many."""
    filesystem, root = resolve(uri)
    current = local_fingerprints(local)
    pushed = read_sync_state(local, uri)
    remote = {
        info.path: info.size
        for info in filesystem.get_file_info(
            pafs.FileSelector(root, recursive=True, allow_not_found=True)
        )
    }
    changed = [
        name
        for name, mark in current.items()
        if pushed.get(name) != mark
        or remote.get(join(root, name)) != (Path(local) / name).stat().st_size
    ]
    for name in changed:
        target = join(root, name)
        makedirs(filesystem, target.rsplit("/", 1)[0])
        pafs.copy_files(
            str(Path(local) / name),
            target,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=filesystem,
        )
    write_sync_state(local, uri, current)
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
    write_sync_state(local, uri, local_fingerprints(local))  # what was fetched is what `uri` holds
    return True
