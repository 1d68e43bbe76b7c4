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
