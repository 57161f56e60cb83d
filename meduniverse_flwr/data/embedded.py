"""The embedded default universe: small labelled tasks cut from real medical images
that installed packages ship (scikit-image, nilearn, pydicom), so ``flwr run .``
works offline on a fresh machine.

It is a demonstration universe, not a benchmark: each task is many 28 x 28
patches of one or a few source images, labelled by a classical rule at the
patch centre (docs/data.md "Embedded default data" documents each one). To limit
leakage between overlapping patches, the train / val / test splits come from
disjoint bands of the source image (or disjoint slices, for the brain).

Each task is built once into ``<root>/<task>.npz`` (MedMNIST format) and reused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meduniverse_flwr.data.npz import SPLITS, Split, read_npz, write_npz

PATCH = 28
SPLIT_SIZES = {"train": 1000, "val": 200, "test": 400}
BUILD_SEED = 20240720  # fixed: the universe is the same on every machine
VERSION = "v1"  # bump when a builder changes, so stale caches are not reused


@dataclass(frozen=True)
class EmbeddedTask:
    name: str
    modality: str
    classes: tuple[str, ...]
    label_kind: str
    source: str
    build: Callable[[np.random.Generator], dict[str, Split]]


def _band_split(centres_row: np.ndarray, band: int) -> np.ndarray:
    """Split index per centre: bands of ``band`` rows cycle train x7, val x1, test x2."""
    cycle = (centres_row // band) % 10
    return np.select([cycle < 7, cycle == 7], [0, 1], default=2)


def _sample(
    image: np.ndarray,
    label_map: np.ndarray,
    split_map: np.ndarray,
    n_classes: int,
    rng: np.random.Generator,
    sizes: dict[str, int] = SPLIT_SIZES,
) -> dict[str, Split]:
    """Class-balanced patches centred on labelled pixels; ``label_map`` -1 means unusable."""
    half = PATCH // 2
    valid = np.zeros(label_map.shape, dtype=bool)
    valid[half : label_map.shape[0] - half, half : label_map.shape[1] - half] = True
    out = {}
    for split_index, split in enumerate(SPLITS):
        per_class = sizes[split] // n_classes
        rows_all, cols_all, labels = [], [], []
        for label in range(n_classes):
            ys, xs = np.nonzero(valid & (label_map == label) & (split_map == split_index))
            if len(ys) == 0:
                raise RuntimeError(f"embedded data: class {label} has no pixel in split {split}")
            pick = rng.choice(len(ys), size=per_class, replace=len(ys) < per_class)
            rows_all.append(ys[pick])
            cols_all.append(xs[pick])
            labels.append(np.full(per_class, label))
        rows, cols, y = np.concatenate(rows_all), np.concatenate(cols_all), np.concatenate(labels)
        order = rng.permutation(len(y))
        patches = np.stack([image[r - half : r + half, c - half : c + half] for r, c in zip(rows[order], cols[order])])
        out[split] = Split(images=patches.astype(np.uint8), labels=y[order, None].astype(np.int64))
    return out


def _to_uint8(x: np.ndarray, low: float, high: float) -> np.ndarray:
    return (np.clip((x - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)


def _fundus_vessel(rng: np.random.Generator) -> dict[str, Split]:
    from scipy import ndimage
    from skimage import data, filters, morphology, transform

    rgb = transform.rescale(data.retina(), 0.5, channel_axis=2, anti_aliasing=True)  # 706 x 706
    green = rgb[..., 1]
    field_of_view = ndimage.binary_erosion(rgb.sum(axis=2) > 0.15, morphology.disk(8))
    vesselness = filters.sato(green, sigmas=[1.5, 3.0], black_ridges=True)
    threshold = np.percentile(vesselness[field_of_view], 88)
    vessel = (vesselness > threshold) & field_of_view
    near_vessel = ndimage.binary_dilation(vessel, morphology.disk(4))
    labels = np.full(green.shape, -1)
    labels[field_of_view & ~near_vessel] = 0
    labels[vessel] = 1
    rows = np.arange(green.shape[0])[:, None].repeat(green.shape[1], axis=1)
    return _sample((rgb * 255).round().astype(np.uint8), labels, _band_split(rows, 24), 2, rng)


def _histology_stain(rng: np.random.Generator) -> dict[str, Split]:
    from skimage import color, data, filters

    rgb = data.immunohistochemistry()  # 512 x 512
    hed = color.rgb2hed(rgb)
    haem = filters.gaussian(hed[..., 0], sigma=2)
    dab = filters.gaussian(hed[..., 2], sigma=2)
    labels = np.full(haem.shape, -1)
    labels[(haem < np.percentile(haem, 35)) & (dab < np.percentile(dab, 35))] = 0  # unstained
    labels[(haem > np.percentile(haem, 75)) & (dab < np.percentile(dab, 50))] = 1  # hematoxylin
    labels[dab > np.percentile(dab, 85)] = 2  # DAB-positive
    rows = np.arange(rgb.shape[0])[:, None].repeat(rgb.shape[1], axis=1)
    return _sample(rgb, labels, _band_split(rows, 16), 3, rng)


def _brain_tissue(rng: np.random.Generator) -> dict[str, Split]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        t1 = datasets.load_mni152_template(resolution=1).get_fdata()
        grey = datasets.load_mni152_gm_template(resolution=1).get_fdata()
        white = datasets.load_mni152_wm_template(resolution=1).get_fdata()
        mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0
    # axial slices through the cerebrum; the slice index decides the split
    slices = range(60, 140, 2)
    images, label_maps, split_maps = [], [], []
    for z in slices:
        labels = np.full(t1.shape[:2], -1)
        labels[mask[..., z] & (grey[..., z] < 0.15) & (white[..., z] < 0.15)] = 2  # CSF / other
        labels[grey[..., z] > 0.6] = 0
        labels[white[..., z] > 0.6] = 1
        labels[:, : PATCH // 2] = labels[:, -PATCH // 2 :] = -1  # no patch straddles two slices
        images.append(_to_uint8(t1[..., z], 0, np.percentile(t1, 99.5)))
        label_maps.append(labels)
        split_maps.append(np.full(labels.shape, [0, 0, 0, 0, 0, 0, 0, 1, 2, 2][(z // 2) % 10]))
    # tile the slices side by side so one sampler serves all of them
    return _sample(np.hstack(images), np.hstack(label_maps), np.hstack(split_maps), 3, rng)


def _ct_tissue(rng: np.random.Generator) -> dict[str, Split]:
    import pydicom
    from pydicom.data import get_testdata_file
    from skimage import transform

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu = transform.rescale(hu, 2, order=1)  # 256 x 256: a 28 px patch sees 14 source px
    labels = np.full(hu.shape, -1)
    labels[hu < -400] = 0  # air / gas
    labels[(hu > -150) & (hu < -40)] = 1  # fat
    labels[(hu > 10) & (hu < 90)] = 2  # soft tissue
    labels[hu > 300] = 3  # bone
    rows = np.arange(hu.shape[0])[:, None].repeat(hu.shape[1], axis=1)
    return _sample(_to_uint8(hu, -1000, 1000), labels, _band_split(rows, 12), 4, rng)


TASKS: dict[str, EmbeddedTask] = {
    task.name: task
    for task in (
        EmbeddedTask("fundus-vessel", "fundus photography", ("background", "vessel"), "binary",
                     "scikit-image data.retina()", _fundus_vessel),
        EmbeddedTask("histology-stain", "histopathology (IHC)", ("unstained", "hematoxylin", "DAB"), "multiclass",
                     "scikit-image data.immunohistochemistry()", _histology_stain),
        EmbeddedTask("brain-tissue", "brain MRI (T1)", ("grey matter", "white matter", "CSF/other"), "multiclass",
                     "nilearn MNI152 T1 template with its GM/WM maps", _brain_tissue),
        EmbeddedTask("ct-tissue", "CT", ("air", "fat", "soft tissue", "bone"), "multiclass",
                     "pydicom test file CT_small.dcm", _ct_tissue),
    )
}


def task_path(root: Path, name: str) -> Path:
    return Path(root) / f"embedded-{VERSION}" / f"{name}.npz"


def load_embedded(name: str, root: Path) -> dict[str, Split]:
    """The task's splits, built into the cache on first use."""
    if name not in TASKS:
        raise ValueError(f"embedded dataset '{name}': unknown, choose from {sorted(TASKS)}")
    task = TASKS[name]
    path = task_path(root, name)
    if not path.is_file():
        seed = np.random.SeedSequence([BUILD_SEED, *name.encode()])
        write_npz(path, task.build(np.random.default_rng(seed)))
    return read_npz(path, len(task.classes), task.label_kind)
