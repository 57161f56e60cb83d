"""A site's own images: ``root/<split>/<class>/*.png|jpg|...`` or ``root/labels.csv``.

The CSV variant has a header ``split,path,label`` (one class index per row) or
``split,path,<label 1>,<label 2>,...`` (0/1 per label: multilabel); paths are
relative to ``root``. Images are decoded and resized once, at load.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from meduniverse_flwr.data.npz import SPLITS, DataError, Split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
logger = logging.getLogger("flwr")


def read_image(path: Path, image_size: int) -> np.ndarray:
    """uint8 S x S x 3; raises DataError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"image {path}: cannot be read ({err})") from None


def stack_readable(paths: list[Path], labels: list, read, skip_unreadable: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decode every path; an unreadable one stops the load, or is skipped (and reported) when allowed."""
    images, kept = [], []
    for path, label in zip(paths, labels):
        try:
            images.append(read(path))
            kept.append(label)
        except DataError as err:
            if not skip_unreadable:
                raise
            logger.warning("skipped: %s", err)
    if not images:
        raise DataError(f"no readable image among {len(paths)} files (first: {paths[0] if paths else '-'})")
    return np.stack(images), np.asarray(kept, dtype=np.int64).reshape(len(kept), -1)


def read_labels_csv(root: Path) -> tuple[list[str], str, dict[str, tuple[list[Path], list]]]:
    """(class or label names, label kind, per split: paths and labels) from ``root/labels.csv``."""
    csv_path = root / "labels.csv"
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0][:2] != ["split", "path"] or len(rows[0]) < 3:
        raise DataError(f"labels file {csv_path}: header must be 'split,path,label' or 'split,path,<labels...>'")
    header, body = rows[0], rows[1:]
    multilabel = len(header) > 3
    entries: dict[str, tuple[list[Path], list]] = {split: ([], []) for split in SPLITS}
    for line, row in enumerate(body, start=2):
        if len(row) != len(header) or row[0] not in SPLITS:
            raise DataError(f"labels file {csv_path}, line {line}: expected {len(header)} fields with split "
                            f"in {SPLITS}, got {row}")
        try:
            label = [int(v) for v in row[2:]] if multilabel else int(row[2])
        except ValueError:
            raise DataError(f"labels file {csv_path}, line {line}: labels must be integers, got {row[2:]}") from None
        entries[row[0]][0].append(root / row[1])
        entries[row[0]][1].append(label)
    if multilabel:
        return header[2:], "multilabel", entries
    n_classes = 1 + max((label for _, labels in entries.values() for label in labels), default=0)
    return [str(c) for c in range(n_classes)], "binary" if n_classes == 2 else "multiclass", entries


def read_class_folders(root: Path) -> tuple[list[str], str, dict[str, tuple[list[Path], list]]]:
    classes = sorted({d.name for split in SPLITS if (root / split).is_dir() for d in (root / split).iterdir()
                      if d.is_dir()})
    entries: dict[str, tuple[list[Path], list]] = {}
    for split in SPLITS:
        files = [(f, index) for index, name in enumerate(classes) if (root / split / name).is_dir()
                 for f in sorted((root / split / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        entries[split] = ([f for f, _ in files], [label for _, label in files])
    return classes, "binary" if len(classes) == 2 else "multiclass", entries


def load_folder(root: Path, image_size: int, skip_unreadable: bool = False) -> tuple[list[str], str, dict[str, Split]]:
    """(class names, label kind, splits) of an image-folder dataset."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root}: not found")
    classes, label_kind, entries = read_labels_csv(root) if (root / "labels.csv").is_file() else read_class_folders(root)
    if len(classes) < 2 and label_kind != "multilabel":
        raise DataError(f"image folder {root}: needs at least 2 classes, found {classes}")
    splits = read_splits(f"image folder {root}", entries, lambda p: read_image(p, image_size), skip_unreadable)
    return classes, label_kind, splits


def read_splits(where: str, entries: dict[str, tuple[list[Path], list]], read, skip_unreadable: bool) -> dict[str, Split]:
    """Decode the listed files of every split; ``where`` names the dataset in errors."""
    splits = {}
    for split in SPLITS:
        paths, labels = entries[split]
        if not paths:
            raise DataError(f"{where}: split '{split}' has no files")
        images, label_array = stack_readable(paths, labels, read, skip_unreadable)
        splits[split] = Split(images, label_array)
    return splits
