"""Where the reports find their runs: a run directory, a ``results.json``, a Hydra job directory, or
any directory above runs, and the command line that names them (``multi`` and ``arrival``).

A directory without a ``results.json`` of its own (a Hydra sweep, an ``output-dir``) stands for the
first ``results.json`` on each branch below it, symlinks not followed (``latest`` would count a run
twice; a Hydra job directory's copy stands for the run in its ``runs/``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol


class HasResultsPath(Protocol):
    results_path: Path


def locate(path: Path) -> tuple[Path, Path]:
    """(results.json, the directory holding the run's other files) for a run directory, a
    results.json, or a Hydra job directory (its run lives in ``runs/latest``)."""
    results = path if path.name == "results.json" else path / "results.json"
    job_run = results.parent / "runs" / "latest"
    return results, job_run if job_run.is_dir() else results.parent


def _natural(name: str) -> tuple[bool, int, str]:
    """Hydra job directories 0, 1, ..., 10 in numeric order."""
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)


def find_runs(path: Path) -> list[tuple[Path, Path]]:
    """``locate`` for every run ``path`` stands for (see the module docstring); a path with no
    results.json anywhere is returned as is, so that reading it names the problem."""
    if path.name == "results.json" or (path / "results.json").exists() or not path.is_dir():
        return [locate(path)]
    found = []
    for root, dirs, files in os.walk(path):  # symlinks to directories are not entered
        if "results.json" in files:
            found.append(locate(Path(root)))
            dirs.clear()
        dirs.sort(key=_natural)
    return found or [locate(path)]


def default_out(runs: Iterable[HasResultsPath]) -> Path:
    """``report/`` in the runs' common parent directory; ``./report`` when that is the filesystem root."""
    common = Path(os.path.commonpath([run.results_path.absolute().parent for run in runs]))
    return Path("report") if common == Path(common.anchor) else common / "report"


def parse_report_args(prog: str, doc: str, out_help: str, argv: list[str] | None) -> argparse.Namespace:
    """A report CLI's arguments: the paths to read runs from, and ``--out``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path,
                        help="run directories, results.json files, Hydra job or sweep directories")
    parser.add_argument("--out", type=Path, default=None, help=out_help)
    return parser.parse_args(argv)
