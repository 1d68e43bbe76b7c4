"""The process's shared store: opened once after fork, handed to the checks that ask.

Owned by the smtpd worker: elemta.smtpd.server calls install(config.cluster) before
it starts the plugins; each check then passes its local state through the function of
its kind and uses what comes back, the local state itself on a single node:

    self.counter = shared_rate_counter(LMDBRateCounter(path))

A process that never calls install() (pickup, tools, tests of one check) keeps local
state. The store is the process's own: a forked child that has not installed its own
gets local state, never its parent's connections.
See also: elemta.sharedstate (the package), elemta.config.schema.ClusterSettings.
"""

import logging
import os

from elemta.sharedstate.fallback import (SharedFailureCounts, SharedGreylist,
                                         SharedRateCounter, SharedVerdictCache)
from elemta.sharedstate.guard import StoreGuard
from elemta.sharedstate.outage import OutageFlag
from elemta.sharedstate.storeurl import without_password

log = logging.getLogger("elemta.sharedstate")


class ClusterConfigError(Exception):
    """The cluster settings cannot be used (an unreadable password file); str() names
    the option."""

_installed = None       # (pid, Cluster) of this process, or None


class Cluster:
    """The store, its guard and the failure policy of one process."""

    def __init__(self, settings, spool_dir=None):
        # Imported here: the redis client takes a tenth of a second to import, paid by
        # every smtpd worker at start, and a single node never needs it.
        from elemta.sharedstate.redisstore import RedisStore, connect
        self.policy = settings.store_failure
        self.store = RedisStore(connect(settings), settings.key_prefix)
        self.guard = StoreGuard(shown_url(settings.store), settings.timeout,
                                settings.retry_interval,
                                flag=OutageFlag(spool_dir) if spool_dir else None)

    def close(self):
        self.guard.close()
        self.store.close()


def shown_url(url):
    """The store's URL for the log: any user and password in it left out."""
    return without_password(url)


def install(settings, spool_dir=None):
    """Use the store of cluster settings in this process (none when settings.store is
    unset); spool_dir: the node's, whose outage flag makes one process of the node log
    each outage (elemta.sharedstate.outage). Raises ClusterConfigError when the password file cannot be read; an
    unreachable store is no error (the checks fall back until it answers)."""
    global _installed
    uninstall()
    if settings.store:
        try:
            cluster = Cluster(settings, spool_dir)
        except OSError as error:
            raise ClusterConfigError("cluster.password_file: cannot read %s: %s" % (
                settings.password_file, error.strerror or error)) from None
        _installed = (os.getpid(), cluster)
        log.info("shared state in %s (cluster.store_failure: %s)",
                 shown_url(settings.store), settings.store_failure)


def uninstall():
    global _installed
    cluster = current()
    _installed = None
    if cluster is not None:
        cluster.close()


def current():
    """This process's Cluster, or None (single node)."""
    if _installed is None or _installed[0] != os.getpid():
        return None
    return _installed[1]


def _wrap(kind, local):
    cluster = current()
    return local if cluster is None else kind(cluster.store, cluster.guard, local,
                                              cluster.policy)


def shared_rate_counter(local):
    return _wrap(SharedRateCounter, local)


def shared_greylist(local):
    return _wrap(SharedGreylist, local)


def shared_failure_counts(local):
    return _wrap(SharedFailureCounts, local)


def shared_verdict_cache(local):
    return _wrap(SharedVerdictCache, local)
