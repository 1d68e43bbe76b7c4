"""The milter client against real milters from Debian packages, as Postfix admins run
them: OpenDKIM signing (the signature then checked by Elemta's own DKIM verifier against
the key published in a private NSD), clamav-milter rejecting EICAR, and Rspamd's proxy
worker in milter mode rejecting GTUBE.

Each milter is a private instance on loopback (tests/peers/milters.py, clamd.py,
rspamd.py, nsd.py); Elemta runs as a subprocess (tests/conftest.py elemta_server) with
`milters:` pointing at it. What is checked is what a user sees: the SMTP reply, the
queued message, the log line naming the milter.
See also: tests/test_milter.py (a scripted milter for the actions real ones cannot be
made to take), elemta/milter/.
"""

import os
import smtplib
import socket
import tempfile
import time

import pytest

from elemta.plugins.dkim import generate_key, verify_message
from elemta.plugins.resolver import Resolver
from tests.harness import free_port, wait_for
from tests.peers.clamd import EICAR, ClamdInstance, clamd_available
from tests.peers.milters import CLAMAV_MILTER, OPENDKIM, ClamavMilter, OpenDKIMMilter
from tests.peers.nsd import NSDInstance, nsd_available
from tests.peers.rspamd import RspamdInstance, rspamd_available

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def needs(path, package):
    """Skip when a package's program is missing (only when not root: as root the Makefile
    installs APT_PACKAGES, so a missing one is a failure)."""
    if os.path.exists(path):
        return
    if os.geteuid() == 0:
        pytest.fail("%s is missing: apt-get install %s (it is in APT_PACKAGES)"
                    % (path, package))
    pytest.skip("%s is not installed (apt-get install %s)" % (path, package))


def message(body, sender="alice@milter.test", subject="hello"):
    return (b"From: Alice <%s>\r\nTo: <b@example.test>\r\nSubject: %s\r\n"
            b"Date: Sat, 05 Dec 2026 10:00:00 +0000\r\nMessage-ID: <%d@milter.test>\r\n"
            b"\r\n%s\r\n" % (sender.encode(), subject.encode(), time.time_ns(), body))


def send(server, raw, sender="alice@milter.test"):
    """The reply to the end of DATA, (code, text)."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=120) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail(sender)[0] == 250
        assert smtp.rcpt("b@example.test")[0] == 250
        try:
            code, text = smtp.data(raw)
        except smtplib.SMTPDataError as error:
            code, text = error.smtp_code, error.smtp_error
        return code, text.decode()


def queue_id_of(reply):
    assert reply[0] == 250, reply
    return reply[1].rsplit(" ", 1)[1]


# ---- OpenDKIM ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signing_key():
    workdir = tempfile.mkdtemp(prefix="elemta-milter-dkim-")
    return generate_key("milter.test", "sel", os.path.join(workdir, "sel.key"))


@pytest.fixture(scope="module")
def nsd(signing_key):
    why = nsd_available()
    if why and os.geteuid() != 0:
        pytest.skip(why)
    server = NSDInstance(tempfile.mkdtemp(prefix="elemta-milter-nsd-"),
                         {"milter.test": signing_key.zone_line + "\n"},
                         address="127.0.0.1")
    server.start()
    yield server
    server.stop()
    server.remove()


def test_opendkim_signs_and_elemta_verifies_the_signature(elemta_server, signing_key, nsd,
                                                          tmp_path):
    needs(OPENDKIM, "opendkim")
    with OpenDKIMMilter(tmp_path / "opendkim", free_port(), "milter.test", "sel",
                        signing_key.key_file) as opendkim:
        server = elemta_server(milters=[{"socket": opendkim.address, "name": "opendkim"}])
        raw = message(b"Signed on the way in.")
        queue_id = queue_id_of(send(server, raw))
    _, content = server.message(queue_id)
    assert b"DKIM-Signature:" in content, opendkim.log()
    assert "%s: milter opendkim: EOM from unknown[127.0.0.1]: accept; insert header " \
           "DKIM-Signature" % queue_id in server.log()
    resolver = Resolver(nameservers=[nsd.address], port=nsd.port, timeout=2.0)
    # What leaves Elemta: our Received header on top, then the signed message.
    results = verify_message(content, resolver)
    assert [(r.result, r.domain, r.selector) for r in results] == [
        ("pass", "milter.test", "sel")]
    # The signature covers the body: a changed body fails.
    tampered = content.replace(b"Signed on the way in.", b"Signed on the way out.")
    assert [r.result for r in verify_message(tampered, resolver)] == ["fail"]


# ---- clamav-milter -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def clamd():
    why = clamd_available()
    if why:
        if os.geteuid() == 0:
            pytest.fail(why)
        pytest.skip(why)
    instance = ClamdInstance(tempfile.mkdtemp(prefix="elemta-milter-clamd-"), free_port())
    instance.start()
    yield instance
    instance.stop()
    instance.remove()


def test_clamav_milter_rejects_eicar_and_passes_clean_mail(elemta_server, clamd, tmp_path):
    needs(CLAMAV_MILTER, "clamav-milter")
    with ClamavMilter(tmp_path / "clamav-milter", free_port(), clamd) as milter:
        server = elemta_server(milters=[{"socket": milter.address, "name": "clamav"}])
        code, text = send(server, message(EICAR))
        assert (code, text.split(" ", 1)[0]) == (550, "5.7.1"), (code, text)
        assert "virus" in text.lower() or "rejected" in text.lower()
        assert server.queued_ids() == []
        clean = message(b"Nothing to see here.")
        queue_id = queue_id_of(send(server, clean))
    assert server.message(queue_id)[1].endswith(clean.split(b"\r\n\r\n", 1)[1])
    log = server.log()
    assert "milter clamav: EOM from unknown[127.0.0.1]: reject: 550 5.7.1" in log
    assert "reject: END-OF-MESSAGE from unknown[127.0.0.1]: 550 5.7.1" in log
    assert "(milter clamav)" in log


# ---- Rspamd's proxy worker in milter mode ------------------------------------------------

@pytest.fixture(scope="module")
def rspamd_milter(tmp_path_factory):
    why = rspamd_available()
    if why:
        if os.geteuid() == 0:
            pytest.fail(why)
        pytest.skip(why)
    port = free_port()
    proxy = ('bind_socket = "127.0.0.1:%d"; milter = yes; timeout = 120s; count = 1;\n'
             'upstream "local" { default = yes; self_scan = yes; }\n' % port)
    instance = RspamdInstance(tmp_path_factory.mktemp("rspamd-milter"), free_port(),
                              nameserver="127.0.0.1:9",
                              local_files={"worker-proxy.inc": proxy})
    instance.start()
    instance.milter_address = "inet:127.0.0.1:%d" % port
    assert wait_for(lambda: _listening(port), timeout=60), "Rspamd's proxy did not start"
    yield instance
    instance.stop()


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_rspamd_proxy_in_milter_mode_rejects_gtube(elemta_server, rspamd_milter):
    server = elemta_server(milters=[{"socket": rspamd_milter.milter_address,
                                     "name": "rspamd"}])
    code, text = send(server, message(GTUBE, subject="gtube"))
    assert code == 554 and text.startswith("5.7.1"), (code, text)
    assert server.queued_ids() == []
    assert "milter rspamd: EOM from unknown[127.0.0.1]: reject: 554 5.7.1" in server.log()
    clean = message(b"Shall we meet at noon?")
    queue_id = queue_id_of(send(server, clean))
    assert server.queued_ids() == [queue_id]
