import subprocess
import sys

from conftest import ROOT
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key


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
