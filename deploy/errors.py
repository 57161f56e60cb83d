"""The launcher's one error type, shared by its modules."""

from __future__ import annotations

from pathlib import Path


class LaunchError(RuntimeError):
    """A launch that cannot go on; the message is one line naming what and where."""


def existing(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a LaunchError naming ``what`` asked for it."""
    if not path.is_file():
        raise LaunchError(f"{what}: {path} does not exist")
    return path
