"""Chaos under load, the short run for CI: kill -9 Elemta's children while it relays mail.

Owned by the test suite. A real `elemta` (tests/conftest.py) relays to a real smtp-sink that
writes one file per message; 20 client sessions send 1,000 messages (every 20th through
elemta-sendmail, so pickup's crash recovery is in play) while a random child of the master
(smtpd, delivery, local, pickup, api, showq) gets SIGKILL every 0.2-0.5 s, for 8 s and
until the load is in, at most 30 s (a slow or busy CI machine must not be killed for the
whole run). Every message that got a 250 (or a sendmail exit 0) must reach the sink within
30 s of the last kill, with default settings (delivery.lease included: a dead worker's
claims must come back long before it ends). Duplicates are allowed, counted and printed
(pytest -s shows the summary line). Needs root and the postfix package (smtp-sink).
See also: tests/peers/chaos.py (the load, the killer, the counting), tests/bench/chaos.py
(`make chaos`: 20,000 messages, next to Postfix).
"""

import collections

import pytest

from tests.harness import REPO, wait_for
from tests.peers.chaos import (ELEMTA_KINDS, DumpSink, Killer, Load, chaos_available,
                               elemta_kind, elemta_queue_empty, elemta_sections,
                               elemta_sendmail, run_chaos)

pytestmark = pytest.mark.skipif(bool(chaos_available()), reason=str(chaos_available()))

MESSAGES = 1000
SESSIONS = 20
SENDMAIL_EVERY = 20          # 50 of the 1,000 through sendmail and pickup
KILL_SECONDS = 8.0
KILL_LONGEST = 30.0          # then the killer stops even if the load is not yet in
LOAD_DEADLINE = 120.0        # seconds the clients keep retrying a refused message
RECOVERY_SECONDS = 30.0      # issue 11: all delivered within 30 s of the last kill


def queue_states(spool_dir):
    """{state: messages} left in the index, to say where undelivered mail sits."""
    from elemta.queue.queue import Queue
    with Queue(spool_dir) as queue:
        return dict(collections.Counter(r.state for r in queue.index.iter_records()))


def test_every_accepted_message_arrives_despite_kill_9_of_children(elemta_server):
    with DumpSink() as sink:
        server = elemta_server(**elemta_sections(sink.port))
        wait_for(lambda: "delivery worker started" in server.log())
        argv, env = elemta_sendmail(server, REPO)
        load = Load(server.port, MESSAGES, SESSIONS, sendmail_argv=argv, sendmail_env=env,
                    sendmail_every=SENDMAIL_EVERY, deadline=LOAD_DEADLINE)
        killer = Killer(server.process.pid, elemta_kind, KILL_SECONDS,
                        stop_when=lambda: load.done, longest=KILL_LONGEST)
        tally = run_chaos(sink, load, killer, lambda: elemta_queue_empty(server.spool),
                          RECOVERY_SECONDS)
        print("\n" + tally.summary("elemta"))
        if tally.duplicated:
            print("duplicates (id: copies): %s" % sorted(tally.duplicated.items()))

        assert not tally.master_died, server.log()[-3000:]
        assert set(tally.kills) == set(ELEMTA_KINDS), tally.kills
        assert tally.accepted == MESSAGES, (
            "only %d of %d messages accepted within %.0fs of chaos; refusals: %s"
            % (tally.accepted, MESSAGES, LOAD_DEADLINE, tally.failures))
        assert not tally.lost, (
            "%d accepted messages not at the sink %.0fs after the last kill (ids %s); "
            "the queue holds %s"
            % (len(tally.lost), RECOVERY_SECONDS, tally.lost[:20],
               queue_states(server.spool)))
        assert tally.empty_after is not None, (
            "everything arrived but the queue still holds %s" % queue_states(server.spool))
