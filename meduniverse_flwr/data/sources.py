"""The data sources (``registry.SOURCES``): each reads a dataset entry's card and splits, and names
the files it reads (the node cache decodes again when one changes)."""

from __future__ import annotations

from pathlib import Path

from meduniverse_flwr.data.dicom import load_dicom_folder
from meduniverse_flwr.data.embedded import TASKS as EMBEDDED_TASKS
from meduniverse_flwr.data.embedded import load_embedded, task_path
from meduniverse_flwr.data.folder import load_folder
from meduniverse_flwr.data.layout import load_layout, sidecar_path
from meduniverse_flwr.data.medmnist import load_medmnist, resolve
from meduniverse_flwr.data.npz import DataError, Split
from meduniverse_flwr.data.options import DataOptions, write_dir
from meduniverse_flwr.wire.card import TaskCard


def _counts(splits: dict[str, Split]) -> tuple[int, int, int]:
    """A card's n-train, n-test, n-val."""
    return len(splits["train"]), len(splits["test"]), len(splits["val"])


def embedded_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    if spec not in EMBEDDED_TASKS:
        raise DataError(f"dataset '{spec}': not in the embedded universe {sorted(EMBEDDED_TASKS)}")
    info = EMBEDDED_TASKS[spec]
    splits = load_embedded(spec, write_dir(options))
    return TaskCard(spec, info.modality, len(info.classes), info.label_kind, *_counts(splits), info.classes), splits


def medmnist_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    flag, info, splits = load_medmnist(spec, options.root, options.image_size, options.download)
    return TaskCard(flag, info.modality, info.n_classes, info.label_kind, *_counts(splits)), splits


def _site_path(spec: str, options: DataOptions) -> Path:
    path = Path(spec).expanduser()
    return Path(options.root).expanduser() / spec if not path.is_absolute() and options.root else path


def folder_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    path = _site_path(spec, options)
    classes, label_kind, splits = load_folder(path, options.image_size, options.skip_unreadable)
    return TaskCard(path.name, "images (site folder)", len(classes), label_kind, *_counts(splits)), splits


def dicom_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    path = _site_path(spec, options)
    classes, label_kind, splits = load_dicom_folder(path, options.image_size, options.skip_unreadable)
    return TaskCard(path.name, "DICOM", len(classes), label_kind, *_counts(splits)), splits


def npz_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    path = _site_path(spec, options)
    layout, splits = load_layout(path)
    return TaskCard(path.stem, layout.modality, layout.n_classes, layout.label_kind, *_counts(splits),
                    layout.classes), splits


def npz_paths(spec: str, options: DataOptions) -> tuple[Path, ...]:
    path = _site_path(spec, options)
    return path, sidecar_path(path)  # a sidecar added, edited or removed changes the task too


def embedded_paths(spec: str, options: DataOptions) -> tuple[Path, ...]:
    return (task_path(write_dir(options), spec),)


def medmnist_paths(spec: str, options: DataOptions) -> tuple[Path, ...]:
    return (resolve(spec, options.root, options.image_size)[1],)


def site_paths(spec: str, options: DataOptions) -> tuple[Path, ...]:
    return (_site_path(spec, options),)
