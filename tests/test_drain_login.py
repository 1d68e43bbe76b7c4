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
from tests.peers.sink import ScriptedServer, make_test_pki
from tests.test_drain import EX_OK, elemtactl, records

PEER, OUTSIDE = "127.0.0.3", "127.0.0.4"
TOKEN = "one-token-for-the-cluster"
AUTH = ["AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES", "8BITMIME"]


def node_with(elemta_server, **cluster):
    server = elemta_server(api={"token": TOKEN},
                           cluster=dict(cluster, peer_networks=[PEER + "/32"]))
    with smtplib.SMTP(server.address, server.port, timeout=20) as client:
        client.sendmail("alice@sender.test", ["bob@remote.test"],
                        b"Subject: to hand over\r\n\r\nbody\r\n")
    wait_for(lambda: len(records(server)) == 1, 30)
    return server


@pytest.fixture
def node(elemta_server):
    """A node whose hand-over login may go in clear to a peer without STARTTLS."""
    return node_with(elemta_server, handover_tls="may")


@pytest.fixture
def pki(tmp_path):
    """(cluster CA, the peer's certificate and key signed by it, another CA)."""
    ca, cert, key = make_test_pki(str(tmp_path / "cluster"), PEER)
    other_ca, _, _ = make_test_pki(str(tmp_path / "other"), PEER)
    return ca, cert, key, other_ca


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


def test_with_handover_tls_may_a_peer_without_starttls_gets_the_login(node):
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


def test_by_default_a_peer_without_starttls_gets_no_login(elemta_server):
    node = node_with(elemta_server)             # cluster.handover_tls: required
    with ScriptedServer(address=PEER, extensions=AUTH,
                        script={"AUTH": "235 2.7.0 ok"}) as peer:
        code, out, err = elemtactl(node, "drain", "--to", "%s:%d" % (PEER, peer.port))
        assert code != EX_OK, (out, err)
        assert auth_commands(peer) == [] and peer.messages == []
        assert "TLS is required, but was not offered" in out + err
    assert len(records(node)) == 1          # kept, to be handed over or delivered later


def test_a_peer_signed_by_the_cluster_ca_gets_the_login_inside_tls(elemta_server, pki):
    ca, cert, key, _ = pki
    node = node_with(elemta_server, peer_ca_file=ca)
    with ScriptedServer(address=PEER, extensions=AUTH, cert_file=cert, key_file=key,
                        script={"AUTH": "235 2.7.0 ok"}) as peer:
        code, out, err = elemtactl(node, "drain", "--to", "%s:%d" % (PEER, peer.port),
                                   "--wait", "--timeout", "60")
        assert code == EX_OK, (out, err)
        assert [c.split()[:2] for c in auth_commands(peer)] == [["AUTH", "PLAIN"]]
        assert all(s.tls for s in peer.sessions if s.commands)
        assert len(peer.messages) == 1 and records(node) == {}


def test_a_peer_not_signed_by_the_cluster_ca_gets_no_login(elemta_server, pki):
    _, cert, key, other_ca = pki
    node = node_with(elemta_server, peer_ca_file=other_ca)
    with ScriptedServer(address=PEER, extensions=AUTH, cert_file=cert, key_file=key,
                        script={"AUTH": "235 2.7.0 ok"}) as peer:
        code, out, err = elemtactl(node, "drain", "--to", "%s:%d" % (PEER, peer.port))
        assert code != EX_OK, (out, err)
        assert "TLS handshake with" in out + err
        assert auth_commands(peer) == [] and peer.messages == []
    assert len(records(node)) == 1
