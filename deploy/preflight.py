"""``python -m deploy.launch check <the supernode's arguments>``: what a site can find out before
its SuperNode joins a federation, with the exact command line it will start the node with.

It builds the node config that SuperNode would get, parses it as the node does, loads the site's
data as the node does (printing its task card and class balance), checks its image headers, that
the node can write where it writes and read its privacy ledger, that its private key is private,
and that the SuperLink answers a TLS handshake with the deployment's CA. Every problem is one
``problem: ...`` line on stderr and the exit status is 1; none: ``check: <site> ready``, status 0.
"""

from __future__ import annotations

import socket
import ssl
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from click import ClickException
from flwr.common.config import parse_config_args
from PIL import Image, UnidentifiedImageError

from deploy.command_line import node_config_string, require_tls
from deploy.errors import LaunchError
from meduniverse_flwr.config import ConfigError, RunConfig
from meduniverse_flwr.data.dicom import GRAYSCALE
from meduniverse_flwr.data.folder import read_class_folders, read_labels_csv
from meduniverse_flwr.data.node_task import NodeTask, load_node_task, parse_entry
from meduniverse_flwr.data.npz import DataError
from meduniverse_flwr.data.sources import site_paths
from meduniverse_flwr.node.ledger import Refused, ledger_path, read_ledger, spent
from meduniverse_flwr.node.site import Site, site_from

TIMEOUT_S = 10


def check(superlink: str, dataset: str, data_root: str, ca: Path | None, key: Path | None, insecure: bool,
          site_settings: Mapping[str, object], image_size: int | None = None) -> int:
    """Run every check, print what it found; 0 if the site is ready, else 1 (problems on stderr)."""
    problems: list[str] = []
    site, run_config = _site(dataset, data_root, site_settings, image_size, problems)
    name = None
    if site is not None:
        problems += _write_dir(site)
        if site.has_floor:
            problems += _ledger(site)
        name = _data(site, run_config, problems)
    problems += _key(ca, key, insecure)
    problems += _superlink(superlink, ca, insecure)
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"check: {name} ready")
    return 0


def _site(dataset: str, data_root: str, site_settings: Mapping[str, object], image_size: int | None,
          problems: list[str]) -> tuple[Site | None, RunConfig | None]:
    """The site as its node would parse it, from the node config ``supernode`` would pass."""
    try:
        run_config = RunConfig.with_defaults(**({} if image_size is None else {"image_size": image_size}))
        text = node_config_string({"dataset": dataset, "data-root": data_root, **site_settings})
        node_config = parse_config_args([text])  # Flower's own parser, as flower-supernode runs it
        return site_from(node_config, run_config.to_run_config()), run_config
    except (ConfigError, LaunchError) as err:
        problems.append(str(err))
    except ClickException as err:  # Flower's parser refused the string
        problems.append(f"node config {text!r}: {err.message}")
    return None, None


def _write_dir(site: Site) -> list[str]:
    path = site.write_dir()
    key = "cache-dir" if site.cache_dir else "data-root"
    try:
        path.mkdir(parents=True, exist_ok=True)  # the node makes it on its first write too
        with tempfile.NamedTemporaryFile(dir=path, prefix=".check-"):
            pass
    except OSError as err:
        return [f"write dir {path} ({key}): not writable ({err.strerror or err})"]
    print(f"write dir {path} ({key}): writable")
    return []


def _ledger(site: Site) -> list[str]:
    path = ledger_path(site.write_dir())
    try:
        ledger = read_ledger(path)
    except Refused as err:
        return [str(err)]
    spending = ", ".join(f"{name} {spent(events, site.max_epsilon_delta):.4g}" for name, events in ledger.items())
    print(f"privacy floor: require-dp={site.require_dp!r}, max-epsilon={site.max_epsilon} at delta "
          f"{site.max_epsilon_delta}; ledger {path}: "
          f"{f'epsilon spent {spending}' if spending else 'nothing spent yet'}")
    return []


def _data(site: Site, run_config: RunConfig, problems: list[str]) -> str | None:
    """Load the site's data; print its card and balance. The card's name, or None if it did not load."""
    try:
        options = site.data_options(run_config.to_run_config(), run_config.image_size)
        source, spec = parse_entry(site.dataset, site.source)
        if source in ("folder", "dicom"):
            refusals = _source_images(source, site_paths(spec, options)[0], run_config.image_size,
                                      site.skip_unreadable)
            if refusals:  # the load would stop at the first such file; the headers named every one
                problems += refusals
                return None
        task = load_node_task(site.dataset, 0, 1, options)
    except (DataError, ConfigError, OSError) as err:
        problems.append(str(err))
        return None
    problems += _card_and_balance(site.dataset, task)
    return task.card.name


def _card_and_balance(entry: str, task: NodeTask) -> list[str]:
    card = task.card
    names = list(card.classes) or [str(index) for index in range(card.n_classes)]
    print(f"task card: {card.name} ({card.modality}), {card.n_classes} classes ({card.label_kind}): "
          f"{', '.join(names)}; train {card.n_train} / val {card.n_val} / test {card.n_test}")
    what = "positives per label" if card.label_kind == "multilabel" else "examples per class"
    balance = {}
    for split in ("train", "val", "test"):
        labels = getattr(task, split).labels
        counts = labels.sum(0).int() if card.label_kind == "multilabel" else labels.bincount(minlength=card.n_classes)
        balance[split] = counts.tolist()
        print(f"{split} {what}: " + ", ".join(f"{name} {n}" for name, n in zip(names, balance[split])))
    absent = [name for name, n in zip(names, balance["train"]) if n == 0]
    if absent:  # a class the node never trains on: its head cannot learn it
        what = "positive training example of label" if card.label_kind == "multilabel" else "training example of class"
        return [f"dataset '{entry}': no {what} {', '.join(absent)}"]
    return []


def _source_images(source: str, root: Path, image_size: int, skip_unreadable: bool) -> list[str]:
    """Print the range of source image sizes; for DICOM, the files whose PhotometricInterpretation
    the loader refuses (a note instead when skip-unreadable drops them)."""
    files = _listed_files(source, root)
    read = [(path, header) for path in files
            for header in [_dicom_header(path) if source == "dicom" else _image_header(path)]
            if header is not None]  # the load names the files that cannot be read
    _print_sizes([(rows, columns) for _, (_, rows, columns) in read if rows and columns], image_size)
    refused: dict[str, list[Path]] = {}
    for path, (photometric, _, _) in read:
        if source == "dicom" and photometric not in GRAYSCALE:
            refused.setdefault(str(photometric), []).append(path)
    lines = [f"DICOM {root}: {len(paths)} files have PhotometricInterpretation {kind!r} (first: {paths[0]}); "
             f"only {'/'.join(GRAYSCALE)} are supported" for kind, paths in refused.items()]
    if skip_unreadable:
        for line in lines:
            print(f"note: {line}; skipped (skip-unreadable)")
        return []
    return lines


def _print_sizes(sizes: list[tuple[int, int]], image_size: int) -> None:
    if not sizes:
        return
    rows, columns = zip(*sizes)
    print(f"source images: {len(sizes)}, rows {min(rows)}..{max(rows)} x columns {min(columns)}..{max(columns)}")
    small = sum(r < image_size or c < image_size for r, c in sizes)
    if small:
        print(f"note: {small} source images are smaller than the model's {image_size}x{image_size}; they are upsampled")


def _listed_files(source: str, root: Path) -> list[Path]:
    if (root / "labels.csv").is_file():
        entries = read_labels_csv(root)[2]
    elif source == "folder" and root.is_dir():
        entries = read_class_folders(root)[2]
    else:
        return []  # the load names what is missing
    return [path for paths, _ in entries.values() for path in paths]


def _dicom_header(path: Path) -> tuple[str | None, int | None, int | None] | None:
    import pydicom  # only DICOM sites need it

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # pydicom raises many types for a malformed file; the load names it
        return None
    return ds.get("PhotometricInterpretation"), ds.get("Rows"), ds.get("Columns")


def _image_header(path: Path) -> tuple[None, int, int] | None:
    try:
        with Image.open(path) as image:  # reads the header only
            columns, rows = image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return None, rows, columns


def _key(ca: Path | None, key: Path | None, insecure: bool) -> list[str]:
    try:
        require_tls(ca is not None, insecure, "supernode")
    except LaunchError as err:
        return [str(err)]
    if insecure:
        return []
    if key is None:
        return ["supernode: --key is required with TLS (the SuperLink authenticates every node)"]
    if not key.is_file():
        return [f"key file {key}: {'is not a file' if key.exists() else 'does not exist'} (--key)"]
    mode = key.stat().st_mode & 0o777
    if mode & 0o077:
        return [f"key file {key}: mode {mode:o} lets group/others read this site's private key; "
                f"run chmod 600 {key}"]
    print(f"key file {key}: mode {mode:o}")
    return []


def _superlink(address: str, ca: Path | None, insecure: bool) -> list[str]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 address is written [::1]:9092
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return [f"--superlink {address!r}: expected host:port"]
    if ca is None and not insecure:
        return []  # _key named the missing --ca
    try:
        context = None if insecure else _tls_context(ca)
    except (OSError, ssl.SSLError) as err:
        return [f"--ca {ca}: not a usable CA certificate ({err.strerror or err})"]
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
            if context is not None:
                context.wrap_socket(sock, server_hostname=host).close()
    except ssl.SSLCertVerificationError as err:
        return [f"superlink {address}: certificate verify failed ({err.verify_message}) against --ca {ca}"]
    except OSError as err:  # refused, unreachable, timed out, unknown host, TLS alerts
        return [f"superlink {address}: {'connection' if insecure else 'TLS handshake'} failed "
                f"({err.strerror or err})"]
    print(f"superlink {address}: " + ("TCP connect ok; TLS not checked (--insecure)" if insecure
                                      else f"TLS handshake ok, certificate verified against {ca}"))
    return []


def _tls_context(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])  # what a gRPC client offers; a SuperLink may insist on it
    return context
