"""MedMNIST files, image folders and DICOM: loading, cards and one-line errors (tiny files made here)."""

import csv

import numpy as np
import pydicom
import pytest
from conftest import RGB_FLAGS, write_medmnist
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from meduniverse_flwr.data.dicom import read_dicom
from meduniverse_flwr.data.medmnist import FLAGS
from meduniverse_flwr.data.node_task import load_dataset, load_node_task
from meduniverse_flwr.data.npz import DataError
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.registry import dataset_name


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_every_medmnist_flag_loads_with_its_card(flag, size, tmp_path):
    write_medmnist(tmp_path, flag, size)
    options = DataOptions(source="medmnist", root=str(tmp_path), image_size=size)
    task = load_node_task(flag, 0, 1, options)
    info = FLAGS[flag]
    assert (task.card.name, task.card.n_classes, task.card.label_kind) == (flag, info.n_classes, info.label_kind)
    assert task.card.n_train == 12 and len(task.val) == 4 and len(task.test) == 6
    channels = 3 if flag in RGB_FLAGS else 1
    assert task.train.images.shape == (12, channels, size, size)
    if flag == "chestmnist":
        assert task.train.labels.shape == (12, 14) and task.train.labels.dtype.is_floating_point
    else:
        assert task.train.labels.shape == (12,)


def test_medmnist_by_path_and_resized_to_the_model(tmp_path):
    path = write_medmnist(tmp_path, "pneumoniamnist", 28)
    options = DataOptions(image_size=64)
    task = load_node_task(f"medmnist:{path}", 0, 1, options)
    assert task.card.name == "pneumoniamnist" == dataset_name(f"medmnist:{path}", "embedded")
    assert task.train.images.shape == (12, 1, 64, 64)


def test_medmnist_missing_file_and_unknown_flag(tmp_path):
    options = DataOptions(source="medmnist", root=str(tmp_path), image_size=64)
    with pytest.raises(DataError, match=r"bloodmnist_64.npz: not found; download it with the medmnist") as err:
        load_dataset("bloodmnist", options)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="'lungmnist': unknown flag"):
        load_dataset("lungmnist", options)
    with pytest.raises(DataError, match="unknown source 'hub'"):
        load_dataset("hub:x", options)


def test_medmnist_dirichlet_shards_cover_the_train_split(tmp_path):
    write_medmnist(tmp_path, "bloodmnist", n=(40, 16, 16))
    options = DataOptions(source="medmnist", root=str(tmp_path), partition="dirichlet", dirichlet_alpha=100.0)
    shards = [load_node_task("bloodmnist", s, 2, options) for s in range(2)]
    assert sum(t.card.n_train for t in shards) == 40


def write_png(path, value, size=20, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0)).save(path)


def test_class_folders(tmp_path):
    for split in ("train", "val", "test"):
        for cls, value in (("benign", 40), ("malignant", 200)):
            for i in range(3):
                write_png(tmp_path / "site-a" / split / cls / f"{i}.png", value, mode="RGB" if i else "L")
    card, splits = load_dataset("folder:site-a", DataOptions(root=str(tmp_path), image_size=28))
    assert (card.name, card.n_classes, card.label_kind, card.n_train) == ("site-a", 2, "binary", 6)
    assert splits["train"].images.shape == (6, 28, 28, 3)
    assert splits["test"].labels[:, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_csv_multilabel_and_unreadable_images(tmp_path):
    root = tmp_path / "site-b"
    rows = [["split", "path", "effusion", "nodule"]]
    for split in ("train", "val", "test"):
        for i in range(2):
            write_png(root / f"{split}{i}.png", 100 + i)
            rows.append([split, f"{split}{i}.png", str(i), "1"])
    (root / "broken.png").write_bytes(b"not a png")
    rows.append(["train", "broken.png", "0", "0"])
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(DataError, match=r"image .*broken.png: cannot be read"):
        load_dataset(f"folder:{root}", DataOptions(image_size=28))
    card, splits = load_dataset(f"folder:{root}", DataOptions(image_size=28, skip_unreadable=True))
    assert (card.n_classes, card.label_kind, card.n_train) == (2, "multilabel", 2)
    assert splits["train"].labels.tolist() == [[0, 1], [1, 1]]


def write_dicom(path, pixels=None, slope=1.0, intercept=-1024.0, photometric="MONOCHROME2", window=(40, 400),
                voi_lut=None):
    """``window``: (centre, width), each a number or a list (multi-valued); ``voi_lut``: (descriptor, data)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Modality, ds.SOPInstanceUID = "CT", meta.MediaStorageSOPInstanceUID
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = (pixels.shape[2] if pixels.ndim == 3 else 1), photometric
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if voi_lut is not None:
            descriptor, data = voi_lut
            item = pydicom.Dataset()
            item.add_new("LUTDescriptor", "US", descriptor)
            item.add_new("LUTData", "OW", np.asarray(data, dtype="<u2").tobytes())  # OW, as scanners write it
            ds.VOILUTSequence = [item]
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_folder_rescale_window_and_missing_pixels(tmp_path):
    root = tmp_path / "ct-site"
    rows = [["split", "path", "label"]]
    for split in ("train", "val", "test"):
        for label, stored in ((0, 1024 - 1000), (1, 1024 + 40)):  # air and soft tissue after rescale
            write_dicom(root / f"{split}{label}.dcm", np.full((16, 16), stored))
            rows.append([split, f"{split}{label}.dcm", str(label)])
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    card, splits = load_dataset(f"dicom:{root}", DataOptions(image_size=28))
    assert (card.name, card.modality, card.n_classes) == ("ct-site", "DICOM", 2)
    images = splits["train"].images
    assert images.shape == (2, 28, 28)
    assert images[0].max() == 0 and images[1].min() in (127, 128)  # HU -1000 below the window, HU 40 its centre

    write_dicom(root / "empty.dcm", pixels=None)
    with open(root / "labels.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["train", "empty.dcm", "0"])
    with pytest.raises(DataError, match=r"DICOM .*empty.dcm: has no pixel data"):
        load_dataset(f"dicom:{root}", DataOptions(image_size=28))


GRADIENT = np.arange(256).reshape(16, 16) * 16  # stored 0..4080, brightest at the last pixel


@pytest.mark.parametrize("window", [None, ([2040, 100], [4000, 1])], ids=["percentile", "multi-valued-window"])
def test_dicom_monochrome1_is_inverted(window, tmp_path):
    # the second window (width 1) would saturate everything: only the first one may be used
    decoded = {}
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        path = tmp_path / f"{photometric}.dcm"
        write_dicom(path, GRADIENT, slope=1.0, intercept=0.0, photometric=photometric, window=window)
        decoded[photometric] = read_dicom(path, 16).astype(int)
    assert len(np.unique(decoded["MONOCHROME2"])) > 100
    assert np.abs(decoded["MONOCHROME1"] - (255 - decoded["MONOCHROME2"])).max() <= 1
    assert decoded["MONOCHROME1"][15, 15] == 0 and decoded["MONOCHROME2"][15, 15] == 255


def test_dicom_voi_lut_sequence_wins_over_the_window(tmp_path):
    stored = np.arange(256).reshape(16, 16)
    step = [0] * 128 + [65535] * 128  # non-linear: low half black, high half white
    path = tmp_path / "lut.dcm"
    write_dicom(path, stored, slope=1.0, intercept=0.0, voi_lut=([256, 0, 16], step))  # keeps the 40/400 window too
    image = read_dicom(path, 16)
    assert (image[stored < 128] == 0).all() and (image[stored >= 128] == 255).all()


@pytest.mark.parametrize("photometric", ["RGB", "PALETTE COLOR"])
def test_dicom_colour_is_rejected_in_one_line(photometric, tmp_path):
    pixels = np.zeros((16, 16, 3) if photometric == "RGB" else (16, 16))
    path = tmp_path / "colour.dcm"
    write_dicom(path, pixels, photometric=photometric)
    with pytest.raises(DataError, match=rf"DICOM .*colour.dcm: PhotometricInterpretation '{photometric}'") as err:
        read_dicom(path, 16)
    assert "\n" not in str(err.value)
