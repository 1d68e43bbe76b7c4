"""The api process's heartbeat in the cluster view: this node, registered in the store.

Owned by the api process. Why the api and not the master: what a node offers the
cluster view is its REST API, so the registration lives and dies with the process that
serves it; an api that stops, hangs or cannot start drops out of the view by itself
after cluster.node_ttl, and the master keeps to binding, forking and watching (it never
talks to a store). Every cluster.heartbeat_interval the node's name, API URL, SMTP
hand-over address, version and start time are written with a lifetime of cluster.node_ttl (elemta.cluster.registry).
Nothing is removed at a stop: a reload's new api registers the same name at once, and a
node stopped or crashed is shown as not answering until its lifetime ends.

The store's client blocks: each registration runs in a thread, bounded by
cluster.timeout. A store that fails is logged once, and its return once.
See also: elemta.cluster.identity, elemta.api.cluster_routes.
"""

import logging
import time

import gevent
from gevent.threadpool import ThreadPool

from elemta.cluster import identity
from elemta.cluster.registry import Registry
from elemta.sharedstate.process import shown_url
from elemta.util.threads import in_pool

log = logging.getLogger("elemta.api")


class Heartbeat:
    """Registers this node until stopped (run() in a greenlet of its own)."""

    def __init__(self, config, registry):
        cluster = config.cluster
        self.registry = registry
        self.name = identity.node_name(config)
        self.api_url = identity.api_url(config)
        self.smtp = identity.handover_address(config)
        self.smtp_login = identity.handover_logs_in(config)
        self.started = time.time()
        self.interval, self.ttl, self.timeout = (cluster.heartbeat_interval,
                                                 cluster.node_ttl, cluster.timeout)
        self.store = shown_url(cluster.store)
        self._pool = ThreadPool(1)
        self._failing = False
        self.greenlet = None

    def run(self):
        log.info("cluster: registering node %s (api %s, smtp %s) in %s every %gs",
                 self.name, self.api_url, self.smtp or "none", self.store, self.interval)
        while True:
            self.beat()
            gevent.sleep(self.interval)

    def beat(self):
        try:
            with gevent.Timeout(self.timeout):
                in_pool(self._pool, self.registry.register, self.name, self.api_url,
                        identity.VERSION, self.started, self.ttl, self.smtp,
                        self.smtp_login)
        except gevent.Timeout:
            self._failed("no answer within %gs" % self.timeout)
        except Exception as error:      # redis.RedisError, OSError: any failure is one
            self._failed("%s: %s" % (type(error).__name__, error))
        else:
            if self._failing:
                self._failing = False
                log.warning("cluster: node %s registered again in %s", self.name,
                            self.store)

    def _failed(self, why):
        if not self._failing:
            self._failing = True
            log.error("cluster: cannot register node %s in %s (%s): it drops out of the "
                      "cluster view until the store answers", self.name, self.store, why)

    def close(self):
        self.greenlet.kill()
        self._pool.kill()


def open_registry(config):
    """The cluster's node Registry when cluster.store is set, else None (connecting
    lazily: an unreachable store is no error); None too without an api token, which
    signs the registration (elemta.cluster.credential). Raises OSError when
    cluster.password_file cannot be read."""
    if not config.cluster.store:
        return None
    from elemta.cluster.credential import registry_key
    from elemta.sharedstate.redisstore import connect
    from elemta.util.apitoken import read_token
    token, problem = read_token(config.api)
    if token is None:
        log.error("cluster: this node does not register in the cluster store: %s (the "
                  "api token signs its registration)", problem)
        return None
    return Registry(connect(config.cluster), config.cluster.key_prefix,
                    registry_key(token))


def start(config, registry):
    """The running Heartbeat of this node in registry, or None without one."""
    if registry is None:
        return None
    heartbeat = Heartbeat(config, registry)
    heartbeat.greenlet = gevent.spawn(heartbeat.run)
    return heartbeat
