"""The smtpd's checks sharing their state through a real redis-server (issue 19,
requirements 1 and 2, as the review asked: through smtpd, across two nodes).

Two Elemta instances stand for two nodes on one store (tests/peers/redis.py), with a
non-default cluster.key_prefix, their DNS pointed at a private NSD (tests/peers/nsd.py)
serving a DNS block list. Clients come from their own loopback addresses (127.0.0.0/8
is all loopback), so each check counts its own client. What an admin sees: the
connection, recipient and AUTH-user rate limits count both nodes together; AUTH
failures made on node A slow the client down on node B; a DNSBL answer looked up by A
is served by B after the DNS server is gone; with the store down AUTH answers 454 4.7.0
under store_failure tempfail and mail flows on under local, counted in
elemta_cluster_store_fallbacks_total; every key is under the prefix; and the store
itself forgets counts and greylisting triplets when their windows end (its TTLs).
See also: tests/test_cluster_state.py (sender limits, greylisting, outages),
elemta.sharedstate.
"""

import smtplib
import socket

import pytest

from elemta.config.schema import ClusterSettings
from elemta.sharedstate.redisstore import connect
from tests.harness import free_port, wait_for
from tests.peers import redis as redis_peer
from tests.peers.nsd import NSDInstance, nsd_available
from tests.test_metrics import healthy, labelled, scrape

pytestmark = [
    pytest.mark.skipif(redis_peer.missing() is not None, reason=redis_peer.missing() or ""),
    pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))]

NOT_US = ["192.0.2.0/24"]       # mynetworks without the loopback clients
PREFIX = "site1:"
# bl.test lists 127.0.0.2 and 127.0.0.3.
ZONES = {"bl.test": "2.0.0.127 A 127.0.0.2\n3.0.0.127 A 127.0.0.2\n"}
CONNECTIONS, RECIPIENTS, USER_MESSAGES = 2, 3, 2       # per hour, across the nodes
FAILURE_DELAY = 1.0
UNCOUNTED = "127.0.0.16"


@pytest.fixture
def store(tmp_path):
    with redis_peer.RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def nsd(tmp_path):
    server = NSDInstance(str(tmp_path / "nsd"), ZONES)
    server.start()
    yield server
    server.stop()


def start_node(elemta_server, tmp_path, store, nsd, credentials, name, policy):
    api_port = free_port()
    node = elemta_server(
        relay={"mynetworks": NOT_US},
        api={"enabled": True, "port": api_port},
        dns={"nameservers": ["127.0.0.1"], "port": nsd.port, "timeout": 2.0},
        auth={"credentials_file": credentials, "allow_plaintext": True,
              "failure_delay": FAILURE_DELAY},
        cluster={"store": store.url, "key_prefix": PREFIX, "timeout": 0.5,
                 "retry_interval": 0.5, "store_failure": policy},
        plugins={"dnsbl": {"enabled": True, "sites": ["bl.test"]},
                 "ratelimit": {"enabled": True, "time_unit": 3600,
                               "connection_rate_limit": CONNECTIONS,
                               "recipient_rate_limit": RECIPIENTS,
                               "user_message_rate_limit": USER_MESSAGES,
                               # Not counted: it reaches AUTH while the store is down
                               # (A would refuse its connection with 421 4.3.0).
                               "exceptions": [UNCOUNTED],
                               "database": str(tmp_path / (name + "-rate"))}})
    wait_for(lambda: healthy(api_port), 30)
    node.api_port = api_port
    return node


@pytest.fixture
def nodes(elemta_server, tmp_path, store, nsd, credentials, monkeypatch):
    """(A, B): A refuses what it cannot count while the store is down (tempfail), B
    counts alone (local). Each keeps its own metrics."""
    started = []
    for name, policy in (("a", "tempfail"), ("b", "local")):
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / (name + "-metrics")))
        started.append(start_node(elemta_server, tmp_path, store, nsd, credentials, name,
                                  policy))
    return started


def session(node, source):
    client = smtplib.SMTP(timeout=20, source_address=(source, 0))
    client.connect("127.0.0.1", node.port)
    client.ehlo("client.test")
    return client


def greeting(node, source):
    with socket.create_connection(("127.0.0.1", node.port), timeout=20,
                                  source_address=(source, 0)) as sock:
        return sock.makefile("rb").readline()


def store_keys(store):
    client = connect(ClusterSettings(store=store.url))
    try:
        return sorted(key.decode() for key in client.keys("*"))
    finally:
        client.close()


def test_checks_count_across_nodes_and_fall_back_when_the_store_is_gone(nodes, store,
                                                                        nsd):
    a, b = nodes
    # Connections from one client: CONNECTIONS an hour, on whichever node.
    for node in (a, b):
        assert greeting(node, "127.0.0.10").startswith(b"220 ")
    assert greeting(b, "127.0.0.10") == (b"421 4.7.0 mx.test Error: too many connections from "
                                        b"127.0.0.10\r\n")

    # Recipients from one client, counted together.
    with session(a, "127.0.0.11") as client:
        client.mail("s@sender.test")
        assert [client.rcpt("r%d@example.test" % n)[0] for n in range(2)] == [250, 250]
    with session(b, "127.0.0.11") as client:
        client.mail("s@sender.test")
        assert client.rcpt("r2@example.test")[0] == 250
        assert client.rcpt("r3@example.test") == (
            450, b"4.7.1 Error: too many recipients from 127.0.0.11")

    # One AUTH user's messages, whichever node and client.
    for node, source in ((a, "127.0.0.12"), (b, "127.0.0.13")):
        with session(node, source) as client:
            client.login("alice", "wonderland")
            assert client.mail("alice@example.test")[0] == 250
    with session(a, "127.0.0.14") as client:
        client.login("alice", "wonderland")
        assert client.mail("alice@example.test") == (
            450, b"4.7.1 Error: too much mail from user alice")

    # AUTH failures on A: the client waits for them on B, before its password is read.
    with session(a, "127.0.0.15") as client:
        # smtplib tries PLAIN, then LOGIN: two failures.
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice", "guess")
    with session(b, "127.0.0.15") as client:
        client.login("alice", "wonderland")
    assert "AUTH from 127.0.0.15 waits %.1fs: 2 recent failure(s) from 127.0.0.15" % (
        2 * FAILURE_DELAY) in b.log(), b.log()

    # A DNSBL answer A looked up is B's too, with the DNS server gone.
    assert greeting(a, "127.0.0.2").startswith(b"554 5.7.1 ")
    nsd.stop()
    assert greeting(b, "127.0.0.2") == (b"554 5.7.1 mx.test Service unavailable; client "
                                       b"[127.0.0.2] blocked using bl.test\r\n")
    # (127.0.0.3 is listed too, but never looked up: with no DNS, B cannot know.)
    assert greeting(b, "127.0.0.3").startswith(b"220 ")

    # Every key under the prefix: one store can serve several clusters.
    keys = store_keys(store)
    assert {key.split(":")[1] for key in keys} == {"rate", "authfail", "dnsbl"}, keys
    assert all(key.startswith(PREFIX) for key in keys), keys

    # The store gone: A (tempfail) cannot know the penalty and says so; B counts alone.
    store.stop()
    with session(a, UNCOUNTED) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("alice", "wonderland")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        454, b"4.7.0 Temporary authentication failure")
    with session(b, "127.0.0.17") as client:
        client.login("alice", "wonderland")
        client.sendmail("alice@example.test", ["r@example.test"], b"Subject: t\r\n\r\nx\r\n")
    def fallbacks(node):        # workers write their counts about once a second
        return labelled(scrape(node.api_port)[0], "elemta_cluster_store_fallbacks_total")
    wait_for(lambda: fallbacks(b).get(("auth", "local"), 0) >= 1
             and fallbacks(b).get(("ratelimit", "local"), 0) >= 1, timeout=30)
    wait_for(lambda: fallbacks(a).get(("auth", "tempfail"), 0) >= 1, timeout=30)


def test_the_store_forgets_counts_and_triplets_when_their_windows_end(elemta_server,
                                                                      tmp_path, store):
    """Short windows: the counts and an unconfirmed triplet vanish from redis by their
    TTLs (nothing of Elemta's deletes them), and the checks start afresh."""
    node = elemta_server(
        relay={"mynetworks": NOT_US, "local_domains": ["example.test", "grey.test"]},
        cluster={"store": store.url, "key_prefix": PREFIX, "timeout": 0.5,
                 "retry_interval": 0.5},
        plugins={"ratelimit": {"enabled": True, "time_unit": 2,
                               "sender_message_rate_limit": 1,
                               "database": str(tmp_path / "rate")},
                 "greylist": {"enabled": True, "delay": 1, "retry_window": 2,
                              "allow_domains": ["example.test"],
                              "database": str(tmp_path / "grey")}})

    def mail(sender, recipient="b@example.test"):
        with session(node, "127.0.0.20") as client:
            code, text = client.mail(sender)
            if code == 250:
                code, text = client.rcpt(recipient)
            return code

    def keys(kind):
        return [key for key in store_keys(store) if key.startswith(PREFIX + kind)]

    client = connect(ClusterSettings(store=store.url))
    try:
        assert mail("bulk@sender.test") == 250
        assert mail("bulk@sender.test") == 450
        [rate] = keys("rate:")
        assert 0 < client.pttl(rate) <= 2000
        wait_for(lambda: keys("rate:") == [], 20)      # expired in redis
        assert mail("bulk@sender.test") == 250           # a new window

        assert mail("new@sender.test", "x@grey.test") == 451
        [triplet] = keys("grey:")
        assert 0 < client.ttl(triplet) <= 2
        wait_for(lambda: keys("grey:") == [], 20)      # never retried: forgotten
        # The delay is long over, but the triplet is new again: greylisted anew.
        assert mail("new@sender.test", "x@grey.test") == 451
    finally:
        client.close()
