"""Three Elemta nodes as one mail system on one machine (issue 19, requirements 3 and 5).

Three real servers (tests/harness.py), their SMTP and REST API on 127.0.0.2, 127.0.0.3
and 127.0.0.4, each with its own spool, sharing one private redis-server
(tests/peers/redis.py) as cluster.store. What an admin sees: a sender greylisted on one
node passes on another; a sender's rate limit counts the three together; the api
process of each registers its node, and `elemtactl --cluster queue ...` and
/api/v1/cluster/... act on all of them at once; a node stopped is named as not
answering, then drops out after cluster.node_ttl; redis-server killed and restarted
loses no accepted mail and the view comes back by itself.
See also: elemta.cluster, elemta.api.cluster_routes, elemta.cli.clustercmd,
tests/test_cluster_state.py (two nodes, the shared checks in depth).
"""

import http.client
import json
import os
import re
import signal
import smtplib
import ssl
import subprocess
import urllib.request
import sys
import time

import pytest

from elemta.cluster.credential import registry_key
from elemta.cluster.registry import Registry
from elemta.config.schema import ClusterSettings
from elemta.sharedstate.redisstore import connect
from tests import api_fuzz
from tests.harness import REPO, free_port, wait_for
from tests.peers import redis as redis_peer

pytestmark = pytest.mark.skipif(redis_peer.missing() is not None,
                                reason=redis_peer.missing() or "")

ADDRESSES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3", "node-c": "127.0.0.4"}
TOKEN = "one-token-for-the-cluster"
LIMIT = 3                        # messages per sender per minute, across the cluster
# cluster.node_ttl: long enough that a stopped node is still registered (named as not
# answering) through the few elemtactl runs after its stop on a loaded machine.
TTL = 10.0
EX_UNAVAILABLE = 69


@pytest.fixture
def store(tmp_path):
    with redis_peer.RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def cluster(elemta_server, tmp_path, store):
    """{name: ElemtaServer} of the three nodes, registered in the view."""
    nodes = {}
    for name, address in ADDRESSES.items():
        nodes[name] = elemta_server(
            listeners=[{"mode": "smtp", "address": address, "port": free_port(address)}],
            relay={"mynetworks": ["192.0.2.0/24"],
                   "local_domains": ["example.test", "grey.test"]},
            api={"address": address, "port": free_port(address), "token": TOKEN},
            cluster={"store": store.url, "node_name": name, "timeout": 0.5,
                     "retry_interval": 0.5, "heartbeat_interval": 0.5, "node_ttl": TTL,
                     "api_timeout": 2,
                     # Not relay.mynetworks: the loopback clients must not relay here.
                     "peer_networks": ["127.0.0.0/8"]},
            plugins={"ratelimit": {"enabled": True, "sender_message_rate_limit": LIMIT,
                                   "time_unit": 60,
                                   "database": str(tmp_path / (name + "-rate"))},
                     "greylist": {"enabled": True, "delay": 2,
                                  "allow_domains": ["example.test"],
                                  "database": str(tmp_path / (name + "-grey"))}})
    wait_for(lambda: sorted(n["name"] for n in api(nodes["node-a"], "GET",
                                                   "/nodes")[1]["nodes"]) == sorted(nodes),
             30)
    return nodes


def api(node, method, path):
    """(status, JSON) of /api/v1/cluster + path on node's REST API."""
    address = ADDRESSES[node_name(node)]
    connection = http.client.HTTPConnection(address, node_api_port(node), timeout=20)
    try:
        connection.request(method, "/api/v1/cluster" + path,
                           headers={"Authorization": "Bearer " + TOKEN})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def node_name(node):
    return next(name for name, address in ADDRESSES.items() if address == node.address)


def node_api_port(node):
    from ruamel.yaml import YAML
    with open(node.config_path) as f:
        return YAML(typ="safe").load(f)["api"]["port"]


def elemtactl(node, *args):
    """(exit status, stdout, stderr) of `elemtactl --config NODE'S --cluster queue ARGS`."""
    done = subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "--config",
                           node.config_path, "--cluster", "queue"] + list(args),
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))
    return done.returncode, done.stdout, done.stderr


def smtp(node):
    client = smtplib.SMTP(node.address, node.port, timeout=20)
    client.ehlo("client.test")
    return client


def send(node, sender, recipient="b@example.test"):
    """The final reply code of one whole message (250: queued on node)."""
    with smtp(node) as client:
        try:
            client.sendmail(sender, [recipient], b"Subject: cluster\r\n\r\nhello\r\n")
        except smtplib.SMTPResponseException as error:
            return error.smtp_code
        except smtplib.SMTPRecipientsRefused as error:
            return error.recipients[recipient][0]
        return 250


def rcpt(node, sender, recipient):
    """(code, text) of RCPT TO."""
    with smtp(node) as client:
        client.mail(sender)
        code, text = client.rcpt(recipient)
        return code, text.decode()


def test_greylisting_and_rate_limits_are_the_clusters(cluster):
    a, b, c = cluster["node-a"], cluster["node-b"], cluster["node-c"]
    code, text = rcpt(a, "new@sender.test", "x@grey.test")
    assert code == 451 and text.startswith("4.7.1 Greylisted"), text
    assert rcpt(b, "new@sender.test", "x@grey.test")[0] == 451    # too early there too
    time.sleep(2.2)
    assert rcpt(c, "new@sender.test", "x@grey.test")[0] == 250    # the retry elsewhere
    # LIMIT messages a minute for one sender, whichever nodes they reach.
    assert [send(node, "bulk@sender.test") for node in (a, b, c)] == [250] * LIMIT
    assert [send(node, "bulk@sender.test") for node in (a, b, c)] == [450] * 3
    assert send(b, "other@sender.test") == 250                     # per sender


def test_cluster_queue_view_acts_on_every_node_and_names_the_silent(cluster):
    a, b, c = cluster["node-a"], cluster["node-b"], cluster["node-c"]
    ids = {}
    for name, node in cluster.items():
        assert send(node, "%s@sender.test" % name) == 250
        ids[name] = node.queued_ids()[0]
    # Each held through the view from one node: the node that has it does it.
    for name, queue_id in ids.items():
        status, out, err = elemtactl(a, "hold", queue_id)
        assert (status, err) == (0, ""), err
        assert out == "%s: placed on hold (node %s)\nPlaced on hold: 1 message\n" % (
            queue_id, name)
        with cluster[name].queue() as queue:
            assert queue.get(queue_id).state == "hold"

    status, out, err = elemtactl(b, "summary", "--json")
    assert (status, err) == (0, "")
    summary = json.loads(out)
    assert summary["states"]["hold"] == {"messages": 3,
                                         "bytes": summary["states"]["hold"]["bytes"]}
    assert summary["messages"] == 3 and summary["complete"] and summary["missing"] == []
    assert {name: figures["states"]["hold"]["messages"]
            for name, figures in summary["nodes"].items()} == dict.fromkeys(cluster, 1)
    assert api(c, "GET", "/queue/summary") == (200, summary)
    status, out, _ = elemtactl(c, "summary")
    assert status == 0
    assert "hold                3          0\n" in out           # the cluster's total
    for name in cluster:                                       # and each node's
        assert "%-20s %-10s %10d %10d\n" % (name, "hold", 1, 0) in out

    status, out, _ = elemtactl(a, "list", "--json")
    listed = [json.loads(line) for line in out.splitlines()]
    assert status == 0
    assert [(m["queue_id"], m["node"]) for m in listed] == sorted(
        (queue_id, name) for name, queue_id in ids.items())
    status, page = api(a, "GET", "/queue?limit=2")
    assert status == 200 and [m["queue_id"] for m in page["messages"]] == sorted(
        ids.values())[:2]
    assert page["next_cursor"] == sorted(ids.values())[1]
    status, shown = api(b, "GET", "/queue/" + ids["node-c"])
    assert (status, shown["node"], shown["sender"]) == (200, "node-c", "node-c@sender.test")
    status, out, err = elemtactl(c, "show", ids["node-b"])
    assert (status, err) == (0, "")
    assert out.startswith("Node:       node-b\nQueue ID:   %s\nState:      hold\n"
                          % ids["node-b"]), out
    assert "Subject: cluster\n" in out

    # node-c stops: named as not answering until its registration runs out.
    c.stop()
    status, out, err = elemtactl(a, "summary", "--json")
    assert status == EX_UNAVAILABLE
    partial = json.loads(out)
    assert partial["messages"] == 2 and not partial["complete"]
    assert [m["node"] for m in partial["missing"]] == ["node-c"]
    assert err.startswith("elemtactl: node node-c (http://127.0.0.4:%d) did not answer: "
                          % node_api_port(c)), err
    status, out, err = elemtactl(a, "release", ids["node-c"])
    assert status == EX_UNAVAILABLE
    assert "no such message: %s on the nodes that answered" % ids["node-c"] in err
    assert "node node-c" in err
    status, nodes = api(b, "GET", "/nodes")
    assert status == 200 and {n["name"]: n["answers"] for n in nodes["nodes"]} == {
        "node-a": True, "node-b": True, "node-c": False}
    wait_for(lambda: elemtactl(a, "summary", "--json")[0] == 0, TTL + 10)
    status, nodes = api(a, "GET", "/nodes")
    assert [n["name"] for n in nodes["nodes"]] == ["node-a", "node-b"]
    assert nodes["complete"]

    status, out, err = elemtactl(b, "release", "--all")
    assert (status, err) == (0, "")
    assert out.endswith("Released from hold: 2 messages\n")


def defer(node, queue_id, seconds=3600):
    """Record a failed delivery attempt of queue_id on node, as its delivery worker would
    (the nodes run none): deferred, next try in `seconds`."""
    with node.queue() as queue:
        assert [r.queue_id for r in queue.claim_ids("test", [queue_id], 60)] == [queue_id]
        queue.record_attempt("test", queue_id, {0: ("deferred", "451 4.3.0 try later",
                                                    "relay.test")},
                             time.time() + seconds, "451 4.3.0 try later")


def record(node, queue_id):
    with node.queue() as queue:
        return queue.get(queue_id)


class OlderNode:
    """A node registered in the store (signed, inside peer_networks) whose REST API
    refuses the listing with 400, as a node of another version may."""

    def __init__(self, store):
        import http.server
        import threading
        asked = self.asked = []

        class Refusing(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                asked.append(self.path)
                body = json.dumps({"error": "unknown parameter limit"}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = http.server.HTTPServer(("127.0.0.5", 0), Refusing)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.registry = Registry(connect(ClusterSettings(store=store.url)), "elemta:",
                                 registry_key(TOKEN.encode()))

    def __enter__(self):
        self.thread.start()
        self.registry.register("node-old", "http://127.0.0.5:%d" % self.server.server_port,
                               "0.1", time.time(), 60)
        return self

    def __exit__(self, *exc_info):
        self.registry.client.hdel(b"elemta:nodes", "node-old")
        self.registry.close()
        self.server.shutdown()
        self.server.server_close()


def test_cluster_list_flush_and_actions_by_id_change_each_node(cluster, store):
    # What each node registered: where its API and its SMTP are, its version, and a
    # heartbeat that keeps coming.
    from elemta import __version__
    status, first = api(cluster["node-a"], "GET", "/nodes")
    assert status == 200 and first["complete"]
    for listed in first["nodes"]:
        node = cluster[listed["name"]]
        assert (listed["api_url"], listed["smtp_address"], listed["version"],
                listed["answers"]) == ("http://%s:%d" % (node.address, node_api_port(node)),
                                       "%s:%d" % (node.address, node.port), __version__,
                                       True)
        assert abs(listed["last_heartbeat"] - time.time()) < TTL
    wait_for(lambda: all(
        later["last_heartbeat"] > earlier["last_heartbeat"] for earlier, later in zip(
            first["nodes"], api(cluster["node-b"], "GET", "/nodes")[1]["nodes"])), 20)
    ids = {}
    for name, node in cluster.items():
        assert send(node, "%s@sender.test" % name) == 250
        ids[name] = node.queued_ids()[0]
        defer(node, ids[name])
    a, b, c = cluster["node-a"], cluster["node-b"], cluster["node-c"]

    # mailq's layout, one block per node (issue 19 review: this crashed with exit 70).
    status, out, err = elemtactl(a, "list")
    assert (status, err) == (0, ""), err
    for name, queue_id in ids.items():
        block = out.split("Node %s:\n" % name, 1)[1].split("\nNode ", 1)[0]
        assert block.startswith("-------Queue ID------ --Size--"), out
        assert queue_id in block and "%s@sender.test" % name in block, out
        assert "(451 4.3.0 try later)" in block and "b@example.test" in block, out
        assert block.rstrip("\n").endswith("-- 0 Kbytes in 1 Request."), out
    # A node that refuses the listing (a 4xx: one of another version, say) is named
    # with its refusal (exit 64), not as a node that did not answer.
    with OlderNode(store) as older:
        status, out, err = elemtactl(a, "list")
    assert (status, out) == (64, ""), (status, out, err)
    assert err == "elemtactl: --cluster: node node-old answered 400: unknown parameter " \
                  "limit\n", err
    assert older.asked and older.asked[0].startswith("/api/v1/queue?")

    # --cluster queue flush: every node's deferred mail due now.
    status, out, err = elemtactl(b, "flush")
    assert (status, err) == (0, ""), err
    assert out == "".join("%s: Due now: 1 message\n" % name for name in sorted(cluster)) \
        + "Due now: 3 messages\n", out
    for name, node in cluster.items():
        assert record(node, ids[name]).next_attempt <= time.time()

    # The REST form of the same, after the messages were put back to wait an hour.
    for name, node in cluster.items():
        with node.queue() as queue:
            list(queue.hold([ids[name]]))
            list(queue.release([ids[name]], now=time.time() + 3600))
        assert record(node, ids[name]).next_attempt > time.time() + 3000
    status, flushed = api(c, "POST", "/queue/flush")
    assert status == 200 and flushed["flushed"] == 3 and flushed["complete"], flushed
    assert {name: answer["flushed"] for name, answer in flushed["nodes"].items()} == \
        dict.fromkeys(cluster, 1)
    for name, node in cluster.items():
        assert record(node, ids[name]).next_attempt <= time.time()

    # By id through the REST API of another node: the node that has it acts.
    queue_id = ids["node-b"]
    status, held = api(a, "POST", "/queue/%s/hold" % queue_id)
    assert (status, held["node"], held["changed"]) == (200, "node-b", True), held
    assert record(b, queue_id).state == "hold"
    status, released = api(c, "POST", "/queue/%s/release" % queue_id)
    assert (status, released["node"], released["changed"]) == (200, "node-b", True)
    assert record(b, queue_id).state == "deferred"
    with b.queue() as queue:
        list(queue.hold([queue_id]))
        list(queue.release([queue_id], now=time.time() + 3600))
    status, flushed = api(a, "POST", "/queue/%s/flush" % queue_id)
    assert (status, flushed["node"], flushed["changed"]) == (200, "node-b", True)
    assert record(b, queue_id).next_attempt <= time.time()
    assert record(a, ids["node-a"]).state == record(c, ids["node-c"]).state == "deferred"
    status, body = api(a, "POST", "/queue/%s/hold" % ("0" * len(queue_id)))
    assert status == 404, body


def test_store_killed_and_restarted_keeps_the_mail_and_the_view_returns(cluster, store):
    a, b = cluster["node-a"], cluster["node-b"]
    for name, node in cluster.items():
        assert send(node, "before-%s@load.test" % name) == 250
    store.process.send_signal(signal.SIGKILL)
    store.process.wait()
    # Mail keeps flowing (cluster.store_failure local); the view says why it cannot see.
    for n in range(2):
        for name, node in cluster.items():
            assert send(node, "during-%s-%d@load.test" % (name, n)) == 250
    status, out, err = elemtactl(a, "summary")
    assert status == EX_UNAVAILABLE and out == ""
    assert "the cluster store cannot be reached" in err, err
    status, body = api(b, "GET", "/queue/summary")
    assert status == 503 and "cluster store cannot be reached" in body["error"]
    store.start()                       # empty: a replaced store
    # The heartbeats register the nodes again; the view totals all that was accepted.
    wait_for(lambda: elemtactl(b, "summary", "--json")[0] == 0, 30)
    summary = json.loads(elemtactl(b, "summary", "--json")[1])
    for name, node in cluster.items():
        assert summary["nodes"][name]["messages"] == len(node.queued_ids()) == 3
    assert summary["messages"] == 9
    assert send(a, "after@load.test") == 250


@pytest.mark.skipif(api_fuzz.schemathesis is None, reason=api_fuzz.MISSING)
def test_schemathesis_finds_the_cluster_routes_as_documented(cluster):
    """The cluster routes of the served document (tests/api_fuzz.py), against a real
    cluster this time (tests/test_api_rest.py fuzzes them on a node in no cluster:
    404s): answers merged from three nodes fit the document, bad data is refused,
    nothing is a server error."""
    a = cluster["node-a"]
    for name, node in cluster.items():
        assert send(node, "%s@sender.test" % name) == 250
    auth = {"Authorization": "Bearer " + TOKEN}
    operations = api_fuzz.operations("http://%s:%d/api/v1/openapi.json" % (
        a.address, node_api_port(a)), auth, prefix="/api/v1/cluster/")
    assert len(operations) == 9, [o.label for o in operations]
    api_fuzz.fuzz_operations(operations, auth, examples=10, timeout=20)


def test_no_token_over_plain_http_where_api_plain_http_forbids_it(elemta_server, store):
    """The api token over http:// can be read by anyone on the path: a node whose
    cluster.api_plain_http is never (as for a non-loopback address by default) sends
    it to no http:// api_url, names the node as not answering, and counts it."""
    address = ADDRESSES["node-a"]
    node = elemta_server(
        listeners=[{"mode": "smtp", "address": address, "port": free_port(address)}],
        api={"address": address, "port": free_port(address), "token": TOKEN},
        cluster={"store": store.url, "node_name": "node-a", "api_timeout": 2,
                 "heartbeat_interval": 0.5, "peer_networks": ["127.0.0.0/8"],
                 "api_plain_http": "never"})
    with OlderNode(store) as older:
        status, body = api(node, "GET", "/queue")
    assert status == 200 and not body["complete"], body
    missing = {m["node"]: m["error"] for m in body["missing"]}
    assert "plain http://" in missing["node-old"] and "api_plain_http" in \
        missing["node-old"], missing
    assert older.asked == []                     # no request, so no token
    with urllib.request.urlopen("http://%s:%d/metrics" % (address, node_api_port(node)),
                                timeout=10) as response:
        scraped = response.read().decode()
    assert re.search(r'^elemta_cluster_api_token_withheld_total\{reason="plain_http"\} '
                     r'[1-9]', scraped, re.M), scraped
    assert "not sending the api token to node node-old" in node.log()


def test_the_view_asks_https_apis_verified_by_the_cluster_ca(elemta_server, store,
                                                             tmp_path):
    """Nodes whose api serves https (api.cert_file): a node whose cluster.peer_ca_file
    signs their certificates sees them answer; one with another CA sends them nothing
    (the handshake fails before the token) and names them as not answering."""
    from tests.peers.sink import make_test_pki
    ca, cert, key = make_test_pki(str(tmp_path / "cluster"), "localhost")
    other_ca, _, _ = make_test_pki(str(tmp_path / "other"), "localhost")
    nodes = {}
    for name, peer_ca in (("node-a", ca), ("node-b", other_ca)):
        port = free_port("127.0.0.1")
        nodes[name] = (elemta_server(
            listeners=[{"mode": "smtp", "address": ADDRESSES[name],
                        "port": free_port(ADDRESSES[name])}],
            api={"address": "127.0.0.1", "port": port, "token": TOKEN,
                 "cert_file": cert, "key_file": key},
            cluster={"store": store.url, "node_name": name, "api_timeout": 2,
                     "heartbeat_interval": 0.5, "peer_networks": ["127.0.0.0/8"],
                     "api_url": "https://localhost:%d" % port, "peer_ca_file": peer_ca,
                     "api_plain_http": "never"}), port)

    def answers(name):
        connection = http.client.HTTPSConnection(
            "localhost", nodes[name][1], timeout=20,
            context=ssl.create_default_context(cafile=ca))
        try:
            connection.request("GET", "/api/v1/cluster/nodes",
                               headers={"Authorization": "Bearer " + TOKEN})
            listed = json.loads(connection.getresponse().read())["nodes"]
        finally:
            connection.close()
        return {node["name"]: node["answers"] for node in listed}

    wait_for(lambda: answers("node-a") == {"node-a": True, "node-b": True}, 30)
    assert answers("node-b") == {"node-a": False, "node-b": False}
