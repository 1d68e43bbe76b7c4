"""The queue states' transition table (elemta.queue.transitions): every move it allows
works, every other move raises, and the queue's own state changes go through it."""

import itertools
import time

import pytest

from elemta.queue.ids import new_queue_id
from elemta.queue.index import QueueRecord
from elemta.queue.model import (ACTIVE, DEFERRED, FAILED, HOLD, INCOMING, STATES, Envelope,
                                Recipient)
from elemta.queue.queue import Queue
from elemta.queue.transitions import TRANSITIONS, IllegalTransition, move

LEGAL = sorted((a, b) for a in TRANSITIONS for b in TRANSITIONS[a])
ILLEGAL = sorted(set(itertools.product(STATES, STATES)) - set(LEGAL))


def record(state):
    envelope = Envelope(new_queue_id(), "a@example.org", [Recipient("b@example.net")],
                        time.time())
    return QueueRecord(envelope, state)


def test_the_table_covers_every_state_and_names_only_states():
    assert set(TRANSITIONS) == set(STATES)
    assert set().union(*TRANSITIONS.values()) <= set(STATES)


def test_the_moves_the_queue_makes_are_the_legal_ones():
    assert LEGAL == sorted([
        (ACTIVE, DEFERRED), (ACTIVE, FAILED), (ACTIVE, HOLD),
        (DEFERRED, ACTIVE), (DEFERRED, HOLD), (DEFERRED, INCOMING),
        (FAILED, HOLD), (FAILED, INCOMING),
        (HOLD, DEFERRED), (HOLD, INCOMING),
        (INCOMING, ACTIVE), (INCOMING, HOLD), (INCOMING, INCOMING),
    ])


@pytest.mark.parametrize("before, after", LEGAL)
def test_a_legal_move_changes_the_state(before, after):
    r = record(before)
    move(r, after)
    assert r.state == after


@pytest.mark.parametrize("before, after", ILLEGAL)
def test_an_illegal_move_raises_and_leaves_the_state(before, after):
    r = record(before)
    with pytest.raises(IllegalTransition, match="%s -> %s" % (before, after)):
        move(r, after)
    assert r.state == before


def test_a_state_the_table_does_not_know_cannot_move():
    with pytest.raises(IllegalTransition):
        move(record("bogus"), INCOMING)


def test_an_illegal_move_in_an_index_change_aborts_the_whole_write(tmp_path):
    """A bug caught by the table leaves the index as it was: nothing half-written."""
    with Queue(str(tmp_path / "spool"), map_size=64 << 20) as queue:
        first = queue.add(Envelope(new_queue_id(), "a@example.org",
                                   [Recipient("b@example.net")], time.time()), [b"x\r\n"])
        second = queue.add(Envelope(new_queue_id(), "a@example.org",
                                    [Recipient("c@example.net")], time.time()), [b"y\r\n"])

        def hold_then_fail(r):
            # The first is held (legal); incoming -> failed is not (only an attempt fails one).
            move(r, HOLD if r.queue_id == first else FAILED)
            return "changed", True
        with pytest.raises(IllegalTransition):
            queue.index.update_many([first, second], hold_then_fail)
        assert queue.count_by_state() == {INCOMING: 2}
