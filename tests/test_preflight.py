"""`python -m deploy.launch check`: every problem it reports, and a clean site; in-process, with a
TLS server on 127.0.0.1 in a thread standing in for the SuperLink."""

import contextlib
import csv
import json
import os
import shutil
import socket
import ssl
import threading

import numpy as np
import pytest
from conftest import write_medmnist
from PIL import Image
from test_real_data import write_dicom

from deploy import launch
from deploy.make_certs import make_certs
from meduniverse_flwr.node.site import SITE_KEYS


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    make_certs(out, ["localhost"], nodes=1)
    return out


@contextlib.contextmanager
def tls_server(certs):
    """A listener on 127.0.0.1 that completes a TLS handshake with whoever connects (until closed)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopped = threading.Event()

    def serve():
        while not stopped.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError):  # a client that rejects our certificate aborts the handshake
                conn.settimeout(5)
                context.wrap_socket(conn, server_side=True).close()
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopped.set()
        thread.join()
        listener.close()


@pytest.fixture
def superlink(certs):
    with tls_server(certs) as port:
        yield f"localhost:{port}"


@pytest.fixture
def site(tmp_path, certs, superlink):
    """A clean site's `check` arguments; a test replaces or adds what it breaks."""
    npz = write_medmnist(tmp_path, "pneumoniamnist", n=(48, 16, 16), seed=0)
    return {"--superlink": superlink, "--ca": certs / "ca.crt", "--key": certs / "node-0",
            "--dataset": f"medmnist:{npz}", "--cache-dir": tmp_path / "cache"}


def run_check(capsys, arguments, *flags):
    argv = ["check", *(str(v) for pair in arguments.items() for v in pair), *flags]
    with pytest.raises(SystemExit) as exit_:
        launch.main(argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def problems(err):
    return [line for line in err.splitlines() if line.startswith("problem: ")]


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_dicom_site(root, photometric_of=lambda split, label: "MONOCHROME2"):
    rows = [["split", "path", "label"]]
    for split in ("train", "val", "test"):
        for label in (0, 1):
            photometric = photometric_of(split, label)
            pixels = np.full((16, 20, 3) if photometric == "RGB" else (16, 20), 1024 + 40 * label)
            write_dicom(root / f"{split}{label}.dcm", pixels, photometric=photometric)
            rows.append([split, f"{split}{label}.dcm", str(label)])
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return root


# ------------------------------------------------------------------------------------ the CLI

def test_site_flags_are_every_site_key_and_only_those_given_reach_the_node_config(monkeypatch):
    assert set(launch.SITE_FLAGS) == set(SITE_KEYS) - {"dataset", "data-root"}
    started = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: started.append(args))
    launch.main(["supernode", "--superlink", "127.0.0.1:1", "--dataset", "ct-tissue", "--insecure",
                 "--cache-dir", "/site/cache", "--download", "--require-dp", "example", "--max-epsilon", "3"])
    node_config = started[0][started[0].index("--node-config") + 1]
    assert node_config == ('dataset="ct-tissue" data-root="" cache-dir="/site/cache" download=true '
                           'require-dp="example" max-epsilon=3.0')


# ------------------------------------------------------------------------------------ a clean site

def test_a_clean_site_is_ready_and_shows_its_card_balance_and_ledger(capsys, site):
    ledger = site["--cache-dir"] / "privacy-ledger.json"
    ledger.parent.mkdir()
    ledger.write_text(json.dumps({"version": 1, "datasets": {"pneumoniamnist": [[1.1, 0.1, 50]]}}))
    code, out, err = run_check(capsys, site, "--max-epsilon", "8")
    assert (code, problems(err)) == (0, [])
    assert "task card: pneumoniamnist (" in out and "2 classes (binary)" in out
    assert "train 48 / val 16 / test 16" in out
    assert "train examples per class: 0 24, 1 24" in out and "test examples per class: 0 8, 1 8" in out
    assert "epsilon spent pneumoniamnist " in out
    assert f"key file {site['--key']}: mode 600" in out
    assert "TLS handshake ok, certificate verified against" in out
    assert out.rstrip().endswith("check: pneumoniamnist ready")


def test_insecure_connects_over_tcp_and_says_tls_was_not_checked(capsys, site):
    del site["--ca"], site["--key"]
    code, out, err = run_check(capsys, site, "--insecure")
    assert (code, problems(err)) == (0, [])
    assert "TCP connect ok; TLS not checked (--insecure)" in out


def test_a_dicom_site_shows_its_source_sizes_and_notes_upsampling(capsys, site, tmp_path):
    site["--dataset"] = f"dicom:{write_dicom_site(tmp_path / 'ct')}"
    code, out, err = run_check(capsys, site)
    assert (code, problems(err)) == (0, [])
    assert "source images: 6, rows 16..16 x columns 20..20" in out
    assert "note: 6 source images are smaller than the model's 28x28; they are upsampled" in out


def test_a_folder_site_shows_the_range_of_its_source_image_sizes(capsys, site, tmp_path):
    for split in ("train", "val", "test"):
        for label, size in (("benign", (40, 30)), ("malignant", (64, 48))):  # PIL: (width, height)
            (tmp_path / "photos" / split / label).mkdir(parents=True)
            Image.new("RGB", size).save(tmp_path / "photos" / split / label / "a.png")
    site["--dataset"] = f"folder:{tmp_path / 'photos'}"
    code, out, err = run_check(capsys, site)
    assert (code, problems(err)) == (0, [])
    assert "source images: 6, rows 30..48 x columns 40..64" in out and "upsampled" not in out
    assert "train examples per class: 0 1, 1 1" in out


# ------------------------------------------------------------------------------------ one test per problem

def test_a_bad_node_config_value(capsys, site):
    code, _, err = run_check(capsys, site, "--max-epsilon", "-1")
    assert code == 1
    assert "problem: node config: 'max-epsilon' = -1.0: must be > 0" in problems(err)


def test_a_missing_dataset(capsys, site, tmp_path):
    site["--dataset"] = f"medmnist:{tmp_path / 'gone' / 'pneumoniamnist.npz'}"
    code, _, err = run_check(capsys, site)
    assert code == 1
    assert problems(err)[0].startswith(f"problem: MedMNIST file {tmp_path / 'gone' / 'pneumoniamnist.npz'}: not found")


def test_an_empty_split(capsys, site, tmp_path):
    (tmp_path / "empty").mkdir()
    site["--dataset"] = f"medmnist:{write_medmnist(tmp_path / 'empty', 'pneumoniamnist', n=(12, 0, 6))}"
    code, _, err = run_check(capsys, site)
    assert code == 1
    assert "'val_images' is empty" in problems(err)[0]


def test_a_class_absent_from_train(capsys, site, tmp_path):
    (tmp_path / "one").mkdir()
    npz = write_medmnist(tmp_path / "one", "pneumoniamnist", n=(1, 4, 6))  # train: class 0 only
    site["--dataset"] = f"medmnist:{npz}"
    code, _, err = run_check(capsys, site)
    assert code == 1
    assert problems(err) == [f"problem: dataset 'medmnist:{npz}': no training example of class 1"]


def test_an_unsupported_dicom_photometric_and_skip_unreadable_turns_it_into_a_note(capsys, site, tmp_path):
    root = write_dicom_site(tmp_path / "ct",
                            lambda split, label: "RGB" if (split, label) == ("train", 1) else "MONOCHROME2")
    site["--dataset"] = f"dicom:{root}"
    code, _, err = run_check(capsys, site)
    assert code == 1
    assert problems(err) == [f"problem: DICOM {root}: 1 files have PhotometricInterpretation 'RGB' "
                             f"(first: {root / 'train1.dcm'}); only MONOCHROME1/MONOCHROME2 are supported"]
    code, out, err = run_check(capsys, site, "--skip-unreadable")
    assert "PhotometricInterpretation 'RGB'" in out and "skipped (skip-unreadable)" in out
    # what the node then trains on lacks class 1: the check says so
    assert (code, problems(err)) == (1, [f"problem: dataset 'dicom:{root}': no training example of class 1"])


def test_an_unwritable_write_dir(capsys, site, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").touch()  # root ignores the mode: a path under a regular file is unwritable to all
        (locked / "probe").unlink()
        (tmp_path / "file").touch()
        write_dir = tmp_path / "file" / "sub"
    except PermissionError:
        write_dir = locked
    site["--cache-dir"] = write_dir
    try:
        code, _, err = run_check(capsys, site)
    finally:
        locked.chmod(0o700)
    assert code == 1
    assert any(line.startswith(f"problem: write dir {write_dir} (cache-dir): not writable") for line in problems(err))


def test_an_unreadable_ledger(capsys, site):
    ledger = site["--cache-dir"] / "privacy-ledger.json"
    ledger.parent.mkdir()
    ledger.write_text("{not json")
    code, _, err = run_check(capsys, site, "--max-epsilon", "3")
    assert code == 1
    assert problems(err)[0].startswith(f"problem: privacy ledger {ledger} cannot be read")


def test_a_key_others_can_read(capsys, site, tmp_path):
    key = tmp_path / "node-0"
    shutil.copy(site["--key"], key)
    key.chmod(0o644)
    site["--key"] = key
    code, _, err = run_check(capsys, site)
    assert code == 1
    assert problems(err) == [f"problem: key file {key}: mode 644 lets group/others read this site's private key; "
                             f"run chmod 600 {key}"]


def test_a_missing_key(capsys, site, tmp_path):
    site["--key"] = tmp_path / "no-such-key"
    code, _, err = run_check(capsys, site)
    assert code == 1
    assert problems(err) == [f"problem: key file {tmp_path / 'no-such-key'}: does not exist (--key)"]


def test_a_superlink_whose_certificate_another_ca_signed(capsys, site, tmp_path):
    make_certs(tmp_path / "other", ["localhost"], nodes=1)
    site["--ca"] = tmp_path / "other" / "ca.crt"
    code, _, err = run_check(capsys, site)
    assert code == 1
    assert problems(err)[0].startswith(f"problem: superlink {site['--superlink']}: certificate verify failed (")


def test_a_superlink_that_refuses_the_connection(capsys, site):
    site["--superlink"] = f"127.0.0.1:{closed_port()}"
    code, _, err = run_check(capsys, site)
    assert code == 1
    assert problems(err) == [f"problem: superlink {site['--superlink']}: TLS handshake failed (Connection refused)"]
