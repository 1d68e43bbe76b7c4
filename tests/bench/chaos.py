#!/usr/bin/env python3
"""`make chaos`: kill -9 an MTA's processes under load for a minute, Elemta next to Postfix.

A script, not a pytest test: the long version of tests/test_chaos.py, with the same load,
killer and counting (tests/peers/chaos.py). 20 client sessions send CHAOS_MESSAGES messages
(every 20th through the MTA's own sendmail command) to an MTA relaying everything to a fresh
smtp-sink, while a random child of its master gets SIGKILL every 0.2-0.5 s for
CHAOS_SECONDS and until the load is in. Then it waits up to CHAOS_WAIT seconds after the last
kill for every accepted message at the sink and an empty queue.

Targets, one after the other, each on fresh directories:
  elemta   ElemtaServer (tests/harness.py) with default settings but for the relay host,
           2 smtpd and 2 delivery workers; killed: smtpd, delivery, local, pickup, api.
  postfix  a private PostfixInstance (tests/peers/postfix.py) with default settings
           (in_flow_delay 1s) relaying to the sink; killed: every child of its master
           (smtpd, cleanup, qmgr, smtp, trivial-rewrite, pickup, ...) but postlogd (see
           tests/peers/chaos.py POSTFIX_SPARED). Postfix throttles a
           service whose process died for 60 s ("bad command startup -- throttling") and
           defers a message whose smtp process died (retried after minimal_backoff_time,
           300 s): both show in its row, as measured.

Prints one table row per target: attempts, accepted (250 or sendmail exit 0), delivered
(accepted ids at the sink), lost, duplicates (extra copies at the sink), unconfirmed (copies
of attempts that got no 250, which the client sent again), kills, seconds the load took,
and seconds from the last kill until everything had arrived and until the queue was empty.
Exit status 1 when Elemta lost a message, did not empty its queue or its master died.
Needs root and the postfix package.

Environment: CHAOS_MESSAGES (default 20000), CHAOS_SECONDS (60), CHAOS_WAIT (600),
CHAOS_TARGETS (elemta,postfix), CHAOS_KEEP=1 keeps the temp dirs (logs) for a look.
See also: tests/bench/bench_relay.py (the same relay without kills), ../shared/peers.md.
"""

import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.bench.runs import shared_scratch  # noqa: E402
from tests.harness import ElemtaServer, free_port  # noqa: E402
from tests.peers.chaos import (DumpSink, Killer, Load, chaos_available, elemta_kind,  # noqa: E402
                               elemta_queue_empty, elemta_sections, elemta_sendmail,
                               postfix_kind, postfix_master_pid, postfix_queue_empty,
                               postfix_ready_files, run_chaos, POSTFIX_QUEUES)
from tests.peers.postfix import PostfixInstance, postfix_available  # noqa: E402

SESSIONS = 20
SENDMAIL_EVERY = 20
POSTFIX_SENDMAIL = "/usr/sbin/sendmail"   # Postfix's, as Debian installs it with postfix


def settings():
    count = int(os.environ.get("CHAOS_MESSAGES", "20000"))
    seconds = float(os.environ.get("CHAOS_SECONDS", "60"))
    wait = float(os.environ.get("CHAOS_WAIT", "600"))
    targets = os.environ.get("CHAOS_TARGETS", "elemta,postfix").split(",")
    return count, seconds, wait, targets


def load_deadline(count, seconds):
    """How long clients keep retrying: long enough for Postfix's 60 s throttle too."""
    return max(seconds, 0) + 300 + count / 20.0


def chaos_elemta(scratch, count, seconds, wait):
    with DumpSink() as sink:
        server = ElemtaServer(os.path.join(scratch, "elemta"), elemta_sections(sink.port))
        server.start()
        try:
            deadline = time.monotonic() + 30
            while "delivery worker started" not in server.log():
                if time.monotonic() > deadline:
                    raise RuntimeError("no delivery worker started:\n" + server.log()[-2000:])
                time.sleep(0.05)
            argv, env = elemta_sendmail(server, REPO)
            load = Load(server.port, count, SESSIONS, sendmail_argv=argv, sendmail_env=env,
                        sendmail_every=SENDMAIL_EVERY, deadline=load_deadline(count, seconds))
            killer = Killer(server.process.pid, elemta_kind, seconds,
                            stop_when=lambda: load.done)
            tally = run_chaos(sink, load, killer, lambda: elemta_queue_empty(server.spool),
                              wait)
            if tally.empty_after is None:
                print("  elemta queue left: %s" % queue_states(server.spool))
            if tally.master_died:
                print("  elemta master died: %s; log tail:\n%s"
                      % (server.process.poll(), server.log()[-3000:]))
        finally:
            orphans = server.stop()
    log = server.log()
    print("  elemta log: %d tracebacks, %d children ended by a signal or error, %d orphans "
          "at stop; %s" % (log.count("Traceback"), log.count(" ended with "), len(orphans),
                           server.log_path))
    return tally


def queue_states(spool_dir):
    import collections
    from elemta.queue.queue import Queue
    with Queue(spool_dir) as queue:
        return dict(collections.Counter(r.state for r in queue.index.iter_records()))


def chaos_postfix(scratch, count, seconds, wait):
    port = free_port()
    with DumpSink() as sink:
        with PostfixInstance(os.path.join(scratch, "postfix"), port,
                             relayhost=sink.port) as postfix:
            argv = [POSTFIX_SENDMAIL, "-C", postfix.config_dir]
            load = Load(port, count, SESSIONS, sendmail_argv=argv,
                        sendmail_every=SENDMAIL_EVERY, deadline=load_deadline(count, seconds))
            killer = Killer(postfix_master_pid(postfix), postfix_kind, seconds,
                            stop_when=lambda: load.done)
            tally = run_chaos(sink, load, killer, lambda: postfix_queue_empty(postfix), wait)
            log = postfix.read_log()
            if tally.empty_after is None:
                print("  postfix queue left (complete files): %s"
                      % {q: postfix_ready_files(postfix, q) for q in POSTFIX_QUEUES})
    print("  postfix maillog: %d throttling lines, %d deferred deliveries; %s"
          % (log.count("throttling"), log.count("status=deferred"), postfix.maillog))
    return tally


def seconds_text(value, limit):
    return "> %.0f" % limit if value is None else "%.1f" % value


def report(rows, wait):
    print()
    header = ("target", "attempts", "accepted", "delivered", "lost", "dupes", "unconf",
              "kills", "load s", "delivered s", "empty s")
    print("%-8s %8s %8s %9s %5s %6s %6s %6s %7s %11s %8s" % header)
    for name, t in rows:
        print("%-8s %8d %8d %9d %5d %6d %6d %6d %7.1f %11s %8s"
              % (name, t.attempts, t.accepted, t.delivered, len(t.lost), t.duplicates,
                 t.unconfirmed, sum(t.kills.values()), t.load_seconds,
                 seconds_text(t.delivered_after, wait), seconds_text(t.empty_after, wait)))
    print("(delivered s / empty s: from the last kill until every accepted message was at "
          "the sink / the queue was empty)")
    for name, t in rows:
        print("%s: kills %s; refused attempts %s"
              % (name, dict(sorted(t.kills.items())), dict(t.failures.most_common(5))))
        if t.lost:
            print("%s: lost ids (first 20): %s" % (name, t.lost[:20]))


def main():
    count, seconds, wait, targets = settings()
    reason = chaos_available() or postfix_available()
    if reason:
        print("chaos: cannot run: %s" % reason)
        return 2
    scratch = shared_scratch("elemta-chaos-")
    print("chaos: %d messages, %d sessions (every %dth through sendmail), SIGKILL of a "
          "random child every 0.2-0.5 s for %.0f s and until the load is in; in %s"
          % (count, SESSIONS, SENDMAIL_EVERY, seconds, scratch))
    rows = []
    try:
        for name, run in (("elemta", chaos_elemta), ("postfix", chaos_postfix)):
            if name in targets:
                tally = run(scratch, count, seconds, wait)
                print("  " + tally.summary(name))
                rows.append((name, tally))
    finally:
        if os.environ.get("CHAOS_KEEP") == "1":
            print("kept %s" % scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    report(rows, wait)
    failed = [t for name, t in rows
              if name == "elemta" and (t.lost or t.empty_after is None or t.master_died)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
