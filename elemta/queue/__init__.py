"""The durable queue: spool files (the truth) and the LMDB index that schedules them.

Used by every process that accepts, delivers or inspects mail; each opens its own Queue after
fork. Modules: model (Envelope, states), ids (queue ids), store (the spool file format),
index (the index record format), transitions (which state may follow which), queue (the
Queue facade: commit, reconcile, reindex), reader (the index opened only to read it, for
elemtactl queue list and summary, and mailq).

Nothing is imported here on purpose: `import elemta.queue.model` (which the sans-IO protocol
core may do) must not pull in LMDB or ctypes.
"""
