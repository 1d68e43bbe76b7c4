"""The client's verified name (forward-confirmed reverse DNS) in the log and the Received
header, as a client and an admin see them.

Runs `elemta` as a subprocess (tests/conftest.py elemta_server) with DNS from a private
NSD (tests/peers/nsd.py) serving a reverse zone for 127.0.0.x; clients connect from
several loopback addresses (127.0.0.0/8 is all loopback), each with its own PTR story.
See also: elemta/plugins/peername.py, elemta/smtpd/session.py, elemta/smtpd/received.py.
"""

import smtplib
import socket
import tempfile
import time

import pytest

from tests.harness import wait_for
from tests.peers.nsd import NSDInstance, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))

NOT_US = ["192.0.2.0/24"]      # mynetworks without the loopback clients

# 127.0.0.5: PTR good.test, whose A is 127.0.0.5 (confirmed).
# 127.0.0.6: PTR forged.test, whose A is another address (not confirmed).
# 127.0.0.7: no PTR at all.
ZONES = {
    "0.0.127.in-addr.arpa": "5 PTR good.test.\n6 PTR forged.test.\n",
    "good.test": "@ A 127.0.0.5\n",
    "forged.test": "@ A 127.0.0.99\n",
}


@pytest.fixture(scope="module")
def dns():
    server = NSDInstance(tempfile.mkdtemp(prefix="elemta-name-nsd-"), ZONES)
    server.start()
    yield {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 2.0}
    server.stop()
    server.remove()


def send_from(server, source, rcpt="b@example.test"):
    """Send one message from loopback address `source`; returns the DATA reply."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30,
                      source_address=(source, 0)) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@client.test")
        smtp.rcpt(rcpt)
        return smtp.data(b"Subject: hi\r\n\r\nbody\r\n")


def queued(server, reply):
    assert reply[0] == 250, reply
    return server.message(reply[1].decode().rsplit(" ", 1)[1])[1]


def test_verified_name_in_log_and_received_header(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns)
    content = queued(server, send_from(server, "127.0.0.5"))
    assert content.startswith(b"Received: from client.test (good.test [127.0.0.5])\r\n")
    # The disconnect line follows the QUIT the client does not wait on.
    wait_for(lambda: "disconnect from good.test[127.0.0.5]" in server.log())
    log = server.log()
    assert "connect from good.test[127.0.0.5]" in log
    assert "client=good.test[127.0.0.5]" in log


def test_unconfirmed_or_missing_name_is_unknown(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns)
    forged = queued(server, send_from(server, "127.0.0.6"))
    assert forged.startswith(b"Received: from client.test (unknown [127.0.0.6])\r\n")
    missing = queued(server, send_from(server, "127.0.0.7"))
    assert missing.startswith(b"Received: from client.test (unknown [127.0.0.7])\r\n")
    log = server.log()
    assert "connect from unknown[127.0.0.6]" in log
    assert "127.0.0.6: hostname forged.test does not resolve to address 127.0.0.6" in log
    assert "connect from unknown[127.0.0.7]" in log
    assert "127.0.0.7: " not in log          # no PTR name is no news: no warning
    assert "forged.test[" not in log


def test_lookup_off_leaves_every_client_unknown(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           smtpd={"peername_lookup": False})
    content = queued(server, send_from(server, "127.0.0.5"))
    assert content.startswith(b"Received: from client.test (unknown [127.0.0.5])\r\n")
    assert "connect from unknown[127.0.0.5]" in server.log()


def test_a_silent_nameserver_delays_the_greeting_only_by_the_timeout(elemta_server):
    # A real UDP socket that reads queries and never answers them.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        server = elemta_server(
            relay={"mynetworks": NOT_US}, smtpd={"peername_timeout": 0.5},
            dns={"nameservers": ["127.0.0.1"], "port": silent.getsockname()[1],
                 "timeout": 5.0})
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                      source_address=("127.0.0.5", 0)) as conn:
            greeting = conn.recv(512)
        waited = time.monotonic() - started
        assert greeting.startswith(b"220 "), greeting
        assert 0.4 <= waited < 2.0, waited
        assert "127.0.0.5: lookup timed out after 0.5s" in server.log()
        assert "connect from unknown[127.0.0.5]" in server.log()
    finally:
        silent.close()
