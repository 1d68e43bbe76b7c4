"""A node's hand-over is not our users' mail (issue 19, the review of the handover
listener).

One real node with a submission listener and a handover listener on 127.0.0.2, the
cluster's other nodes being 127.0.0.3 (cluster.peer_networks), DKIM-signing for
elemta.test and writing Authentication-Results as mx.test, the authserv-id every node of
a cluster shares. What an attacker tried: a message with a spoofed From: of our signing
domain, accepted (unsigned, SPF failed) by a node that is then drained, reaches the next
node through the handover listener. That node must neither sign it with our key nor strip
the drained node's Authentication-Results, which record the checks it failed; mail our
users submit is still signed.
See also: elemta.plugins.api.Context.handover, tests/test_cluster_handover.py.
"""

import smtplib

import pytest

from elemta.cluster.credential import HANDOVER_LOGIN, handover_password
from elemta.plugins.dkim import generate_key
from tests.harness import free_port, wait_for

NODE, PEER = "127.0.0.2", "127.0.0.3"
TOKEN = "one-token-for-the-cluster"
ORIGIN_RESULTS = (b"Authentication-Results: mx.test; spf=fail smtp.mailfrom=elemta.test; "
                  b"dkim=none; dmarc=fail header.from=elemta.test")
SPOOFED = (ORIGIN_RESULTS + b"\r\nFrom: The CEO <ceo@elemta.test>\r\n"
           b"To: victim@remote.test\r\nSubject: wire the money\r\n\r\nNow, please.\r\n")
OWN = (b"From: Alice <alice@elemta.test>\r\nTo: bob@remote.test\r\n"
       b"Subject: hello\r\n\r\nA real one.\r\n")


@pytest.fixture
def node(elemta_server, tmp_path, credentials):
    key = generate_key("elemta.test", "s1", str(tmp_path / "s1.key"))
    server = elemta_server(
        listeners=[{"mode": "submission", "address": NODE, "port": free_port(NODE)},
                   {"mode": "handover", "address": NODE, "port": free_port(NODE)}],
        relay={"mynetworks": ["127.0.0.1/32"]},
        auth={"credentials_file": credentials, "allow_plaintext": True},
        api={"address": NODE, "port": free_port(NODE), "token": TOKEN},
        cluster={"peer_networks": [PEER + "/32"]},
        plugins={"dkim": {"enabled": True, "sign": True, "keys": [
            {"domain": "elemta.test", "selector": "s1", "key_file": key.key_file}]}})
    return server


def send(server, mode, login, password, sender, recipient, content):
    with smtplib.SMTP(NODE, server.ports[mode], timeout=20,
                      source_address=(PEER, 0)) as client:
        client.ehlo("node-a.test")
        client.login(login, password)
        client.sendmail(sender, [recipient], content)
    wait_for(lambda: len(server.queued_ids()) == 1, 30)
    queue_id = server.queued_ids()[0]
    return server.message(queue_id)[1]


def header_lines(content):
    """The header fields, unfolded, one an item."""
    block = content.split(b"\r\n\r\n", 1)[0]
    return block.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ").split(b"\r\n")


def test_a_handover_is_neither_signed_nor_stripped_of_its_results(node):
    content = send(node, "handover", HANDOVER_LOGIN, handover_password(TOKEN.encode()),
                   "ceo@elemta.test", "victim@remote.test", SPOOFED)
    headers = header_lines(content)
    assert not any(h.lower().startswith(b"dkim-signature:") for h in headers), content
    # The drained node's record of its checks, as it came, and no second one of ours.
    assert ORIGIN_RESULTS in headers, content
    assert [h for h in headers if h.lower().startswith(b"authentication-results:")] == \
        [ORIGIN_RESULTS]


def test_our_users_submission_is_still_signed(node):
    content = send(node, "submission", "alice", "wonderland", "alice@elemta.test",
                   "bob@remote.test", OWN)
    assert any(h.startswith(b"DKIM-Signature:") and b"d=elemta.test" in h
               for h in header_lines(content)), content


def test_with_a_certificate_the_handover_login_waits_for_tls(elemta_server, tls_files):
    """Postfix's smtpd_tls_auth_only: a node with a certificate takes the hand-over
    password only inside TLS, so it never crosses the pod network in clear."""
    cert, key = tls_files
    server = elemta_server(
        # (The smtp listener first: the harness waits for its greeting from 127.0.0.1.)
        listeners=[{"mode": "smtp", "address": NODE, "port": free_port(NODE)},
                   {"mode": "handover", "address": NODE, "port": free_port(NODE)}],
        tls={"cert_file": cert, "key_file": key},
        api={"address": NODE, "port": free_port(NODE), "token": TOKEN},
        cluster={"peer_networks": [PEER + "/32"]})
    password = handover_password(TOKEN.encode())
    with smtplib.SMTP(NODE, server.ports["handover"], timeout=20,
                      source_address=(PEER, 0)) as client:
        client.ehlo("node-a.test")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        # Sent anyway: refused before the password is looked at.
        code, _ = client.docmd("AUTH", "PLAIN")
        assert code in (503, 504, 530, 538), code
        client.starttls()
        client.ehlo("node-a.test")
        assert client.has_extn("auth")
        assert client.login(HANDOVER_LOGIN, password)[0] == 235


def test_failed_handover_logins_are_counted_and_slow_the_guesser(elemta_server):
    """A pod inside peer_networks guessing the hand-over password meets the users'
    penalty: each attempt waits for its recent failures, and the session's error limit
    ends a session that keeps guessing."""
    server = elemta_server(
        # (The smtp listener first: the harness waits for its greeting from 127.0.0.1.)
        listeners=[{"mode": "smtp", "address": NODE, "port": free_port(NODE)},
                   {"mode": "handover", "address": NODE, "port": free_port(NODE)}],
        auth={"failure_delay": 0.1, "max_failure_delay": 0.3},
        limits={"errors": 3},
        api={"address": NODE, "port": free_port(NODE), "token": TOKEN},
        cluster={"peer_networks": [PEER + "/32"]})
    with smtplib.SMTP(NODE, server.ports["handover"], timeout=20,
                      source_address=(PEER, 0)) as client:
        client.ehlo("node-a.test")
        for guess in ("guess1", "guess2"):
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login(HANDOVER_LOGIN, guess)
        # The third error of the session: 421, and the connection is closed.
        with pytest.raises((smtplib.SMTPAuthenticationError,
                            smtplib.SMTPServerDisconnected)):
            client.login(HANDOVER_LOGIN, "guess3")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    wait_for(lambda: "AUTH from %s waits 0.2s: 2 recent failure(s) from %s"
             % (PEER, PEER) in server.log(), 30)
