"""DICOM datasets: a folder of DICOM files plus ``labels.csv`` (same format as image folders).

Grayscale only (MONOCHROME1 / MONOCHROME2). Display goes through pydicom's own LUT functions
rather than hand-written maths, so files decode as a DICOM viewer shows them: the modality LUT
(RescaleSlope / RescaleIntercept or a Modality LUT Sequence, e.g. to Hounsfield units), then the
file's VOI LUT Sequence or else its first WindowCenter / WindowWidth, else the 1st..99th
percentile; MONOCHROME1 (X-ray film convention: high values dark) is inverted so that bright
always means high.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meduniverse_flwr.data.folder import read_labels_csv, read_splits
from meduniverse_flwr.data.npz import DataError, Split

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")  # the photometric interpretations this reader decodes


def _display(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored values -> float 0..1 through the modality and VOI LUTs."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, ds)
    if ds.get("VOILUTSequence"):
        # LUT entries are indexed by integers; the output spans the LUT's declared bit depth
        values = apply_voi_lut(np.rint(values).astype(np.int64), ds)
        low, high = 0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        values = apply_voi_lut(values, ds)
        # pydicom maps the window onto the rescaled stored range: its ends are where -inf / +inf land
        low, high = apply_voi_lut(np.array([-np.inf, np.inf]), ds)
    else:
        low, high = np.percentile(values, [1, 99])
    return np.clip((values - low) / max(high - low, 1e-6), 0, 1)


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
    photometric = ds.get("PhotometricInterpretation")
    if photometric not in GRAYSCALE:
        raise DataError(f"DICOM {path}: PhotometricInterpretation {photometric!r} is not supported "
                        "(grayscale MONOCHROME1/MONOCHROME2 only; RGB and other colour DICOM are not)")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for undecodable pixel data
        raise DataError(f"DICOM {path}: pixel data cannot be decoded ({err})") from None
    if pixels.ndim != 2:
        raise DataError(f"DICOM {path}: expected one 2D grayscale frame, got shape {pixels.shape}")
    try:
        scaled = _display(pixels, ds) * 255
    except Exception as err:  # malformed LUTs and windows surface as many types
        raise DataError(f"DICOM {path}: modality / VOI LUT cannot be applied ({err})") from None
    if photometric == "MONOCHROME1":
        scaled = 255 - scaled
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
