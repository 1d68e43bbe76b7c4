"""The shared state behind Sentinel (issue 19, requirement 7): cluster.store as
redis+sentinel://, against real redis-servers on loopback (tests/peers/redis.py): a
primary, its replica, and a redis-server in sentinel mode watching them.

What an admin sees: two nodes count a sender's messages together through the primary
the Sentinel names; the primary killed, the Sentinel promotes the replica, and the
nodes, mail flowing meanwhile, find the new primary by themselves: counts made before
the failover still hold, and new ones are shared again.
See also: elemta.sharedstate.storeurl, elemta.sharedstate.redisstore.connect.
"""

import signal

import pytest
import redis

from tests.harness import wait_for
from tests.peers import redis as redis_peer
from tests.test_cluster_state import LIMIT, NOT_US, send

pytestmark = pytest.mark.skipif(redis_peer.missing() is not None,
                                reason=redis_peer.missing() or "")

RESUMED = "shared state resumed"


@pytest.fixture
def stores(tmp_path):
    """(primary, replica, sentinel), replication under way."""
    with redis_peer.RedisServer(tmp_path, "primary") as primary, \
            redis_peer.RedisServer(tmp_path, "replica", replica_of=primary) as replica:
        wait_for(lambda: role(replica) == "slave" and redis.Redis(
            port=replica.port).info("replication")["master_link_status"] == "up", 30)
        with redis_peer.Sentinel(tmp_path, primary) as sentinel:
            yield primary, replica, sentinel


def role(server):
    try:
        return redis.Redis(port=server.port, socket_timeout=2).role()[0].decode()
    except redis.RedisError:
        return None


def start_node(elemta_server, tmp_path, sentinel, name):
    return elemta_server(
        relay={"mynetworks": NOT_US, "local_domains": ["example.test"]},
        cluster={"store": sentinel.url, "timeout": 0.5, "retry_interval": 0.5},
        plugins={"ratelimit": {"enabled": True, "sender_message_rate_limit": LIMIT,
                               "time_unit": 3600,
                               "database": str(tmp_path / (name + "rl"))}})


def test_nodes_share_state_through_sentinel_and_follow_its_failover(
        elemta_server, tmp_path, stores):
    primary, replica, sentinel = stores
    a = start_node(elemta_server, tmp_path, sentinel, "a")
    b = start_node(elemta_server, tmp_path, sentinel, "b")
    assert [send(node.port, "bulk@sender.test") for node in (a, b, a)] == [250] * LIMIT
    assert send(b.port, "bulk@sender.test") == 450
    # The counts are the primary's, and its replica has them.
    assert redis.Redis(port=primary.port).wait(1, 5000) == 1

    primary.process.send_signal(signal.SIGKILL)
    primary.process.wait()
    # Mail flows while the Sentinel notices and promotes the replica.
    for n in range(3):
        assert send(a.port, "during%d@sender.test" % n) == 250
    wait_for(lambda: role(replica) == "master", 60)
    probes = iter(range(10 ** 6))

    def both_resumed():
        """A message on each node (a store call, the probe once retry_interval is
        over); then whether both found the new primary."""
        for node in (a, b):
            assert send(node.port, "probe%d@load.test" % next(probes)) == 250
        return all(RESUMED in node.log() for node in (a, b))
    wait_for(both_resumed, 60)
    # What was counted before the failover still counts; new counts are shared.
    assert send(a.port, "bulk@sender.test") == 450
    assert [send(node.port, "after@sender.test") for node in (b, a, b)] == [250] * LIMIT
    assert send(a.port, "after@sender.test") == 450
    for node in (a, b):
        assert "cluster store redis+sentinel://127.0.0.1:%d/elemta/0 unavailable" % (
            sentinel.port) in node.log()


def test_sentinel_urls_name_the_sentinels_service_and_database():
    from elemta.sharedstate.process import shown_url
    from elemta.sharedstate.storeurl import SentinelTarget, parse_sentinel
    assert parse_sentinel("redis+sentinel://s1,[2001:db8::1]:26380,s3:1/mail/2") == \
        SentinelTarget(sentinels=(("s1", 26379), ("2001:db8::1", 26380), ("s3", 1)),
                       service="mail", db=2, tls=False)
    assert parse_sentinel("rediss+sentinel://watch:p%40ss@s1/mail") == SentinelTarget(
        sentinels=(("s1", 26379),), service="mail", db=0, tls=True, username="watch",
        password="p@ss")
    assert shown_url("redis+sentinel://watch:secret@s1,s2/mail/0") == \
        "redis+sentinel://s1,s2/mail/0"
    assert shown_url("redis://:secret@127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"

