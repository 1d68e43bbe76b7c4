"""The milter client against real milters from Debian packages, as Postfix admins run
them: OpenDKIM signing (the signature then checked by Elemta's own DKIM verifier against
the key published in a private NSD), clamav-milter rejecting EICAR, and Rspamd's proxy
worker in milter mode rejecting GTUBE. The session's macros ({auth_authen}, the TLS ones)
are proved to reach a real milter through real AUTH and STARTTLS sessions: OpenDKIM with
a MacroList signs only what they mark.

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
import ssl
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


# ---- the session's macros, through real AUTH and STARTTLS: OpenDKIM's MacroList ---------
# With InternalHosts set to an address that is not ours, 127.0.0.1 is not internal, so
# opendkim signs only when the macro of MacroList came from the MTA with the value given:
# a signature on the AUTH'd (or TLS) session's message and none on the plain one proves
# the macro reached a real milter, with that value.

def client_tls():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def send_in_session(server, raw, login=None, starttls=False):
    """(the reply to the end of DATA, the client's view of TLS: (cipher, version, bits)
    or None) of one transaction from alice@milter.test, after STARTTLS and AUTH as
    asked (login: (user, password))."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=120) as smtp:
        smtp.ehlo("client.test")
        tls = None
        if starttls:
            smtp.starttls(context=client_tls())
            smtp.ehlo("client.test")
            tls = smtp.sock.cipher()
        if login:
            smtp.login(*login)
        assert smtp.mail("alice@milter.test")[0] == 250
        assert smtp.rcpt("b@example.test")[0] == 250
        code, text = smtp.data(raw)
        return (code, text.decode()), tls


def signed(server, queue_id):
    return b"DKIM-Signature:" in server.message(queue_id)[1]


def test_auth_authen_reaches_opendkim_from_an_authenticated_session(
        elemta_server, signing_key, credentials, tmp_path):
    needs(OPENDKIM, "opendkim")
    with OpenDKIMMilter(tmp_path / "opendkim", free_port(), "milter.test", "sel",
                        signing_key.key_file, internal_hosts="192.0.2.1",
                        macro_list="auth_authen=alice") as opendkim:
        server = elemta_server(milters=[{"socket": opendkim.address, "name": "opendkim"}],
                               auth={"credentials_file": credentials,
                                     "allow_plaintext": True})
        plain = queue_id_of(send_in_session(server, message(b"Nobody logged in."))[0])
        authed = queue_id_of(send_in_session(server, message(b"Alice logged in."),
                                             login=("alice", "wonderland"))[0])
    assert not signed(server, plain), opendkim.log()
    assert signed(server, authed), opendkim.log()
    assert "%s: milter opendkim: EOM from unknown[127.0.0.1]: accept; insert header " \
           "DKIM-Signature" % authed in server.log()


@pytest.mark.parametrize("macro", ["tls_version", "cipher", "cipher_bits"])
def test_tls_macros_reach_opendkim_from_a_starttls_session(
        elemta_server, signing_key, tls_files, tmp_path, macro):
    needs(OPENDKIM, "opendkim")
    cert, key = tls_files
    port = free_port()
    server = elemta_server(milters=[{"socket": "inet:127.0.0.1:%d" % port,
                                     "name": "opendkim"}],
                           tls={"cert_file": cert, "key_file": key})
    # What this client and Elemta agree on, as the client sees it (no mail sent: the
    # milter is not up yet).
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        smtp.starttls(context=client_tls())
        cipher, version, bits = smtp.sock.cipher()
    expected = {"tls_version": version, "cipher": cipher, "cipher_bits": str(bits)}[macro]
    with OpenDKIMMilter(tmp_path / "opendkim", port, "milter.test", "sel",
                        signing_key.key_file, internal_hosts="192.0.2.1",
                        macro_list="%s=%s" % (macro, expected)) as opendkim:
        plain = queue_id_of(send_in_session(server, message(b"In the clear."))[0])
        reply, tls = send_in_session(server, message(b"Over TLS."), starttls=True)
        over_tls = queue_id_of(reply)
    assert tls == (cipher, version, bits)
    assert not signed(server, plain), opendkim.log()
    assert signed(server, over_tls), (macro, expected, opendkim.log())


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


def test_a_real_milters_scan_time_and_verdicts_reach_prometheus(elemta_server, clamd,
                                                                tmp_path, monkeypatch):
    needs(CLAMAV_MILTER, "clamav-milter")
    from tests.test_metrics import labelled, settled, start_server, value
    with ClamavMilter(tmp_path / "clamav-milter", free_port(), clamd) as milter:
        server, api_port = start_server(elemta_server, tmp_path, monkeypatch,
                                        milters=[{"socket": milter.address,
                                                  "name": "clamav"}])
        assert send(server, message(EICAR))[0] == 550
        queue_id_of(send(server, message(b"Nothing to see here.")))

    def counted(samples):
        # One observation per message clamav-milter judged, each taking some time.
        assert value(samples, "elemta_milter_scan_seconds_count", milter="clamav") == 2
        assert value(samples, "elemta_milter_scan_seconds_sum", milter="clamav") > 0
        verdicts = {labels: n for labels, n in labelled(
            samples, "elemta_milter_verdicts_total").items() if labels[1] == "clamav"}
        # (action, milter, stage): the virus refused at the end of message, the clean
        # one let through.
        assert verdicts.get(("reject", "clamav", "eom")) == 1, verdicts
        assert sum(n for (action, _, stage), n in verdicts.items()
                   if stage == "eom" and action in ("accept", "continue")) == 1, verdicts
        assert labelled(samples, "elemta_milter_failures_total") == {}
    settled(api_port, counted)


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
