"""Each check's shared state: the cluster store, or what cluster.store_failure says.

Owned by the smtpd worker (made by elemta.sharedstate.process). Every class here is an
interface implementation wrapping two: the store's (through the guard) and the check's
local one. While the store answers, only it is used. While it does not (an outage, or
one slow call): `local` answers from the local state, so mail keeps flowing, counted
by this node alone (the local state was not kept up to date meanwhile: an outage gives
clients a fresh local allowance); `tempfail` raises StoreTempfail and the check refuses
with 451 4.3.0. The DNSBL cache is only a cache: a store that fails is a miss, and the
per-worker cache answers whatever the policy. Each fallback is counted in
elemta_cluster_store_fallbacks_total{check, policy}.
See also: elemta.sharedstate.guard (the outage itself: log, metric, recovery).
"""

from elemta import metrics
from elemta.sharedstate.interface import (FailureCounts, Greylist, RateCounter,
                                          StoreTempfail, StoreUnavailable, VerdictCache)

LOCAL, TEMPFAIL = "local", "tempfail"


class _Shared:
    def __init__(self, store, guard, local, policy):
        self.store, self.guard, self.local, self.policy = store, guard, local, policy

    def _fall_back(self, check):
        """Count the fallback; raise StoreTempfail when that is the policy."""
        metrics.CLUSTER_STORE_FALLBACKS.labels(check, self.policy).inc()
        if self.policy == TEMPFAIL:
            raise StoreTempfail(check)

    def close(self):
        self.local.close()


class SharedRateCounter(_Shared, RateCounter):
    def hit(self, key, cost, window, now=None):
        try:
            return self.guard.call(self.store.hit, key, cost, window)
        except StoreUnavailable:
            self._fall_back("ratelimit")
            return self.local.hit(key, cost, window, now)


class SharedGreylist(_Shared, Greylist):
    """local: a GreylistStore, whose delay, retry window and expiry the store's use."""

    def check(self, network, sender, recipient, now=None):
        triplet = "%s\0%s\0%s" % (network, sender.lower(), recipient.lower())
        local = self.local
        try:
            return self.guard.call(self.store.greylist, triplet, local.delay,
                                   local.retry_window, local.expiry)
        except StoreUnavailable:
            self._fall_back("greylist")
            return local.check(network, sender, recipient, now)


class SharedFailureCounts(_Shared, FailureCounts):
    """local: a FailureTable, whose window the store's keys expire after."""

    def failures(self, group, now):
        try:
            return self.guard.call(self.store.failures, group)
        except StoreUnavailable:
            self._fall_back("auth")
            return self.local.failures(group, now)

    def record_failure(self, group, now):
        try:
            return self.guard.call(self.store.record_failure, group, self.local.window)
        except StoreUnavailable:
            self._fall_back("auth")
            return self.local.record_failure(group, now)

    def close(self):
        pass


class SharedVerdictCache(_Shared, VerdictCache):
    """The per-worker cache first (no round trip for what this worker knows), then the
    store; answers are written to both."""

    def get_many(self, queries):
        found = self.local.get_many(queries)
        missing = [q for q in queries if q not in found]
        if missing:
            try:
                known = self.guard.call(self.store.verdicts, missing)
            except StoreUnavailable:
                metrics.CLUSTER_STORE_FALLBACKS.labels("dnsbl", LOCAL).inc()
                return found
            for query, addresses in known.items():
                self.local.put(query, addresses, self.local.min_ttl)
            found.update(known)
        return found

    def put(self, query, addresses, ttl):
        self.local.put(query, addresses, ttl)
        try:
            self.guard.call(self.store.put_verdict, query, addresses, ttl)
        except StoreUnavailable:
            metrics.CLUSTER_STORE_FALLBACKS.labels("dnsbl", LOCAL).inc()

    def close(self):
        pass
