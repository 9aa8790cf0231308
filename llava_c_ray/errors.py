"""The one error type for mistakes a user can cause (bad YAML, bad data, wrong paths, ...)."""

from __future__ import annotations

from pathlib import Path


class LlavaCError(Exception):
    """A user-fixable problem: the message names the file/record/key and the fix."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        parts = [f"{path}: {message}" if path is not None else message]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__("\n".join(parts))
        self.path = path
        self.fix = fix
