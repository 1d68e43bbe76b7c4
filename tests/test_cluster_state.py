"""Shared state in Valkey/Redis (issue 19, requirements 1 and 2), against a real
redis-server (tests/peers/redis.py) and two Elemta instances standing for two nodes.

Covers elemta.sharedstate: counts made by two nodes at once are all kept; a sender over
its rate limit on node A is refused on node B; a triplet greylisted on node A passes on
node B after the delay; with redis-server stopped under load, mail keeps flowing with
local counts (store_failure local) or gets 451 4.3.0 (tempfail), the outage is logged
once per node however many workers see it, and shared counting comes back on its own
when redis-server does.
"""

import signal
import smtplib
import threading
import time

import pytest

from elemta.config.schema import ClusterSettings
from elemta.sharedstate.redisstore import RedisStore, connect
from tests.harness import free_port, wait_for, wait_for_settled
from tests.peers import redis as redis_peer
from tests.test_metrics import healthy, labelled, scrape

pytestmark = pytest.mark.skipif(redis_peer.missing() is not None,
                                reason=redis_peer.missing() or "")

NOT_US = ["192.0.2.0/24"]       # mynetworks without the loopback clients
LIMIT = 3                        # messages per sender per hour, across the cluster
UNAVAILABLE = "cluster store redis://127.0.0.1:%d/0 unavailable"
RESUMED = "shared state resumed"


@pytest.fixture
def store(tmp_path):
    with redis_peer.RedisServer(tmp_path) as server:
        yield server


def start_node(elemta_server, tmp_path, store, name, policy="local"):
    return elemta_server(
        relay={"mynetworks": NOT_US, "local_domains": ["example.test", "grey.test"]},
        cluster={"store": store.url, "timeout": 0.5, "retry_interval": 0.5,
                 "store_failure": policy},
        plugins={"ratelimit": {"enabled": True, "sender_message_rate_limit": LIMIT,
                               "time_unit": 3600, "database": str(tmp_path / (name + "rl"))},
                 "greylist": {"enabled": True, "delay": 2, "allow_domains": ["example.test"],
                              "database": str(tmp_path / (name + "grey"))}})


def mail_from(port, sender, recipient="b@example.test"):
    """(code, text) of MAIL FROM, or of RCPT TO when MAIL was accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender)
        if code == 250:
            code, text = client.rcpt(recipient)
        return code, text.decode()


def send(port, sender, recipient="b@example.test"):
    """The final reply code of one whole message."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        try:
            client.sendmail(sender, [recipient], b"Subject: t\r\n\r\nhello\r\n")
        except smtplib.SMTPResponseException as error:
            return error.smtp_code
        except smtplib.SMTPRecipientsRefused as error:
            return error.recipients[recipient][0]
        return 250


def test_two_nodes_counting_at_once_lose_no_count(store):
    settings = ClusterSettings(store=store.url)
    nodes = [RedisStore(connect(settings), "elemta:") for _ in range(2)]

    def count(node):
        for _ in range(250):
            node.hit("burst", 1, 60)
    threads = [threading.Thread(target=count, args=(node,)) for node in nodes * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert nodes[0].hit("burst", 0, 60) == nodes[1].hit("burst", 0, 60) == 1000
    assert [nodes[i % 2].record_failure("192.0.2.0", 600) for i in range(3)] == [1, 2, 3]
    assert nodes[1].failures("192.0.2.0") == 3
    nodes[0].put_verdict("2.0.0.127.bl.test", ["127.0.0.2"], 60)
    assert nodes[1].verdicts(["2.0.0.127.bl.test", "x.bl.test"]) == {
        "2.0.0.127.bl.test": ["127.0.0.2"]}


def test_two_nodes_share_rate_limits_and_greylisting(elemta_server, tmp_path, store):
    a = start_node(elemta_server, tmp_path, store, "a")
    b = start_node(elemta_server, tmp_path, store, "b")
    for port in (a.port, b.port, a.port):
        assert mail_from(port, "bulk@sender.test")[0] == 250
    code, text = mail_from(b.port, "bulk@sender.test")
    assert (code, text) == (450, "4.7.1 Error: too much mail from sender bulk@sender.test")
    assert mail_from(a.port, "other@sender.test")[0] == 250     # per sender
    # Greylisted on A; B knows the triplet: too early there too, then let through.
    code, text = mail_from(a.port, "new@sender.test", "c@grey.test")
    assert code == 451 and text.startswith("4.7.1 Greylisted")
    assert mail_from(b.port, "new@sender.test", "c@grey.test")[0] == 451
    time.sleep(2.2)
    assert mail_from(b.port, "new@sender.test", "c@grey.test")[0] == 250


def test_store_outage_falls_back_to_local_counts_and_recovers(elemta_server, tmp_path,
                                                              store):
    a = start_node(elemta_server, tmp_path, store, "a")
    b = start_node(elemta_server, tmp_path, store, "b")
    results, stop = [], threading.Event()

    def load(port, name):
        """Messages from ever new senders, to a recipient not greylisted."""
        n = 0
        while not stop.is_set():
            n += 1
            results.append(send(port, "%s%d@load.test" % (name, n)))
    loaders = [threading.Thread(target=load, args=(node.port, name))
               for node, name in ((a, "a"), (b, "b"))]
    for loader in loaders:
        loader.start()
    try:
        wait_for(lambda: len(results) >= 10, 30)
        store.stop()
        down = len(results)
        wait_for(lambda: len(results) >= down + 20, 60)
        # Local counts meanwhile: node A alone lets a sender through LIMIT times.
        for _ in range(LIMIT):
            assert mail_from(a.port, "solo@sender.test")[0] == 250
        assert mail_from(a.port, "solo@sender.test")[0] == 450
        assert mail_from(b.port, "solo@sender.test")[0] == 250
        store.start()
        # Each node's next probe (retry_interval) finds it back, under load.
        wait_for(lambda: all(RESUMED in node.log() for node in (a, b)), 30)
        up = len(results)
        wait_for(lambda: len(results) >= up + 20, 60)
    finally:
        stop.set()
        for loader in loaders:
            loader.join()
    assert set(results) == {250}, "mail refused during the outage: %s" % results
    for node in (a, b):
        log = node.log()
        assert log.count(UNAVAILABLE % store.port) == 1, log
        assert log.count(RESUMED) == 1, log
    # Shared again, without a restart: counted across both nodes.
    for port in (a.port, b.port, a.port):
        assert mail_from(port, "again@sender.test")[0] == 250
    assert mail_from(b.port, "again@sender.test")[0] == 450


def test_store_outage_with_tempfail_answers_451_at_the_check(elemta_server, tmp_path,
                                                             store):
    node = start_node(elemta_server, tmp_path, store, "t", policy="tempfail")
    assert mail_from(node.port, "one@sender.test")[0] == 250
    store.stop()
    assert mail_from(node.port, "one@sender.test") == (
        451, "4.3.0 Temporary failure: shared state store unavailable, try again later")
    store.start()
    wait_for(lambda: mail_from(node.port, "two@sender.test")[0] == 250, 10)
    assert node.log().count(UNAVAILABLE % store.port) == 1


def test_a_store_that_hangs_costs_a_timeout_not_the_mail(elemta_server, tmp_path, store):
    """redis-server frozen (SIGSTOP): connections open, nothing answers. The check waits
    cluster.timeout, falls back, and the next ones fall back at once."""
    node = start_node(elemta_server, tmp_path, store, "h")
    assert send(node.port, "first@sender.test") == 250
    store.process.send_signal(signal.SIGSTOP)
    try:
        assert [send(node.port, "hung%d@sender.test" % n) for n in range(5)] == [250] * 5
    finally:
        store.process.send_signal(signal.SIGCONT)
    assert node.log().count("unavailable (no answer within 0.5s)") == 1, node.log()
    wait_for(lambda: send(node.port, "back@sender.test") == 250 and RESUMED in node.log(),
             10)


def test_greylisting_outcomes_count_a_store_outage_as_tempfail(elemta_server, tmp_path,
                                                               store, monkeypatch):
    """elemta_greylist_checks_total{outcome}: defer, then pass once the delay is over,
    exempt for an allowed domain, tempfail while the store is gone (policy tempfail)."""
    api_port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    node = elemta_server(
        relay={"mynetworks": NOT_US, "local_domains": ["example.test", "grey.test"]},
        api={"enabled": True, "port": api_port},
        cluster={"store": store.url, "timeout": 0.5, "retry_interval": 0.5,
                 "store_failure": "tempfail"},
        plugins={"greylist": {"enabled": True, "delay": 0,
                              "allow_domains": ["example.test"],
                              "database": str(tmp_path / "grey")}})
    wait_for(lambda: healthy(api_port))
    assert mail_from(node.port, "a@sender.test", "b@grey.test")[0] == 451     # defer
    assert mail_from(node.port, "a@sender.test", "b@grey.test")[0] == 250     # pass
    assert mail_from(node.port, "a@sender.test", "b@example.test")[0] == 250  # exempt
    store.stop()
    assert mail_from(node.port, "a@sender.test", "b@grey.test") == (
        451, "4.3.0 Temporary failure: shared state store unavailable, try again later")
    wait_for_settled(lambda: labelled(scrape(api_port)[0], "elemta_greylist_checks_total") == {
        ("defer",): 1, ("pass",): 1, ("exempt",): 1, ("tempfail",): 1})


def smtpd_sessions(log, since):
    """{smtpd pid: sessions it began} in the log after offset since."""
    import re
    pids = re.findall(r"elemta/smtpd\[(\d+)\]: connect from", log[since:])
    return {pid: pids.count(pid) for pid in set(pids)}


def test_an_outage_is_logged_once_per_node_however_many_workers_see_it(
        elemta_server, tmp_path, store, monkeypatch):
    """Two smtpd workers both fall back during the outage and both recover, but the
    node logs and counts the outage once; the next outage is logged again."""
    api_port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    node = elemta_server(
        smtpd={"workers": 2},
        relay={"mynetworks": NOT_US, "local_domains": ["example.test"]},
        api={"enabled": True, "port": api_port},
        cluster={"store": store.url, "timeout": 0.5, "retry_interval": 0.5},
        plugins={"ratelimit": {"enabled": True, "sender_message_rate_limit": LIMIT,
                               "time_unit": 3600, "database": str(tmp_path / "rl")}})
    wait_for(lambda: healthy(api_port))
    results, stop = [], threading.Event()

    def load(name):
        n = 0
        while not stop.is_set():
            n += 1
            results.append(send(node.port, "%s%d@load.test" % (name, n)))

    def both_workers_served(since, sessions=3):
        served = smtpd_sessions(node.log(), since)
        return len(served) == 2 and min(served.values()) >= sessions
    loaders = [threading.Thread(target=load, args=(name,)) for name in "ab"]
    for loader in loaders:
        loader.start()
    try:
        for outage in (1, 2):
            wait_for(lambda: len(results) >= 10 * outage, 30)
            store.stop()
            down = len(node.log())
            # Each worker had sessions (so store calls) after the store went.
            wait_for(lambda: both_workers_served(down), 60)
            store.start()
            # Every worker's probe found it back: the lowest of their gauges is 1.
            wait_for(lambda: RESUMED in node.log()[down:] and scrape(api_port)[0][
                ("elemta_cluster_store_up", ())] == 1, 30)
            log = node.log()
            assert log.count(UNAVAILABLE % store.port) == outage, log
            assert log.count(RESUMED) == outage, log
            # Counted when it began, by a worker that writes its counts about once a
            # second: an outage shorter than that may reach the api after its end.
            wait_for_settled(lambda: scrape(api_port)[0].get(
                ("elemta_cluster_store_outages_total", ())) == outage)
    finally:
        stop.set()
        for loader in loaders:
            loader.join()
    assert set(results) == {250}, "mail refused during the outage: %s" % results
