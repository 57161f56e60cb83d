"""Files written so that a crash, a kill or a concurrent writer never leaves half of one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: mkstemp makes owner-only files; ours get the usual mode


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a fresh temporary file beside ``path``, then rename it over ``path``.

    The temporary name is unique (two writers never share one) and keeps ``path``'s suffix, so
    writers that pick a format from it (matplotlib, NumPy) still do; it is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def json_safe(value: Any) -> Any:
    """NaN / Inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
