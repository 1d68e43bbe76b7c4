"""The shared state in Valkey/Redis: every operation one Lua script, atomic on the server.

Owned by the smtpd worker (through elemta.sharedstate.process), one client per process,
opened after fork. A script runs alone on the server, so two nodes counting the same key
at once never lose a count (a GET then a SET from each would); expiry is the server's
TTLs, so nothing here purges. Times that must agree across nodes (a greylist triplet's
first sighting) are the server's clock (TIME), not each node's.

    rate counts     STRING  prefix + "rate:" + key      INCRBY; PEXPIRE at the first
                                                         event: anvil's window
    greylist        HASH    prefix + "grey:" + triplet  first, passes; TTL retry_window
                                                         until confirmed, then expiry
                                                         after each use
    AUTH failures   STRING  prefix + "authfail:" + group  INCR; EXPIRE window after
                                                         each failure
    DNSBL answers   STRING  prefix + "dnsbl:" + query   the addresses, comma-separated;
                                                         EX its DNS TTL

The calls block on their socket: elemta.sharedstate.guard runs them in threads, bounded
in time. redis-py retries nothing here (the guard decides what a failure means).
See also: elemta.sharedstate.interface, tests/test_cluster_state.py.
"""

import threading

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from elemta.sharedstate.storeurl import (is_cluster, is_sentinel, parse_cluster,
                                         parse_sentinel)

_RATE = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return count
"""

# ARGV: delay, retry_window, expiry (seconds). Returns {passed 0/1, seconds to wait}.
_GREYLIST = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local delay, retry, expiry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local record = redis.call('HMGET', KEYS[1], 'first', 'passes')
local first, passes = tonumber(record[1]), tonumber(record[2])
if first == nil or passes == nil then
  redis.call('HSET', KEYS[1], 'first', string.format('%.6f', now))
  redis.call('HSET', KEYS[1], 'passes', 0)
  redis.call('EXPIRE', KEYS[1], math.ceil(retry))
  return {0, tostring(delay)}
end
if passes > 0 or now - first >= delay then
  redis.call('HINCRBY', KEYS[1], 'passes', 1)
  redis.call('EXPIRE', KEYS[1], math.ceil(expiry))
  return {1, '0'}
end
return {0, string.format('%.3f', delay - (now - first))}
"""

_FAILURE = """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return count
"""


def connect(settings):
    """A redis-py client for cluster settings (elemta.config.schema.ClusterSettings).
    Connects lazily: building it never fails on an unreachable store."""
    options = dict(socket_timeout=settings.timeout,
                   socket_connect_timeout=settings.timeout,
                   retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                   health_check_interval=0)
    if settings.password_file:
        with open(settings.password_file, encoding="utf-8") as f:
            words = f.readline().strip().split(None, 1)
        if len(words) == 2:
            options["username"], options["password"] = words
        elif words:
            options["password"] = words[0]
    if is_sentinel(settings.store):
        return _sentinel_client(parse_sentinel(settings.store), settings, options)
    if is_cluster(settings.store):
        return LazyCluster(parse_cluster(settings.store), settings, options)
    if settings.store.startswith("rediss://") and settings.ca_file:
        options["ssl_ca_certs"] = settings.ca_file
    return redis.Redis.from_url(settings.store, **options)


def _sentinel_client(target, settings, options):
    """A client of the primary the Sentinels name (elemta.sharedstate.storeurl): each
    new connection asks them where it is, and one to a former primary (now a replica
    refusing writes) is dropped, so a failover is one outage for the guard and the
    probe after it finds the new primary."""
    from redis.sentinel import Sentinel
    if target.tls:
        options["ssl"] = True
        if settings.ca_file:
            options["ssl_ca_certs"] = settings.ca_file
    sentinel_options = {key: options[key] for key in (
        "socket_timeout", "socket_connect_timeout", "ssl", "ssl_ca_certs") if key in options}
    if target.password is not None:
        sentinel_options["password"] = target.password
        if target.username:
            sentinel_options["username"] = target.username
    sentinels = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)
    return sentinels.master_for(target.service, db=target.db, **options)


class LazyCluster:
    """A Valkey Cluster client made at its first use. redis-py's RedisCluster asks a node
    for the slots when it is made, which fails while the store is down; connect()
    must not (an unreachable store is an outage for the guard, not an error at start),
    so the client is made inside the first call that needs it, and again after a
    failed attempt. Every script here touches one key, so no script crosses slots."""

    def __init__(self, target, settings, options):
        from redis.cluster import ClusterNode
        self._nodes = [ClusterNode(host, port) for host, port in target.nodes]
        self._options = dict(options)
        if target.tls:
            self._options["ssl"] = True
            if settings.ca_file:
                self._options["ssl_ca_certs"] = settings.ca_file
        self._client = None
        self._lock = threading.Lock()

    def _made(self):
        with self._lock:
            if self._client is None:
                from redis.cluster import RedisCluster
                self._client = RedisCluster(startup_nodes=self._nodes, **self._options)
            return self._client

    def get_encoder(self):
        """Script's encoder, asked when a script is registered: before any connection."""
        from redis.connection import Encoder
        return Encoder("utf-8", "strict", False)

    def register_script(self, script):
        from redis.commands.core import Script
        return Script(self, script)

    def mget(self, keys):
        return self._made().mget_nonatomic(keys)     # the keys lie in several slots

    def close(self):
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __getattr__(self, name):
        return getattr(self._made(), name)


def _text(key):
    return key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key


class RedisStore:
    """The four kinds of shared state in one Valkey/Redis server. Every method blocks on
    the store and raises redis.RedisError or OSError when it fails."""

    def __init__(self, client, prefix):
        self.client = client
        self.prefix = _text(prefix)
        self._rate = client.register_script(_RATE)
        self._greylist = client.register_script(_GREYLIST)
        self._failure = client.register_script(_FAILURE)

    def _key(self, kind, key):
        return self.prefix + kind + _text(key)

    def hit(self, key, cost, window):
        return int(self._rate(keys=[self._key(b"rate:", key)],
                              args=[int(cost), max(1, int(window * 1000))]))

    def greylist(self, triplet, delay, retry_window, expiry):
        passed, wait = self._greylist(keys=[self._key(b"grey:", triplet)],
                                      args=[delay, retry_window, expiry])
        return bool(int(passed)), float(wait)

    def failures(self, group):
        return int(self.client.get(self._key(b"authfail:", group)) or 0)

    def record_failure(self, group, window):
        return int(self._failure(keys=[self._key(b"authfail:", group)],
                                 args=[max(1, int(window))]))

    def verdicts(self, queries):
        """{query: addresses} of those the store still knows."""
        values = self.client.mget([self._key(b"dnsbl:", q) for q in queries])
        return {query: [a for a in value.decode("ascii").split(",") if a]
                for query, value in zip(queries, values) if value is not None}

    def put_verdict(self, query, addresses, ttl):
        self.client.set(self._key(b"dnsbl:", query), ",".join(addresses),
                        ex=max(1, int(ttl)))

    def close(self):
        self.client.close()
