"""Hand-over between nodes without opening relaying to their network (issue 19, the
review of the Kubernetes manifests).

Two real nodes (tests/harness.py) on 127.0.0.2 and 127.0.0.3 sharing one private
redis-server, set up as deploy/kubernetes sets up pods: relay.mynetworks is the pod's
own loopback alone (127.0.0.1 here, where the test's own clients and the drain come
from), cluster.peer_networks is the "pod network" (127.0.0.0/9 here: other loopback
addresses play the other pods, 127.200.0.1 a host outside it), and each node has an smtp
listener and a handover listener, which it registers. What an admin and an attacker
see: a drain reaches the other node through its handover listener; a pod inside the
pod network cannot relay through either listener without the cluster's credential, and
a host outside it is not even greeted by the handover listener; a registration written
into the store by such a pod, inside peer_networks but not signed with the cluster's
key, gets neither the api token nor drained mail, and does not spoil the view.
See also: elemta.smtpd.handoverauth, elemta.cluster.credential, tests/test_drain_cluster.py.
"""

import json
import smtplib

import pytest

from elemta.cluster.credential import (HANDOVER_LOGIN, handover_password, registry_key,
                                      sign)
from elemta.cluster.registry import Registry
from elemta.config.schema import ClusterSettings
from elemta.maps.lmdbtable import compile_source
from elemta.queue.model import DEFERRED
from elemta.sharedstate.redisstore import connect
from tests.harness import free_port, wait_for
from tests.peers import redis as redis_peer
from tests.peers.sink import make_test_pki
from tests.test_drain import EX_OK, elemtactl, records
from tests.test_drain_cluster import Listener, queue_batch

pytestmark = pytest.mark.skipif(redis_peer.missing() is not None,
                                reason=redis_peer.missing() or "")

ADDRESSES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}
POD = "127.0.0.6"               # another pod of the pod network: not a node
OUTSIDE = "127.200.0.1"         # outside cluster.peer_networks
TOKEN = "one-token-for-the-cluster"


@pytest.fixture
def store(tmp_path):
    with redis_peer.RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def cluster(elemta_server, store, tmp_path):
    """{name: (ElemtaServer, its handover port)}; A delivers through a relay host that
    refuses (its mail stays deferred), B keeps what it receives. Both bind senders to
    AUTH logins (smtpd.sender_login_maps), which must not refuse the hand-over login
    the senders it relays. Each has a certificate of the cluster's CA, which each checks
    its peers' against (cluster.peer_ca_file), as deploy/kubernetes sets them up."""
    ca, cert, key = make_test_pki(str(tmp_path / "pki"), "elemta.test")
    logins = tmp_path / "sender_logins"
    logins.write_text("one@sender.test alice\n@sender.test bob\n")
    compile_source(str(logins))
    nodes = {}
    for name, address in ADDRESSES.items():
        delivery = {"workers": 1, "relayhost": "[127.0.0.1]:%d" % free_port()} \
            if name == "node-a" else {}
        handover = free_port(address)
        server = elemta_server(
            listeners=[{"mode": "smtp", "address": address, "port": free_port(address)},
                       {"mode": "handover", "address": address, "port": handover}],
            relay={"mynetworks": ["127.0.0.1/32"]},
            smtpd={"sender_login_maps": "lmdb:%s" % logins},
            # The refused logins below are not about the wait after each (smtplib tries
            # every mechanism: six failures, 30 s at the default 2 s a failure).
            auth={"failure_delay": 0.1},
            tls={"cert_file": cert, "key_file": key},
            api={"address": address, "port": free_port(address), "token": TOKEN},
            delivery=delivery,
            cluster={"store": store.url, "node_name": name, "timeout": 0.5,
                     "retry_interval": 0.5, "heartbeat_interval": 0.5, "node_ttl": 5,
                     "api_timeout": 2, "peer_networks": ["127.0.0.0/9"],
                     "peer_ca_file": ca})
        nodes[name] = (server, handover)
    registry = Registry(connect(ClusterSettings(store=store.url)), "elemta:",
                        registry_key(TOKEN.encode()))
    wait_for(lambda: sorted(n.name for n in registry.nodes()) == sorted(nodes), 30)
    # Each registered its handover listener, not its port 25, as one to log in to.
    assert {n.name: (n.smtp, n.smtp_login) for n in registry.nodes()} == {
        name: ("%s:%d" % (server.address, port), True)
        for name, (server, port) in nodes.items()}
    registry.close()
    return nodes


def client(address, port, source):
    connection = smtplib.SMTP(address, port, timeout=20, source_address=(source, 0))
    connection.ehlo("pod.test")
    return connection


def test_a_drain_goes_through_the_handover_listener(cluster):
    (a, _), (b, _) = cluster["node-a"], cluster["node-b"]
    subjects = queue_batch(a, 0)
    wait_for(lambda: len(records(a)) == 4 and all(
        r.state == DEFERRED for r in records(a).values()), 30)
    code, out, err = elemtactl(a, "drain", "--wait", "--timeout", "60")
    assert code == EX_OK and err == "", (out, err)
    assert records(a) == {} and sorted(records(b)) == sorted(subjects)
    assert "AUTH PLAIN succeeded for %s" % HANDOVER_LOGIN in b.log()


def test_a_pod_of_the_pod_network_cannot_relay(cluster):
    b, handover = cluster["node-b"]
    # Port 25: the pod network is not mynetworks.
    with client(b.address, b.port, POD) as pod:
        pod.mail("spam@pod.test")
        code, text = pod.rcpt("victim@remote.test")
        assert (code, text.decode()) == (554, "5.7.1 <victim@remote.test>: Relay access "
                                              "denied")
    # The handover listener: no MAIL before AUTH, and only the cluster's credential.
    with client(b.address, handover, POD) as pod:
        assert not pod.has_extn("auth")           # not before TLS: it has a certificate
        pod.starttls()
        pod.ehlo("pod.test")
        assert pod.has_extn("auth")
        code, text = pod.mail("spam@pod.test")
        assert code == 530, text
        for login, password in (("alice", "wonderland"),
                                (HANDOVER_LOGIN, handover_password(b"another-token")),
                                (HANDOVER_LOGIN, TOKEN)):
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                pod.login(login, password)
            assert refused.value.smtp_code == 535
        assert pod.mail("spam@pod.test")[0] == 530
    # Outside cluster.peer_networks: not greeted.
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(b.address, handover, timeout=20, source_address=(OUTSIDE, 0))
    assert refused.value.smtp_code == 421
    assert b"only" in refused.value.smtp_error
    assert b.queued_ids() == []


def test_an_unsigned_registration_inside_peer_networks_gets_no_token_and_no_mail(
        cluster, store):
    """A pod of the pod network writes a node of its own into the store (it reaches the
    store; it has not the api token): the view leaves it out, whole, and a drain never
    hands it a message nor the hand-over credential."""
    (a, _), (b, _) = cluster["node-a"], cluster["node-b"]
    api, smtp = Listener(POD), Listener(POD)
    smtp.port_is_smtp = True
    for key in (None, registry_key(b"a token of his own")):
        rogue = Registry(connect(ClusterSettings(store=store.url)), "elemta:",
                         key or b"")
        try:
            if key is None:     # not even signed: a hand-made entry, and a broken one
                rogue.client.hset(b"elemta:nodes", "rogue", json.dumps({
                    "node": json.dumps({"name": "rogue", "api_url": "http://%s:%d"
                                        % (POD, api.port), "smtp": "%s:%d"
                                        % (POD, smtp.port)}),
                    "heartbeat": 1e12, "expires": 1e12}))
                rogue.client.hset(b"elemta:nodes", "broken", json.dumps({
                    "heartbeat": 1e12, "expires": 1e12}))
            else:
                rogue.register("rogue", "http://%s:%d" % (POD, api.port), "1", 0, 3600,
                               smtp="%s:%d" % (POD, smtp.port))
        finally:
            rogue.close()
        code, out, err = elemtactl(a, "--cluster", "queue", "summary", "--json")
        assert code == EX_OK, (out, err)
        assert "registry entry rogue in elemta:nodes is left out: not signed with the " \
            "cluster's key" in err, err
        if key is None:
            assert "registry entry broken in elemta:nodes is left out" in err, err
        summary = json.loads(out)
        assert sorted(summary["nodes"]) == ["node-a", "node-b"] and summary["complete"]
    queue_batch(a, 0)
    wait_for(lambda: len(records(a)) == 4, 30)
    code, out, err = elemtactl(a, "drain", "--wait", "--timeout", "60")
    assert code == EX_OK, (out, err)
    assert records(a) == {} and len(records(b)) == 4
    api.close()
    smtp.close()
    assert api.received == [] and smtp.received == []


def test_a_malformed_entry_is_left_out_and_the_others_stay(store):
    """An entry signed with the cluster's key but without a name (a node of another
    version, a bug) is left out of the view, logged; the nodes beside it are listed."""
    key = registry_key(TOKEN.encode())
    registry = Registry(connect(ClusterSettings(store=store.url)), "elemta:", key)
    try:
        registry.register("node-a", "http://127.0.0.2:8025", "1", 0, 60,
                          smtp="127.0.0.2:2526")
        for field, node in (("nameless", {"api_url": "http://127.0.0.3:8025"}),
                            ("node-c", {"name": "node-x", "api_url": "http://x:1"}),
                            ("node-d", {"name": ["node-d"], "api_url": 1})):
            payload = json.dumps(node)
            registry.client.hset(b"elemta:nodes", field, json.dumps({
                "node": payload, "sig": sign(key, payload), "heartbeat": 1e12,
                "expires": 1e12}))
        nodes = registry.nodes()
        assert [(n.name, n.api_url, n.smtp, n.smtp_login, n.version) for n in nodes] == [
            ("node-a", "http://127.0.0.2:8025", "127.0.0.2:2526", False, "1")]
        assert 0 <= nodes[0].age < 5 and nodes[0].heartbeat > 1.6e9
    finally:
        registry.close()


def test_a_handover_listener_without_an_api_token_is_a_configuration_error(tmp_path):
    from elemta.config import ConfigError, load_config
    path = tmp_path / "elemta.yaml"
    path.write_text("listeners:\n  - {address: 127.0.0.1, port: 2526, mode: handover}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(str(path))
    assert "%s:2: listeners[0].mode: handover logs the nodes in with the cluster's api " \
           "token: set api.token_file" % path in str(refused.value), str(refused.value)


@pytest.mark.parametrize("where", ["token", "token_file"])
def test_a_short_api_token_is_refused_for_a_cluster(tmp_path, where):
    """The token is the hand-over password's and the registry key's seed: a short one
    names its file, line and key at config check."""
    from elemta.config import ConfigError, load_config
    token_file = tmp_path / "token"
    token_file.write_text("short-token\n")
    value = "short-token" if where == "token" else str(token_file)
    path = tmp_path / "elemta.yaml"
    path.write_text("listeners:\n  - {address: 127.0.0.1, port: 2526, mode: handover}\n"
                    "api:\n  %s: %s\n" % (where, value))
    with pytest.raises(ConfigError) as refused:
        load_config(str(path))
    assert "%s:4: api.%s: the cluster's api token is 11 bytes, fewer than 16" \
           % (path, where) in str(refused.value), str(refused.value)
    # Long enough, or no cluster at all: accepted.
    path.write_text("listeners:\n  - {address: 127.0.0.1, port: 2526, mode: handover}\n"
                    "api:\n  token: %s\n" % TOKEN)
    load_config(str(path))
    path.write_text("api:\n  %s: %s\n" % (where, value))
    load_config(str(path))


def test_an_expired_entry_rewritten_to_live_on_is_left_out(store, caplog):
    """Whoever writes to the store (without the api token) keeps a node's old signed
    entry, or rewrites its expires far ahead: a node long gone (its pod IP since given
    to another pod) would get drained mail and the token. Its signed heartbeat says how
    old it is, so the view leaves it out, logged; the live node beside it stays."""
    key = registry_key(TOKEN.encode())
    registry = Registry(connect(ClusterSettings(store=store.url)), "elemta:", key)
    try:
        registry.register("node-a", "http://127.0.0.2:8025", "1", 0, 60,
                          smtp="127.0.0.2:2526")
        seconds, _ = registry.client.time()
        # node-b's own registration, an hour old, with a ttl of a minute: signed.
        payload = json.dumps({"name": "node-b", "api_url": "http://127.0.0.3:8025",
                              "smtp": "127.0.0.3:2526", "login": True, "version": "1",
                              "started": 0, "heartbeat": seconds - 3600, "ttl": 60},
                             sort_keys=True)
        # The unsigned housekeeping rewritten to look fresh and last forever.
        registry.client.hset(b"elemta:nodes", "node-b", json.dumps({
            "node": payload, "sig": sign(key, payload), "heartbeat": seconds,
            "expires": seconds + 10 ** 9}))
        caplog.set_level("WARNING", logger="elemta.cluster")
        assert [n.name for n in registry.nodes()] == ["node-a"]
        assert "registry entry node-b in elemta:nodes is left out: its signed heartbeat " \
            "is older than its ttl (60s)" in caplog.text
        # Within its ttl it was a live node: the check is the signed age, nothing else.
        fresh = payload.replace('"heartbeat": %d' % (seconds - 3600),
                                '"heartbeat": %d' % seconds)
        registry.client.hset(b"elemta:nodes", "node-b", json.dumps({
            "node": fresh, "sig": sign(key, fresh), "heartbeat": seconds,
            "expires": seconds + 60}))
        assert [n.name for n in registry.nodes()] == ["node-a", "node-b"]
    finally:
        registry.close()
