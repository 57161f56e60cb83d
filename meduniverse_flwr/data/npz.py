"""MedMNIST-format ``.npz`` files: ``{split}_images`` (uint8, N x S x S or N x S x S x 3)
and ``{split}_labels`` (integers, N x L) for the splits train, val and test.

Reading checks everything a later step would trip over and reports it as one
line naming the file and the problem.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meduniverse_flwr.common.files import write_atomic

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x S x S (grayscale) or N x S x S x 3 (RGB)
    labels: np.ndarray  # integer, N x L

    def __len__(self) -> int:
        return len(self.labels)


def read_npz(path: Path, n_classes: int, label_kind: str) -> dict[str, Split]:
    """Read and check a MedMNIST-format file; labels must fit ``n_classes`` and ``label_kind``."""
    path = Path(path)
    with _open(path) as archive:
        splits = {split: _read_split(path, archive, split, n_classes, label_kind) for split in SPLITS}
    sizes = {s.images.shape[1:] for s in splits.values()}
    if len(sizes) != 1:
        raise DataError(f"data file {path}: splits have different image shapes {sorted(sizes)}")
    return splits


class _Archive:
    """An ``.npz`` whose uncompressed members are memory-mapped, not read: a large
    (e.g. 224 px) file is only paged in where a node's shard touches it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path)
        self.files = [name[: -len(".npy")] for name in self.zip.namelist() if name.endswith(".npy")]

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.zip.close()

    def __getitem__(self, key: str) -> np.ndarray:
        info = self.zip.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with self.zip.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        with open(self.path, "rb") as handle:
            handle.seek(info.header_offset)
            local_header = handle.read(30)
            name_length, extra_length = struct.unpack("<HH", local_header[26:30])
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(handle)
            offset = handle.tell()
        if dtype.hasobject:
            raise ValueError(f"member '{key}' holds Python objects")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape,
                         order="F" if fortran_order else "C")


def _open(path: Path) -> _Archive:
    if not path.is_file():
        raise DataError(f"data file {path}: not found")
    try:
        return _Archive(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"data file {path}: not a readable .npz file ({err})") from None


def _require(path: Path, archive: _Archive, key: str) -> np.ndarray:
    if key not in archive.files:
        raise DataError(f"data file {path}: missing key '{key}' (has {sorted(archive.files)})")
    try:
        return archive[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"data file {path}: '{key}' cannot be read ({err})") from None


def read_images(path: Path, splits: tuple[str, ...] = ("train", "val")) -> np.ndarray:
    """Only the images of ``splits`` (for unlabeled pretraining: labels are never read)."""
    path = Path(path)
    with _open(path) as archive:
        parts = [_check_images(path, split, _require(path, archive, f"{split}_images")) for split in splits]
    if len({p.shape[1:] for p in parts}) != 1:
        raise DataError(f"data file {path}: splits have different image shapes")
    return np.concatenate(parts)


def label_columns(path: Path) -> int:
    """L of the file's ``train_labels`` (N x L; 1 for flat N): a multilabel file's label count."""
    path = Path(path)
    with _open(path) as archive:
        labels = _require(path, archive, "train_labels")  # memory-mapped or small: only its shape is used
    return labels.shape[1] if labels.ndim == 2 else 1


def _check_images(path: Path, split: str, images: np.ndarray) -> np.ndarray:
    where = f"data file {path}: '{split}_images'"
    if images.dtype != np.uint8:
        raise DataError(f"{where} has dtype {images.dtype}, expected uint8")
    grayscale = images.ndim == 3 and images.shape[1] == images.shape[2]
    rgb = images.ndim == 4 and images.shape[1] == images.shape[2] and images.shape[3] == 3
    if not (grayscale or rgb):
        raise DataError(f"{where} has shape {images.shape}, expected N x S x S or N x S x S x 3")
    if len(images) == 0:
        raise DataError(f"{where} is empty")
    return images


def _read_split(path: Path, archive, split: str, n_classes: int, label_kind: str) -> Split:
    images = _check_images(path, split, _require(path, archive, f"{split}_images"))
    labels = _require(path, archive, f"{split}_labels")
    where = f"data file {path}: '{split}_labels'"
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or len(labels) != len(images):
        raise DataError(f"{where} has shape {labels.shape}, expected {len(images)} x L")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where} has dtype {labels.dtype}, expected integers")
    if label_kind == "multilabel":
        if labels.shape[1] != n_classes:
            raise DataError(f"{where} has {labels.shape[1]} columns, expected {n_classes} labels")
        bad = (labels != 0) & (labels != 1)
    else:
        if labels.shape[1] != 1:
            raise DataError(f"{where} has {labels.shape[1]} columns, expected 1")
        bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        value = labels[bad][0]
        allowed = "0 or 1" if label_kind == "multilabel" else f"0..{n_classes - 1}"
        raise DataError(f"{where}: label {value} out of range ({allowed})")
    return Split(images=images, labels=np.array(labels, dtype=np.int64))


def write_npz(path: Path, splits: dict[str, Split]) -> None:
    """Write atomically, so concurrent builders and killed runs never leave half a file."""
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"] = splits[split].images
        arrays[f"{split}_labels"] = splits[split].labels

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle, not a path: NumPy extends a path lacking ".npz"
            np.savez_compressed(handle, **arrays)

    write_atomic(path, write)
