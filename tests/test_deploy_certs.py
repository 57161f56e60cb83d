import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from deploy.make_certs import make_certs


def test_certificates_chain_to_the_ca_and_cover_the_hosts(tmp_path):
    out = tmp_path / "secrets"
    subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out", str(out),
                    "--hosts", "localhost,127.0.0.1", "--nodes", "2"], check=True, capture_output=True)
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the chain is wrong
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for index in range(2):
        private = load_ssh_private_key((out / f"node-{index}").read_bytes(), password=None)
        public = load_ssh_public_key((out / f"node-{index}.pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (out / f"node-{index}").stat().st_mode & 0o077 == 0  # private keys: owner only
    assert (out / "ca.key").stat().st_mode & 0o077 == 0


def test_missing_hosts_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out", str(tmp_path),
                             "--hosts", " , "], capture_output=True, text=True)
    assert result.returncode == 2 and "--hosts: name at least one host" in result.stderr


def test_private_keys_are_owner_only_from_their_first_byte(tmp_path, monkeypatch):
    """No chmod after the write: each file already has its final mode when it is created, whatever
    the umask (0 here), so no other user can ever read a private key."""
    at_creation, renamed = {}, {}
    real_open, real_replace = os.open, os.replace

    def open_spy(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT:
            at_creation[str(path)] = os.fstat(fd).st_mode & 0o777
        return fd

    def replace_spy(src, dst, *args, **kwargs):
        renamed[Path(dst).name] = at_creation[str(src)]
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_spy)
    monkeypatch.setattr(os, "replace", replace_spy)
    umask = os.umask(0)
    try:
        make_certs(tmp_path, ["localhost"], nodes=1)
    finally:
        os.umask(umask)
    assert renamed == {"ca.crt": 0o644, "ca.key": 0o600, "server.pem": 0o644, "server.key": 0o600,
                       "node-0": 0o600, "node-0.pub": 0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(renamed)  # no partial files left


def test_an_existing_ca_is_replaced_only_with_force(tmp_path):
    make_certs(tmp_path, ["localhost"], nodes=0)
    ca = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(FileExistsError, match=r"ca.crt exists; .*--force"):
        make_certs(tmp_path, ["localhost"], nodes=0)
    command = [sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out", str(tmp_path), "--hosts", "localhost"]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr == f"error: {tmp_path / 'ca.crt'} exists; replacing the CA invalidates every " \
                             f"certificate it signed, pass --force (force=True) to do it anyway\n"
    assert (tmp_path / "ca.crt").read_bytes() == ca
    subprocess.run(command + ["--force"], check=True, capture_output=True)
    assert (tmp_path / "ca.crt").read_bytes() != ca
