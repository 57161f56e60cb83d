"""Certificates and keys for a real deployment: a private CA, the SuperLink's TLS
certificate, and one authentication key pair per SuperNode.

    python deploy/make_certs.py --out deploy/secrets --hosts superlink.example.org,10.0.0.5 --nodes 3

Writes ``ca.crt`` (give it to every SuperNode and to ``flwr``), ``ca.key`` (keep
offline), ``server.pem`` / ``server.key`` (the SuperLink's, valid for the given
host names and IP addresses), and ``node-<i>`` / ``node-<i>.pub`` (OpenSSH
ECDSA keys: the private one stays at site i, the public one is registered with
``flwr supernode register node-<i>.pub <connection>``). Checked by hand with
Flower 1.42 (``flower-superlink --ssl-* --enable-supernode-auth`` and
``flower-supernode --root-certificates --auth-supernode-*``). A CA already in
``--out`` is replaced only with ``--force``: every certificate it signed stops working.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEM = serialization.Encoding.PEM


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to a new file, then rename it over ``path``: a private key is owner-only from
    its first byte (no chmod afterwards, no window), and whoever held the old file open does not
    see the new one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)  # left by a crash; O_EXCL below refuses to reuse it
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)


def _refuse_to_replace_ca(out: Path) -> None:
    for name in ("ca.crt", "ca.key"):
        if (out / name).exists():
            raise FileExistsError(f"{out / name} exists; replacing the CA invalidates every certificate it "
                                  f"signed, pass --force (force=True) to do it anyway")


def make_certs(out: Path, hosts: list[str], nodes: int, days: int = 365, force: bool = False) -> None:
    """Make the CA, the SuperLink's certificate for ``hosts`` and ``nodes`` SuperNode key pairs in
    ``out``; an existing CA there is replaced only with ``force``."""
    if not hosts:
        raise ValueError("--hosts: name at least one host name or IP address of the SuperLink")
    if not force:
        _refuse_to_replace_ca(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = {"not_valid_before": now - datetime.timedelta(minutes=5),
                "not_valid_after": now + datetime.timedelta(days=days)}
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("MedUniverse CA")).issuer_name(_name("MedUniverse CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(validity["not_valid_before"]).not_valid_after(validity["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(validity["not_valid_before"]).not_valid_after(validity["not_valid_after"])
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(_subject_alt_names(hosts), critical=False)
              .sign(ca_key, hashes.SHA256()))
    private = serialization.PrivateFormat.PKCS8
    _write(out / "ca.crt", ca.public_bytes(PEM), private=False)
    _write(out / "ca.key", ca_key.private_bytes(PEM, private, serialization.NoEncryption()), private=True)
    _write(out / "server.pem", server.public_bytes(PEM), private=False)
    _write(out / "server.key", server_key.private_bytes(PEM, private, serialization.NoEncryption()), private=True)
    for index in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(out / f"node-{index}", key.private_bytes(PEM, serialization.PrivateFormat.OpenSSH,
                                                        serialization.NoEncryption()), private=True)
        _write(out / f"node-{index}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH), private=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hosts", required=True, help="comma list of the SuperLink's host names / IP addresses")
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode authentication key pairs to make")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--force", action="store_true", help="replace a CA that --out already holds")
    args = parser.parse_args()
    try:
        make_certs(args.out, [h.strip() for h in args.hosts.split(",") if h.strip()], args.nodes, args.days,
                   args.force)
    except (ValueError, FileExistsError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote the CA, the SuperLink certificate and {args.nodes} SuperNode key pairs to {args.out}")


if __name__ == "__main__":
    main()
