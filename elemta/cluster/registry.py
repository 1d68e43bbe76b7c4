"""The live nodes of the cluster, registered in the shared Valkey/Redis store.

Used by the api process, whose heartbeat (elemta.api.registration) calls register()
every cluster.heartbeat_interval, and by whoever shows the cluster view (nodes()).
All nodes live in one HASH, prefix + "nodes": field = node name, value = JSON
{node, sig, heartbeat, expires}: node is the JSON text of {name, api_url, smtp, login,
version, started, heartbeat, ttl} (smtp is where the node takes mail handed over by a drained node,
cluster.handover_address, or null; login is true when that is a handover listener,
where the others log in with the cluster's credential) and sig its HMAC with the cluster's registry key
(elemta.cluster.credential): an entry that is not signed with it, or that cannot be
read, is left out of nodes() and logged, so neither a rogue registration (whoever can
write to the store but has not the api token) nor a malformed one can take the token,
drained mail or the whole view. heartbeat and expires are the store's
clock (TIME), so nodes whose clocks differ still agree on who is alive; nodes() leaves
out (and deletes) the entries whose lifetime (cluster.node_ttl) has passed. The unsigned
heartbeat and expires are only the store's housekeeping: whoever writes to the store
could rewrite them to keep an old signed entry alive forever (and a pod IP is reused),
so the node also signs the store's time when it registers and its ttl, and nodes() leaves
out, logged, an entry whose signed heartbeat is older than its ttl plus CLOCK_SKEW. One key,
so a Valkey Cluster keeps it in one slot; each operation is one Lua script.

The calls block on their socket (the client of elemta.sharedstate.redisstore.connect,
with cluster.timeout): the api process runs them in a thread.
See also: elemta.cluster.identity, elemta.cluster.peers.
"""

import json
import logging
from dataclasses import dataclass
from typing import List, Optional

from elemta.cluster.credential import sign, signed_by
from elemta.util.text import printable

log = logging.getLogger("elemta.cluster")

# Seconds a signed heartbeat may be older than its ttl and still count: the time between
# reading the store's clock and writing the entry, and a Sentinel failover to a replica
# whose clock is a little off.
CLOCK_SKEW = 30.0

# ARGV: name, the node's JSON, lifetime in seconds. Returns the store's time.
_REGISTER = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local node = cjson.decode(ARGV[2])
node['heartbeat'] = now
node['expires'] = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(node))
return tostring(now)
"""

# Returns {the store's time, {name, JSON, name, JSON... of the live nodes}}; forgets the
# dead ones.
_NODES = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local ok, node = pcall(cjson.decode, all[i + 1])
  if ok and type(node) == 'table' and tonumber(node['expires'] or 0) > now then
    table.insert(live, all[i])
    table.insert(live, all[i + 1])
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return {tostring(now), live}
"""


@dataclass(frozen=True)
class Node:
    """One registered node as the view shows it."""
    name: str
    api_url: str
    version: str
    started: float              # when its api process started (its own clock)
    heartbeat: float            # its last registration (the store's clock)
    age: float                  # seconds since then (the store's clock)
    smtp: Optional[str] = None  # "host:port" taking drained nodes' mail, or None
    smtp_login: bool = False    # smtp is a handover listener: log in there

    def to_json(self):
        return {"name": self.name, "api_url": self.api_url, "smtp_address": self.smtp,
                "version": self.version,
                "started": self.started, "last_heartbeat": self.heartbeat,
                "heartbeat_age": round(self.age, 3)}


class Registry:
    """key: the cluster's registry key (elemta.cluster.credential.registry_key)."""

    def __init__(self, client, prefix, key: bytes, clock_skew=CLOCK_SKEW):
        self.client = client
        self.key = (prefix.encode("utf-8") if isinstance(prefix, str) else prefix) \
            + b"nodes"
        self.signing_key = key
        self.clock_skew = clock_skew
        self._register = client.register_script(_REGISTER)
        self._nodes = client.register_script(_NODES)
        self._said = set()          # the entries already logged as left out

    def register(self, name, api_url, version, started, ttl, smtp=None, smtp_login=False):
        """Say that node `name` lives, for `ttl` seconds from now."""
        seconds, microseconds = self.client.time()      # the store's clock, as nodes()'
        node = json.dumps({"name": name, "api_url": api_url, "smtp": smtp,
                           "login": bool(smtp_login), "version": version,
                           "started": started, "heartbeat": seconds + microseconds / 1e6,
                           "ttl": ttl}, sort_keys=True)
        record = json.dumps({"node": node, "sig": sign(self.signing_key, node)})
        self._register(keys=[self.key], args=[name, record, ttl])

    def nodes(self) -> List[Node]:
        """The live nodes whose entries are signed and whole, by name."""
        now, live = self._nodes(keys=[self.key])
        now = float(now)
        found = []
        for field, raw in zip(live[::2], live[1::2]):
            try:
                node = self._node(field, raw, now)
            except (ValueError, TypeError, KeyError, AttributeError) as error:
                self._left_out(field, "unreadable (%s: %s)" % (type(error).__name__, error))
                continue
            if node is not None:
                found.append(node)
        return sorted(found, key=lambda node: node.name)

    def _node(self, field, raw, now):
        record = json.loads(raw)
        signed = record.get("node")
        if not signed_by(self.signing_key, signed, record.get("sig")):
            self._left_out(field, "not signed with the cluster's key (a node with another "
                                "api token, an older version, or not a node at all)")
            return None
        data = json.loads(signed)
        smtp = data.get("smtp")
        name, api_url = data["name"], data["api_url"]
        if not isinstance(name, str) or not name or not isinstance(api_url, str):
            raise ValueError("no name or api_url")
        if name != _text(field):
            raise ValueError("registered as %r, signed as %r" % (_text(field), name))
        heartbeat, ttl = data.get("heartbeat"), data.get("ttl")
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool)
                   for value in (heartbeat, ttl)):
            self._left_out(field, "it signs no heartbeat and ttl (a node of an older "
                                  "version)")
            return None
        if now - heartbeat > ttl + self.clock_skew:
            self._left_out(field, "its signed heartbeat is older than its ttl (%gs): an "
                                  "expired registration kept alive in the store" % ttl)
            return None
        return Node(name=name, api_url=api_url, smtp=str(smtp) if smtp else None,
                    smtp_login=data.get("login") is True,
                    version=str(data.get("version", "")),
                    started=float(data.get("started") or 0), heartbeat=heartbeat,
                    age=max(0.0, now - heartbeat))

    def _left_out(self, field, why):
        """Log an entry left out of the view, once per entry and reason."""
        said = (field, why)
        if said not in self._said:
            self._said.add(said)
            log.warning("cluster: registry entry %s in %s is left out: %s",
                        printable(_text(field)[:200]),
                        self.key.decode("utf-8", "replace"), why)

    def close(self):
        self.client.close()


def _text(field):
    return field.decode("utf-8", "replace") if isinstance(field, bytes) else str(field)
