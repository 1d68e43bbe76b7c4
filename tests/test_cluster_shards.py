"""The shared state in a Valkey Cluster (issue 19, requirement 7): cluster.store as
redis+cluster://, against three real redis-servers in cluster mode on loopback
(tests/peers/redis.py), their slots shared out by redis-cli --cluster create.

What an admin sees: counts made by two clients at once on keys spread over the shards
are all kept; two nodes share rate limits and greylisting through the Cluster; the
DNSBL cache answers a batch whose keys lie in several slots; the node registry works;
a node started while the whole Cluster is down takes mail, and shares its state once
the Cluster is back.
See also: elemta.sharedstate.redisstore.LazyCluster, tests/test_cluster_state.py.
"""

import threading
import time

import pytest
import redis

from elemta.cluster.registry import Registry
from elemta.config.schema import ClusterSettings
from elemta.sharedstate.redisstore import RedisStore, connect
from tests.harness import wait_for
from tests.peers import redis as redis_peer
from tests.test_cluster_state import LIMIT, NOT_US, mail_from

pytestmark = pytest.mark.skipif(redis_peer.missing() is not None,
                                reason=redis_peer.missing() or "")


@pytest.fixture
def shards(tmp_path):
    """Three Cluster primaries; their redis+cluster:// URL names two of them (the
    client learns the third)."""
    nodes = [redis_peer.RedisServer(tmp_path, "shard%d" % n, cluster=True)
             for n in range(3)]
    try:
        for node in nodes:
            node.start()
        redis_peer.make_cluster(nodes)
        yield nodes, "redis+cluster://127.0.0.1:%d,127.0.0.1:%d" % (nodes[0].port,
                                                                   nodes[1].port)
    finally:
        for node in nodes:
            if node.process is not None:
                node.stop()


def keys_per_shard(nodes):
    return [redis.Redis(port=node.port).dbsize() for node in nodes]


def test_counts_spread_over_the_shards_are_all_kept(shards):
    nodes, url = shards
    settings = ClusterSettings(store=url)
    clients = [RedisStore(connect(settings), "elemta:") for _ in range(2)]
    keys = ["sender%d@load.test" % n for n in range(12)]

    def count(store):
        for _ in range(50):
            for key in keys:
                store.hit(key, 1, 60)
    threads = [threading.Thread(target=count, args=(store,)) for store in clients * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [clients[0].hit(key, 0, 60) for key in keys] == [200] * len(keys)
    assert sum(keys_per_shard(nodes)) == len(keys)
    assert sum(1 for n in keys_per_shard(nodes) if n) >= 2, keys_per_shard(nodes)
    # A DNSBL batch whose keys lie in several slots.
    queries = ["%d.0.0.127.bl.test" % n for n in range(8)]
    for query in queries:
        clients[0].put_verdict(query, ["127.0.0.2"], 60)
    assert clients[1].verdicts(queries + ["x.bl.test"]) == dict.fromkeys(
        queries, ["127.0.0.2"])
    # The node registry: one key, one slot.
    registry = Registry(connect(settings), "elemta:", b"the cluster's key")
    registry.register("node-a", "http://127.0.0.2:8025", "1", time.time(), 30,
                      smtp="127.0.0.2:25")
    assert [(n.name, n.smtp) for n in registry.nodes()] == [("node-a", "127.0.0.2:25")]
    for closing in clients + [registry]:
        closing.close()


def test_two_nodes_share_rate_limits_and_greylisting_through_the_cluster(
        elemta_server, tmp_path, shards):
    _, url = shards
    a, b = (elemta_server(
        relay={"mynetworks": NOT_US, "local_domains": ["example.test", "grey.test"]},
        cluster={"store": url, "timeout": 1, "retry_interval": 0.5},
        plugins={"ratelimit": {"enabled": True, "sender_message_rate_limit": LIMIT,
                               "time_unit": 3600,
                               "database": str(tmp_path / (name + "rl"))},
                 "greylist": {"enabled": True, "delay": 2,
                              "allow_domains": ["example.test"],
                              "database": str(tmp_path / (name + "grey"))}})
        for name in "ab")
    for port in (a.port, b.port, a.port):
        assert mail_from(port, "bulk@sender.test")[0] == 250
    assert mail_from(b.port, "bulk@sender.test")[0] == 450
    assert mail_from(a.port, "new@sender.test", "c@grey.test")[0] == 451
    assert mail_from(b.port, "new@sender.test", "c@grey.test")[0] == 451
    time.sleep(2.2)                     # the greylist delay itself
    assert mail_from(b.port, "new@sender.test", "c@grey.test")[0] == 250
    for node in (a, b):
        assert "unavailable" not in node.log(), node.log()


def test_a_node_started_while_the_cluster_is_down_uses_it_once_it_is_back(
        elemta_server, tmp_path, shards):
    nodes, url = shards
    for shard in nodes:
        shard.stop()
    node = elemta_server(
        relay={"mynetworks": NOT_US, "local_domains": ["example.test"]},
        cluster={"store": url, "timeout": 1, "retry_interval": 0.5},
        plugins={"ratelimit": {"enabled": True, "sender_message_rate_limit": LIMIT,
                               "time_unit": 3600, "database": str(tmp_path / "rl")}})
    assert mail_from(node.port, "early@sender.test")[0] == 250      # local counts
    assert "cluster store %s unavailable" % url in node.log()
    for shard in nodes:                 # each keeps its slots (nodes.conf)
        shard.start()
    wait_for(lambda: all(b"cluster_state:ok" in redis.Redis(port=s.port).execute_command(
        "CLUSTER", "INFO") for s in nodes), 30)
    senders = iter(range(10 ** 6))
    wait_for(lambda: mail_from(node.port, "probe%d@sender.test" % next(senders))[0] == 250
             and "shared state resumed" in node.log(), 30)
    assert mail_from(node.port, "late@sender.test")[0] == 250
    assert sum(keys_per_shard(nodes)) >= 1       # counted in the Cluster now


def test_cluster_urls_name_some_nodes_and_refuse_what_a_cluster_has_not():
    from elemta.sharedstate.storeurl import ClusterTarget, parse_cluster
    assert parse_cluster("redis+cluster://10.0.0.7,10.0.0.8:7000") == ClusterTarget(
        nodes=(("10.0.0.7", 6379), ("10.0.0.8", 7000)), tls=False)
    with pytest.raises(ValueError, match="database 0 alone"):
        parse_cluster("redis+cluster://10.0.0.7/3")
    with pytest.raises(ValueError, match="cluster.password_file"):
        parse_cluster("redis+cluster://:secret@10.0.0.7")
