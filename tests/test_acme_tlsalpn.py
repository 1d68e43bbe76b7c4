"""TLS-ALPN-01 (RFC 8737) end to end: with acme.challenge tls-alpn-01 Elemta's acme child
orders certificates from a real pebble on loopback and its acme-tls child answers
pebble's validation handshakes on the port the master bound (pebble's tlsPort), where a
host's port 80 is not available. Names resolve through NSD as in tests/test_acme.py:
mail and smtp to 127.0.0.1, where the responder listens; dead to 127.0.0.9, where
nothing does. See also: elemta.acme.tlsalpn01, elemta.acme.client.
"""

import hashlib
import os
import socket
import ssl

import pytest
from cryptography import x509

from elemta.acme.client import ACME_IDENTIFIER_OID, validation_certificate
from elemta.certs.store import Store
from elemta.config import ConfigError
from elemta.config.loader import load_text
from elemta.services import SERVICES
from tests.harness import ElemtaServer, free_port, wait_for
from tests.peers.nsd import NSDInstance, nsd_available
from tests.peers.pebble import PebbleInstance, pebble_available
from tests.test_acme import NAMES, ZONE, offers_starttls, renewal_metrics, starttls

pytestmark = pytest.mark.skipif(bool(nsd_available() or pebble_available()),
                                reason=nsd_available() or pebble_available() or "")


@pytest.fixture(scope="module")
def pebble(tmp_path_factory):
    """A pebble that validates TLS-ALPN-01 on tls_port, and an HTTP-01 port where
    nothing listens (so an HTTP-01 answer could not have passed)."""
    workdir = tmp_path_factory.mktemp("acme-alpn-peers")
    with NSDInstance(workdir / "nsd", {"acme.test": ZONE}) as dns:
        with PebbleInstance(workdir / "pebble", free_port(), dns.port,
                            tls_port=free_port()) as server:
            root = workdir / "pebble-root.pem"
            root.write_bytes(server.issuer_root())
            server.root_file = str(root)
            yield server


def test_the_challenge_type_picks_the_responder_and_a_wrong_one_names_file_line_key():
    def children(text):
        config = load_text("/etc/elemta/elemta.yaml", text, check_files=False)
        return {s.kind: s.binds(config) for s in SERVICES
                if s.kind.startswith("acme-") and s.count(config)}
    http = children("acme:\n  enabled: true\n")
    assert [(kind, e.address, e.port) for kind, e in http.items()] == [
        ("acme-http", "0.0.0.0", 80)]
    tls = children("acme:\n  enabled: true\n  challenge: tls-alpn-01\n"
                   "  tls_address: 127.0.0.1\n")
    assert [(kind, e.address, e.port) for kind, e in tls.items()] == [
        ("acme-tls", "127.0.0.1", 443)]
    assert children("acme:\n  challenge: tls-alpn-01\n") == {}       # acme off
    with pytest.raises(ConfigError) as refused:
        load_text("/etc/elemta/elemta.yaml", "acme:\n  enabled: true\n  challenge: dns-01\n",
                  check_files=False)
    assert str(refused.value) == ("/etc/elemta/elemta.yaml:3: acme.challenge: must be one "
                                  "of http-01, tls-alpn-01, not 'dns-01'")


def start_elemta(tmp_path, pebble, names=NAMES):
    settings = {"enabled": True, "challenge": "tls-alpn-01",
                "directory_url": pebble.directory_url, "ca_file": pebble.ca_file,
                "tls_address": "127.0.0.1", "tls_port": pebble.tls_port,
                "http_address": "127.0.0.1", "http_port": pebble.http_port,
                "state_directory": str(tmp_path / "acme"),
                "certificates": [{"name": "mail", "domains": list(names)}],
                "retry_delay": 1.0, "retry_delay_max": 2.0}
    server = ElemtaServer(tmp_path / "elemta", {"tls": {"acme": "mail"}, "acme": settings})
    return server.start()


def handshake(port, name, alpn):
    """A TLS handshake with the responder: (ALPN chosen, the certificate presented, the
    bytes it sent after the handshake), or raises ssl.SSLError."""
    context = ssl._create_unverified_context()
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
            chosen = tls.selected_alpn_protocol()
            try:
                after = tls.recv(100)
            except (ssl.SSLError, OSError):
                after = b""
            return chosen, x509.load_der_x509_certificate(der), after


def test_a_certificate_is_obtained_through_tls_alpn_01_alone(tmp_path, pebble):
    server = start_elemta(tmp_path, pebble)
    try:
        titles = set(server.titles().values())
        assert {"elemta: acme", "elemta: acme-tls"} <= titles
        assert "elemta: acme-http" not in titles        # port 80 is not used at all
        installed = "acme: certificate mail for %s installed" % ", ".join(NAMES)
        wait_for(lambda: installed in server.log(), timeout=60)
        log = server.log()
        for name in NAMES:
            assert "acme: answering TLS-ALPN-01 for %s" % name in log
            assert "acme-tls: answered the TLS-ALPN-01 challenge for %s from 127.0.0.1" \
                % name in log
        wait_for(lambda: offers_starttls(server.port), timeout=10)
        client, _ = starttls(server.port, pebble, "smtp.acme.test")
        client.quit()
        # The validation certificates are gone once the order is over.
        assert os.listdir(tmp_path / "acme" / "challenges") == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", pebble.http_port), timeout=5)
    finally:
        server.stop()


def test_the_responder_answers_acme_tls_1_for_a_pending_name_and_nothing_else(
        tmp_path, pebble):
    """With no certificate to order, the acme-tls child still runs; a validation
    certificate put where the acme child would is presented to acme-tls/1 clients only."""
    server = start_elemta(tmp_path, pebble, names=["mail.acme.test"])
    try:
        wait_for(lambda: "acme-tls answering TLS-ALPN-01" in server.log(), timeout=30)
        wait_for(lambda: "acme: certificate mail" in server.log(), timeout=60)
        store = Store(str(tmp_path / "acme"))
        key_authorization = "t" * 43 + "." + "k" * 43
        store.put_alpn_certificate("pending.acme.test",
                                   validation_certificate("pending.acme.test",
                                                          key_authorization))
        chosen, cert, after = handshake(pebble.tls_port, "pending.acme.test",
                                        ["acme-tls/1"])
        assert chosen == "acme-tls/1" and after == b""
        extension = cert.extensions.get_extension_for_oid(
            x509.ObjectIdentifier(ACME_IDENTIFIER_OID))
        assert extension.critical
        assert extension.value.value == b"\x04\x20" + hashlib.sha256(
            key_authorization.encode()).digest()
        assert cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
                "pending.acme.test"]
        # A client that does not speak acme-tls/1 (a browser, a scanner) gets nothing
        # more than the handshake, and the connection closed.
        for alpn in (None, ["h2", "http/1.1"]):
            chosen, _, after = handshake(pebble.tls_port, "pending.acme.test", alpn)
            assert (chosen, after) == (None, b"")
        wait_for(lambda: "acme-tls: closed a handshake from 127.0.0.1 for "
                         "pending.acme.test: it did not ask for ALPN acme-tls/1"
                 in server.log(), timeout=10)
        # A name with nothing pending, a path in SNI, or no SNI: the handshake fails.
        for name in ("other.acme.test", "x/pending.acme.test", None):
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
                handshake(pebble.tls_port, name, ["acme-tls/1"])
        store.remove_alpn_certificate("pending.acme.test")
        with pytest.raises(ssl.SSLError):
            handshake(pebble.tls_port, "pending.acme.test", ["acme-tls/1"])
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_a_failed_tls_alpn_01_challenge_is_logged_with_pebbles_reason_and_retried(
        tmp_path, pebble):
    server = start_elemta(tmp_path, pebble, names=["mail.acme.test", "dead.acme.test"])
    try:
        wait_for(lambda: "failure 2 in a row" in server.log(), timeout=60)
        failure = ("acme: certificate mail for mail.acme.test, dead.acme.test failed: "
                   "challenge failed: dead.acme.test:")
        lines = [line for line in server.log().splitlines() if failure in line]
        assert len(lines) >= 2, server.log()
        assert "127.0.0.9" in lines[0], lines[0]          # pebble's reason, passed on
        assert "STARTTLS stays unavailable until one is obtained" in lines[0]
        assert "failure 1 in a row, next attempt in 1s" in lines[0]
        assert "failure 2 in a row, next attempt in 2s" in lines[1]
        assert not offers_starttls(server.port)
        assert os.listdir(tmp_path / "acme" / "challenges") == []
        # Prometheus sees the failures (within the second the acme process may hold
        # its counts), and no success.
        def failed():
            orders, last_success = renewal_metrics(server)
            return orders["success"] == 0 and orders["failure"] >= 2 and last_success == 0
        wait_for(failed, timeout=30)
    finally:
        server.stop()
