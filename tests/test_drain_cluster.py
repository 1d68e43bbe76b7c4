"""Draining a node of a cluster (issue 19, requirements 4 and 5): `elemtactl drain` with no
--to hands the queue to the other live nodes the store names.

Three real nodes (tests/harness.py) on 127.0.0.2, 127.0.0.3 and 127.0.0.4 sharing one
private redis-server (tests/peers/redis.py). Each api process registers its node with
its SMTP hand-over address (cluster.handover_address, by default the first smtp
listener). Messages wait on node A (its relay host refuses: deferred). What an admin
sees: a drain hands A's queue to the others, spread among them, each message once with
its envelope and DSN parameters; a node that refuses (drained itself) is passed over;
with no other live node, A keeps its queue to deliver itself. And the attack: an entry
written into the store by someone else, naming an API URL and SMTP address outside
cluster.peer_networks, gets neither the api token nor any mail.
See also: tests/test_drain.py (drain --to one node), elemta.cli.draincmd,
elemta.cluster.trust.
"""

import json
import socket
import smtplib
import threading
import time

import pytest

from elemta.cluster.credential import registry_key
from elemta.cluster.registry import Registry
from elemta.config.schema import ClusterSettings
from elemta.queue.model import DEFERRED
from elemta.sharedstate.redisstore import connect
from tests.harness import free_port, wait_for
from tests.peers import redis as redis_peer
from tests.test_drain import (EX_OK, MESSAGES, elemtactl, greeting, records)

pytestmark = pytest.mark.skipif(redis_peer.missing() is not None,
                                reason=redis_peer.missing() or "")

ADDRESSES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3", "node-c": "127.0.0.4"}
ROGUE = "127.0.0.5"                     # outside the nodes' cluster.peer_networks
PEER_NETWORKS = ["127.0.0.2/31", "127.0.0.4/32"]
TOKEN = "one-token-for-the-cluster"
KEY = registry_key(TOKEN.encode())


@pytest.fixture
def store(tmp_path):
    with redis_peer.RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def cluster(elemta_server, store):
    """{name: ElemtaServer}: A delivers through a relay host that refuses (its mail stays
    deferred), B and C keep what they receive (no delivery workers)."""
    nodes = {}
    for name, address in ADDRESSES.items():
        delivery = {"workers": 1, "relayhost": "[127.0.0.1]:%d" % free_port()} \
            if name == "node-a" else {}
        nodes[name] = elemta_server(
            listeners=[{"mode": "smtp", "address": address, "port": free_port(address)}],
            api={"address": address, "port": free_port(address), "token": TOKEN},
            delivery=delivery,
            cluster={"store": store.url, "node_name": name, "timeout": 0.5,
                     "retry_interval": 0.5, "heartbeat_interval": 0.5, "node_ttl": 5,
                     "api_timeout": 2, "peer_networks": PEER_NETWORKS})
    registry = Registry(connect(ClusterSettings(store=store.url)), "elemta:", KEY)
    wait_for(lambda: sorted(n.name for n in registry.nodes()) == sorted(nodes), 30)
    # Each registered where it takes mail: its smtp listener (no handover_address set).
    # (An smtp listener: the drain does not log in there, mynetworks lets it relay.)
    assert {n.name: (n.smtp, n.smtp_login) for n in registry.nodes()} == {
        name: ("%s:%d" % (node.address, node.port), False) for name, node in nodes.items()}
    yield nodes
    registry.close()


def queue_batch(server, first):
    """MESSAGES queued on server, subjects "cluster FIRST" onwards; their subjects."""
    subjects = []
    with smtplib.SMTP(server.address, server.port, timeout=20) as client:
        client.ehlo("client.test")
        for number, (sender, recipients, options) in enumerate(MESSAGES, first):
            client.mail(sender, options)
            for address, notify, orcpt in recipients:
                params = (["NOTIFY=" + notify] if notify else []) + (
                    ["ORCPT=" + orcpt] if orcpt else [])
                assert client.rcpt(address, params)[0] == 250
            subject = "Subject: cluster %d" % number
            body = "\xe9t\xe9" if "BODY=8BITMIME" in options else "plain"
            assert client.data(("%s\r\n\r\nbody %s\r\n" % (subject, body)).encode())[0] \
                == 250
            subjects.append(subject)
    return subjects


def envelope_of(record):
    e = record.envelope
    return (e.sender, e.ret, e.envid, e.smtputf8, e.body,
            [(r.address, r.notify, r.orcpt) for r in e.recipients])


def test_a_drained_node_hands_its_queue_to_the_live_nodes_of_the_store(cluster):
    a, b, c = cluster["node-a"], cluster["node-b"], cluster["node-c"]
    first = queue_batch(a, 0)
    wait_for(lambda: len(records(a)) == 4 and all(
        r.state == DEFERRED for r in records(a).values()), 30)
    sent = {subject: envelope_of(r) for subject, r in records(a).items()}

    # C refuses (drained itself): passed over, everything goes to B.
    assert elemtactl(c, "drain")[0] == EX_OK
    wait_for(lambda: greeting(c)[0] == 421, 10)
    code, out, err = elemtactl(a, "drain")
    assert code == EX_OK, (out, err)
    assert "passed over node-c (127.0.0.4:%d): 421 4.3.2" % c.port in err, err
    assert "4 message(s) handed over to node-b (127.0.0.3:%d), node-c" % b.port in out, out
    assert "the node is empty" in out, out
    assert records(a) == {} and sorted(records(b)) == sorted(first)
    code, out, _ = elemtactl(a, "drain", "--status", "--json")
    assert json.loads(out)["to"] == "cluster" and code == EX_OK

    # Both take mail again: a second batch is spread between B and C.
    assert elemtactl(a, "undrain")[0] == elemtactl(c, "undrain")[0] == EX_OK
    wait_for(lambda: greeting(a)[0] == greeting(c)[0] == 220, 10)
    second = queue_batch(a, 4) + queue_batch(a, 8)
    wait_for(lambda: len(records(a)) == 8 and all(
        r.state == DEFERRED for r in records(a).values()), 30)
    sent.update((subject, envelope_of(r)) for subject, r in records(a).items())
    code, out, err = elemtactl(a, "drain", "--wait", "--timeout", "60")
    assert code == EX_OK and err == "", (out, err)
    assert records(a) == {}
    at_b = [s for s in records(b) if s not in first]
    at_c = list(records(c))
    assert at_b and at_c, (at_b, at_c)                 # spread, not all to one
    assert sorted(at_b + at_c) == sorted(second)        # each once: none lost, none twice
    arrived = dict(records(b), **records(c))
    assert {s: envelope_of(r) for s, r in arrived.items()} == sent


def test_with_no_other_live_node_the_drained_node_keeps_its_queue(cluster, store):
    a, b, c = cluster["node-a"], cluster["node-b"], cluster["node-c"]
    queue_batch(a, 0)
    wait_for(lambda: len(records(a)) == 4, 30)
    # --here: the admin keeps the queue on this node, live peers or not.
    code, out, err = elemtactl(a, "drain", "--here")
    assert code == EX_OK and "handed over" not in out + err, (out, err)
    assert len(records(a)) == 4 and records(b) == records(c) == {}
    assert json.loads(elemtactl(a, "drain", "--status", "--json")[1])["to"] is None
    b.stop()
    c.stop()
    registry = Registry(connect(ClusterSettings(store=store.url)), "elemta:", KEY)
    wait_for(lambda: [n.name for n in registry.nodes()] == ["node-a"], 20)
    registry.close()
    code, out, err = elemtactl(a, "drain")
    assert code == EX_OK, (out, err)
    assert "no other live node in the cluster takes mail: the node delivers its queue " \
           "itself" in out, out
    assert len(records(a)) == 4 and "4 message(s) remain" in out


class Listener:
    """A TCP port on ROGUE that records whatever connects: the attacker's."""

    def __init__(self, address=ROGUE):
        self.socket = socket.socket()
        self.socket.bind((address, 0))
        self.socket.listen(8)
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.received = []
        self.stopped = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopped:
            try:
                connection, _ = self.socket.accept()
            except socket.timeout:
                continue
            with connection:
                connection.settimeout(2)
                if self.port_is_smtp:
                    connection.sendall(b"220 rogue ESMTP\r\n")
                try:
                    self.received.append(connection.recv(65536))
                except OSError:
                    self.received.append(b"")

    port_is_smtp = False

    def close(self):
        self.stopped = True
        self.thread.join()
        self.socket.close()


def test_a_rogue_registry_entry_gets_neither_the_token_nor_the_mail(cluster, store):
    """A node registered outside cluster.peer_networks, even signed with the cluster's
    key (a leaked token, a misconfigured node): the cluster view never sends it the api
    token (it is named as not answering, and why), and a drain never hands it a message.
    (Unsigned entries are left out altogether: tests/test_cluster_handover.py.)"""
    a = cluster["node-a"]
    api, smtp = Listener(), Listener()
    smtp.port_is_smtp = True
    registry = Registry(connect(ClusterSettings(store=store.url)), "elemta:", KEY)
    try:
        registry.register("rogue", "http://%s:%d" % (ROGUE, api.port), "1", time.time(),
                          3600, smtp="%s:%d" % (ROGUE, smtp.port))
        code, out, err = elemtactl(a, "--cluster", "queue", "summary", "--json")
        assert code == 69, (out, err)
        missing = json.loads(out)["missing"]
        assert [(m["node"], m["error"]) for m in missing] == [(
            "rogue", "not sent the api token: %s is outside cluster.peer_networks (%s)"
            % (ROGUE, ", ".join(PEER_NETWORKS)))], missing
        queue_batch(a, 0)
        wait_for(lambda: len(records(a)) == 4, 30)
        code, out, err = elemtactl(a, "drain")
        assert code == EX_OK, (out, err)
        assert "node rogue is sent no mail: %s is outside cluster.peer_networks" % ROGUE \
            in err, err
        assert records(a) == {}
        assert sorted(list(records(cluster["node-b"])) + list(records(cluster["node-c"]))
                      ) == ["Subject: cluster %d" % n for n in range(4)]
    finally:
        registry.close()
        api.close()
        smtp.close()
    assert api.received == [] and smtp.received == []
