"""DICOM datasets: a folder of DICOM files plus ``labels.csv`` (same format as image folders).

Stored values go through the modality LUT (RescaleSlope / RescaleIntercept, e.g.
to Hounsfield units) and then a window: the file's WindowCenter / WindowWidth
when present, else its 1st..99th percentile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .folder import read_labels_csv, read_splits
from .npz import DataError, Split


def _first(value) -> float:
    """WindowCenter / WindowWidth may be multi-valued: use the first."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def read_dicom(path: Path, image_size: int) -> np.ndarray:
    """uint8 S x S (grayscale) from one DICOM file; DataError naming the file if unusable."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (OSError, InvalidDicomError, EOFError) as err:
        raise DataError(f"DICOM {path}: cannot be read ({err})") from None
    if "PixelData" not in ds:
        raise DataError(f"DICOM {path}: has no pixel data")
    try:
        pixels = ds.pixel_array.astype(np.float64)
    except Exception as err:  # pydicom raises many types for undecodable pixel data
        raise DataError(f"DICOM {path}: pixel data cannot be decoded ({err})") from None
    if pixels.ndim != 2:
        raise DataError(f"DICOM {path}: expected one 2D grayscale frame, got shape {pixels.shape}")
    values = pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = np.percentile(values, [1, 99])
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0, 1) * 255
    resized = F.interpolate(torch.from_numpy(scaled)[None, None].float(), size=(image_size, image_size),
                            mode="bilinear", antialias=True)
    return resized[0, 0].round().byte().numpy()


def load_dicom_folder(root: Path, image_size: int, skip_unreadable: bool = False) -> tuple[list[str], str, dict[str, Split]]:
    root = Path(root).expanduser()
    if not (root / "labels.csv").is_file():
        raise DataError(f"DICOM dataset {root}: needs labels.csv (split,path,label)")
    classes, label_kind, entries = read_labels_csv(root)
    splits = read_splits(f"DICOM dataset {root}", entries, lambda p: read_dicom(p, image_size), skip_unreadable)
    return classes, label_kind, splits
