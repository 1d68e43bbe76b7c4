"""Where `elemtactl drain --to HOST` sends the cluster's hand-over login (issue 19, the
review of the handover listener).

A real node drains its queue to a scripted peer (tests/peers/sink.py: the peer that
offers STARTTLS and then refuses it, which real servers will not play on demand) that
offers AUTH and records every command. The hand-over password opens relaying on every
node: it goes only to a host inside cluster.peer_networks (127.0.0.3/32 here), and never
in clear to a peer that offered STARTTLS, whatever happened to it.
See also: elemta.cli.draincmd._to_target, elemta.delivery.smtp_client.SASL_TLS_IF_OFFERED.
"""

import smtplib

import pytest

from elemta.cluster.credential import HANDOVER_LOGIN
from tests.harness import wait_for
from tests.peers.sink import ScriptedServer
from tests.test_drain import EX_OK, elemtactl, records

PEER, OUTSIDE = "127.0.0.3", "127.0.0.4"
TOKEN = "one-token-for-the-cluster"
AUTH = ["AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES", "8BITMIME"]


@pytest.fixture
def node(elemta_server):
    server = elemta_server(api={"token": TOKEN},
                           cluster={"peer_networks": [PEER + "/32"]})
    with smtplib.SMTP(server.address, server.port, timeout=20) as client:
        client.sendmail("alice@sender.test", ["bob@remote.test"],
                        b"Subject: to hand over\r\n\r\nbody\r\n")
    wait_for(lambda: len(records(server)) == 1, 30)
    return server


def auth_commands(peer):
    return [c for session in peer.sessions for c in session.commands
            if c.upper().startswith("AUTH")]


def test_a_host_outside_peer_networks_gets_no_login(node):
    with ScriptedServer(address=OUTSIDE, extensions=AUTH,
                        script={"AUTH": "235 2.7.0 ok"}) as peer:
        code, out, err = elemtactl(node, "drain", "--to", "%s:%d" % (OUTSIDE, peer.port),
                                   "--wait", "--timeout", "60")
        assert code == EX_OK, (out, err)
        assert "outside cluster.peer_networks" in out + err
        assert "hand-over login is not sent there" in out + err
        assert auth_commands(peer) == []
        assert len(peer.messages) == 1 and records(node) == {}


def test_a_peer_inside_gets_the_login_where_it_offers_no_starttls(node):
    with ScriptedServer(address=PEER, extensions=AUTH,
                        script={"AUTH": "235 2.7.0 ok"}) as peer:
        code, out, err = elemtactl(node, "drain", "--to", "%s:%d" % (PEER, peer.port),
                                   "--wait", "--timeout", "60")
        assert code == EX_OK, (out, err)
        assert [c.split()[:2] for c in auth_commands(peer)] == [["AUTH", "PLAIN"]]
        assert len(peer.messages) == 1 and records(node) == {}


def test_no_password_in_clear_after_a_refused_starttls(node):
    with ScriptedServer(address=PEER, extensions=AUTH + ["STARTTLS"],
                        script={"AUTH": "235 2.7.0 ok",
                                "STARTTLS": "454 4.7.0 TLS not available"}) as peer:
        code, out, err = elemtactl(node, "drain", "--to", "%s:%d" % (PEER, peer.port))
        assert code != EX_OK, (out, err)
        assert "STARTTLS" in [c.upper() for s in peer.sessions for c in s.commands]
        assert auth_commands(peer) == [] and peer.messages == []
        assert "not authenticating to" in out + err and "it refused STARTTLS" in out + err
    assert len(records(node)) == 1          # kept, to be handed over or delivered later
    assert HANDOVER_LOGIN not in node.log()
