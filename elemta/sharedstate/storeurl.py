"""cluster.store URLs naming Valkey/Redis Sentinels or a Valkey Cluster, not one server.

Used by the configuration's check of cluster.store (elemta.config.schema) and by
elemta.sharedstate.redisstore.connect. redis-py parses the one-server forms itself
(redis://, rediss://, unix://); it has no URL for Sentinel, so this one is ours,
the form other clients (kombu, Sidekiq) use:

    redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]

host:port are the Sentinels (port 26379 unless given; [address] for IPv6), service
the name they monitor the primary under, db the database (0 unless given). A
user and password in the URL are the Sentinels' own; the data servers' come from
cluster.password_file as for one server. rediss+sentinel:// speaks TLS to both.

    redis+cluster://host[:port][,host[:port]...]

host:port are some nodes of a Valkey Cluster (port 6379 unless given), from which the
client learns the others and the slots; a Cluster has database 0 alone, and its
password comes from cluster.password_file. rediss+cluster:// speaks TLS.
No redis import here: the configuration check must stay cheap.
"""

from dataclasses import dataclass
from typing import Optional, Tuple
from urllib.parse import unquote

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
CLUSTER_PORT = 6379


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: Tuple[Tuple[str, int], ...]
    service: str
    db: int
    tls: bool
    username: Optional[str] = None
    password: Optional[str] = None


def is_sentinel(url):
    return url.partition("://")[0] in SENTINEL_SCHEMES


def is_cluster(url):
    return url.partition("://")[0] in CLUSTER_SCHEMES


def _host_port(text, url, default_port):
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (rest or None)
    else:
        host, _, port = text.partition(":")
        port = port or None
    if not host or (port is not None and not port.isdigit()) or not (
            0 < int(port or default_port) < 65536):
        raise ValueError("%r in %r is not host[:port]" % (text, url))
    return host, int(port or default_port)


@dataclass(frozen=True)
class ClusterTarget:
    nodes: Tuple[Tuple[str, int], ...]
    tls: bool


def parse_cluster(url):
    """The ClusterTarget of a redis+cluster:// URL; ValueError says what is wrong."""
    scheme, _, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError("not a redis+cluster:// URL: %r" % url)
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        raise ValueError("a Valkey Cluster's password goes in cluster.password_file, "
                         "not in the URL %r" % without_password(url))
    if path.strip("/") not in ("", "0"):
        raise ValueError("a Valkey Cluster has database 0 alone, not %r" % path)
    nodes = tuple(_host_port(part, url, CLUSTER_PORT) for part in netloc.split(",") if part)
    if not nodes:
        raise ValueError("no host in %r" % url)
    return ClusterTarget(nodes=nodes, tls=scheme.startswith("rediss"))


def parse_sentinel(url):
    """The SentinelTarget of a redis+sentinel:// URL; ValueError says what is wrong."""
    scheme, _, rest = url.partition("://")
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError("not a redis+sentinel:// URL: %r" % url)
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
        if not colon:                       # redis://secret@host: a password alone
            username, password = None, unquote(user)
    sentinels = tuple(_host_port(part, url, SENTINEL_PORT)
                      for part in netloc.split(",") if part)
    if not sentinels:
        raise ValueError("no Sentinel host in %r" % url)
    parts = [p for p in path.split("/") if p] if path else []
    if not parts or len(parts) > 2:
        raise ValueError("%r must end in /service or /service/db (the name the "
                         "Sentinels monitor the primary under)" % url)
    db = parts[1] if len(parts) == 2 else "0"
    if not db.isdigit():
        raise ValueError("the database in %r is not a number" % url)
    return SentinelTarget(sentinels=sentinels, service=unquote(parts[0]), db=int(db),
                          tls=scheme.startswith("rediss"), username=username,
                          password=password)


def without_password(url):
    """url with any user and password left out (for the log)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
    return scheme + sep + netloc + slash + path
