"""State that must be the same on every node of a cluster, behind one small interface.

Used by the smtpd worker's checks: the rate limits (elemta.restrictions.ratelimit), the
greylist (elemta.plugins.greylist), the AUTH failure penalty (elemta.smtpd.authn) and
the DNSBL answer cache (elemta.restrictions.dnslists). Each keeps its state locally, as
on a single node (LMDB shared by the workers of the host, or per-worker memory); when
`cluster.store` names a Valkey/Redis server, the same interface is served from there, so
every node counts and remembers together.

    interface.py   what the checks see: RateCounter, Greylist, FailureCounts,
                   VerdictCache, and the two exceptions of a store that fails
    redisstore.py  the Valkey/Redis implementation: one Lua script per operation, so
                   two nodes at once never lose a count; expiry by the store's TTLs
    guard.py       every store call bounded in time, off the event loop; an outage is
                   counted in the metrics and retried on its own
    outage.py      the node's outage flag: one process of the node logs each outage
    fallback.py    per check: the store, else (cluster.store_failure) the local state
                   or a 451 4.3.0
    process.py     the process's store, opened once after fork: install(), and the
                   wrappers the checks call with their local state

The local implementations stay with their checks (elemta.restrictions.ratecounter,
elemta.plugins.greylist.GreylistStore, elemta.smtpd.authfailures,
elemta.restrictions.dnslists.MemoryVerdictCache) and implement the interface.
See also: tests/test_cluster_state.py, issue 19.
"""
