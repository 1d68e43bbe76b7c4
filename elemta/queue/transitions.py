"""Which queue state a message may move to from which: the one transition table.

Used inside elemta.queue only (index.py claims and requeues leases, queue.py records
attempts and runs the admin actions); every change of a record's state goes through move(),
so a new code path that would, say, requeue a message being delivered fails loudly
instead of corrupting the schedule. A record is created incoming or hold (commit,
reconcile, reindex); that is not a move. See also elemta.queue.model (the states).
"""

from typing import Dict, FrozenSet

from elemta.queue.model import ACTIVE, DEFERRED, FAILED, HOLD, INCOMING

# state -> the states it may become, and who makes each move.
TRANSITIONS: Dict[str, FrozenSet[str]] = {
    INCOMING: frozenset({
        ACTIVE,      # claimed by a delivery worker
        HOLD,        # held by the admin (or reconcile finding a hold marker)
        INCOMING,    # requeued: starts over (attempts 0, due now)
    }),
    DEFERRED: frozenset({
        ACTIVE,      # claimed when due
        HOLD,        # held
        INCOMING,    # requeued
    }),
    ACTIVE: frozenset({
        DEFERRED,    # an attempt left recipients waiting; a lease lapsed or was given back
        FAILED,      # nothing left to try, some recipients bounced
        HOLD,        # held while being delivered (the worker's lease is then lost)
    }),
    HOLD: frozenset({
        INCOMING,    # released before any attempt, or requeued
        DEFERRED,    # released after an attempt
    }),
    FAILED: frozenset({
        HOLD,        # held
        INCOMING,    # requeued: tried again
    }),
}


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in the code that asked for it."""


def move(record, state):
    """Set record.state to `state` if the table allows it from the record's state;
    raises IllegalTransition otherwise."""
    if state not in TRANSITIONS.get(record.state, ()):
        raise IllegalTransition("queue %s: %s -> %s is not a queue state transition"
                                % (record.queue_id, record.state, state))
    record.state = state
    if state != HOLD:
        record.hold = None     # who held it and why means nothing once it is off hold
