"""MedMNIST v2 / MedMNIST+ 2D datasets: the official ``.npz`` files, read and checked.

Files are ``{flag}.npz`` (28 px) or ``{flag}_{size}.npz`` (64, 128, 224 px)
under ``data-root`` (MedMNIST's own default: ``~/.medmnist``). Nothing is
downloaded unless asked for (``download`` needs the ``medmnist`` package and
internet access).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meduniverse_flwr.data.npz import DataError, Split, read_npz
from meduniverse_flwr.registry import medmnist_flag

DEFAULT_ROOT = Path("~/.medmnist").expanduser()
SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class Flag:
    modality: str
    n_classes: int
    label_kind: str


# From MedMNIST v2 (Yang et al., Scientific Data 2023), Table 1.
FLAGS: dict[str, Flag] = {
    "pathmnist": Flag("colon pathology", 9, "multiclass"),
    "chestmnist": Flag("chest X-ray", 14, "multilabel"),
    "dermamnist": Flag("dermatoscopy", 7, "multiclass"),
    "octmnist": Flag("retinal OCT", 4, "multiclass"),
    "pneumoniamnist": Flag("chest X-ray", 2, "binary"),
    "retinamnist": Flag("fundus photography", 5, "multiclass"),  # ordinal grades, treated as classes
    "breastmnist": Flag("breast ultrasound", 2, "binary"),
    "bloodmnist": Flag("blood cell microscopy", 8, "multiclass"),
    "tissuemnist": Flag("kidney cortex microscopy", 8, "multiclass"),
    "organamnist": Flag("abdominal CT (axial)", 11, "multiclass"),
    "organcmnist": Flag("abdominal CT (coronal)", 11, "multiclass"),
    "organsmnist": Flag("abdominal CT (sagittal)", 11, "multiclass"),
}


def file_size(image_size: int) -> int:
    """The MedMNIST+ size to read for a model input size: the smallest that is not smaller."""
    return next((size for size in SIZES if size >= image_size), SIZES[-1])


def medmnist_path(root: Path, flag: str, size: int) -> Path:
    return Path(root) / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def resolve(spec: str, root: str, image_size: int) -> tuple[str, Path]:
    """``spec`` is a flag (file looked up under ``root``) or a path to a MedMNIST file."""
    if spec.endswith(".npz") or "/" in spec:
        path = Path(spec).expanduser()
        flag = medmnist_flag(spec)
    else:
        flag = spec
        path = medmnist_path(Path(root).expanduser() if root else DEFAULT_ROOT, flag, file_size(image_size))
    if flag not in FLAGS:
        raise DataError(f"MedMNIST dataset '{flag}': unknown flag, choose one of {sorted(FLAGS)}")
    return flag, path


def load_medmnist(spec: str, root: str, image_size: int, download: bool = False) -> tuple[str, Flag, dict[str, Split]]:
    flag, path = resolve(spec, root, image_size)
    if not path.is_file():
        if download:
            _download(flag, path)
        else:
            raise DataError(
                f"MedMNIST file {path}: not found; download it with the medmnist package "
                f"(pip install medmnist; medmnist.INFO['{flag}'] names its class, download=True) "
                f"or set download=true, or point data-root at the folder that holds it")
    info = FLAGS[flag]
    return flag, info, read_npz(path, info.n_classes, info.label_kind)


def _download(flag: str, path: Path) -> None:
    """Opt-in download through the ``medmnist`` package (needs internet)."""
    try:
        import medmnist
    except ImportError:
        raise DataError(f"MedMNIST file {path}: not found, and download needs `pip install medmnist`") from None
    size = 28 if "_" not in path.stem else int(path.stem.split("_")[1])
    dataset_class = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset_class(split="train", download=True, root=str(path.parent), size=size)
    if not path.is_file():
        raise DataError(f"MedMNIST file {path}: download did not produce it")
