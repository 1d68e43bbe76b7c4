"""A private pebble (Let's Encrypt's ACME test server, Debian package pebble) on loopback.

Owned by no Elemta process: tests of the built-in ACME client (tests/test_acme.py) start
it. pebble's own HTTPS listener gets a certificate from a throw-away CA made here
(`ca_file`, what acme.ca_file names); the certificates it issues chain to a root it makes
at start, fetched from its management interface (`issuer_root()`). Its validation
authority looks names up at the DNS server given (NSD, tests/peers/nsd.py) and connects
to http_port, where Elemta's HTTP-01 responder listens, or for TLS-ALPN-01 to tls_port. PEBBLE_VA_NOSLEEP=1: validation
at once; PEBBLE_WFE_NONCEREJECT=0: no random badNonce; PEBBLE_AUTHZREUSE=0: every order
validates every name again.

    with PebbleInstance(tmpdir, http_port=8080, dns_port=dns.port) as pebble:
        pebble.directory_url, pebble.ca_file, pebble.issuer_root()
"""

import datetime
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request

from tests.peers.process import stop_process

PEBBLE = "/usr/bin/pebble"


def pebble_available():
    """None, or why pebble cannot run here."""
    if not os.path.exists(PEBBLE):
        return "pebble is not installed (apt-get install pebble)"
    return None


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_https_files(directory):
    """(CA certificate, server certificate, server key) for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [os.path.join(directory, name) for name in ("ca.pem", "cert.pem", "key.pem")]
    for path, data in zip(paths, (
            ca.public_bytes(serialization.Encoding.PEM),
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))):
        with open(path, "wb") as f:
            f.write(data)
    return paths


class PebbleInstance:
    """One private pebble: `with PebbleInstance(workdir, http_port, dns_port) as p:`."""

    def __init__(self, workdir, http_port, dns_port, validity=None, tls_port=None):
        """validity: seconds the certificates it issues are valid (pebble's default:
        five years); tls_port: where it makes TLS-ALPN-01 handshakes."""
        self.workdir = str(workdir)
        self.validity = validity
        self.http_port = http_port
        self.tls_port = tls_port or _free_port()
        self.dns_port = dns_port
        self.port = _free_port()
        self.management_port = _free_port()
        self.log_path = os.path.join(self.workdir, "pebble.log")
        self.process = None
        self.ca_file = None

    @property
    def directory_url(self):
        return "https://127.0.0.1:%d/dir" % self.port

    def start(self, timeout=20.0):
        reason = pebble_available()
        if reason:
            raise RuntimeError(reason)
        os.makedirs(self.workdir, exist_ok=True)
        self.ca_file, cert, key = make_https_files(self.workdir)
        config = os.path.join(self.workdir, "pebble-config.json")
        settings = {"listenAddress": "127.0.0.1:%d" % self.port,
                    "managementListenAddress": "127.0.0.1:%d" % self.management_port,
                    "certificate": cert, "privateKey": key,
                    "httpPort": self.http_port, "tlsPort": self.tls_port,
                    "ocspResponderURL": "", "externalAccountBindingRequired": False}
        if self.validity is not None:
            settings["certificateValidityPeriod"] = int(self.validity)
        with open(config, "w") as f:
            json.dump({"pebble": settings}, f)
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0",
                   PEBBLE_AUTHZREUSE="0")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [PEBBLE, "-config", config, "-dnsserver", "127.0.0.1:%d" % self.dns_port],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._get(self.directory_url)
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("pebble did not start:\n" + self.read_log())
                time.sleep(0.1)

    def _get(self, url):
        context = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            return response.read()

    def issuer_root(self):
        """The PEM root the certificates pebble issues chain to."""
        return self._get("https://127.0.0.1:%d/roots/0" % self.management_port)

    def read_log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        stop_process(self.process)
        if self.process is not None:
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
