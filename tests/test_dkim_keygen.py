"""elemtactl dkim keygen: the key it writes signs mail that verifies against the record it
prints (dkimpy verifies, given that record as the DNS answer)."""

import os
import re
import stat
import subprocess
import sys

import dkim
import pytest

from tests.harness import REPO

MESSAGE = (b"From: a@example.test\r\nTo: b@example.net\r\nSubject: keygen\r\n"
           b"Date: Tue, 24 Nov 2026 17:00:00 +0000\r\n\r\nSigned body.\r\n")


def keygen(*args):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "dkim", "keygen"]
                          + list(args), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.parametrize("algorithm, signature_algorithm", [
    ("rsa-sha256", b"rsa-sha256"), ("ed25519-sha256", b"ed25519-sha256")])
def test_generated_key_signs_and_the_printed_record_verifies(tmp_path, algorithm,
                                                             signature_algorithm):
    key_file = str(tmp_path / "s1.pem")
    result = keygen("-d", "example.test", "-s", "s1", "-a", algorithm, "-k", key_file)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    zone_line = result.stdout.splitlines()[-1]
    assert zone_line.startswith("s1._domainkey.example.test. IN TXT ( ")
    record = "".join(re.findall(r'"([^"]*)"', zone_line)).encode()
    with open(key_file, "rb") as f:
        private = f.read().strip()
    signed = dkim.sign(MESSAGE, b"s1", b"example.test", private,
                       signature_algorithm=signature_algorithm) + MESSAGE

    def dns(name, timeout=5):
        assert name == b"s1._domainkey.example.test."
        return record

    assert dkim.verify(signed, dnsfunc=dns)


def test_never_overwrites_a_key(tmp_path):
    key_file = tmp_path / "s1.pem"
    key_file.write_text("precious\n")
    result = keygen("-d", "example.test", "-s", "s1", "-k", str(key_file))
    assert result.returncode == 73
    assert "exists; a key is never overwritten" in result.stderr
    assert key_file.read_text() == "precious\n"


def test_bad_selector_is_a_usage_error(tmp_path):
    result = keygen("-d", "example.test", "-s", "bad selector", "-k", str(tmp_path / "k"))
    assert result.returncode == 64 and "not a valid DNS name" in result.stderr
