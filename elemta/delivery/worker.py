"""The delivery worker process (`elemta: delivery`): empties the queue, as Postfix's qmgr
and smtp do together.

Runs in a child forked by elemta.master (kind "delivery"); opens its own queue after the
fork. Its loop, top to bottom:

    free      at start, every GONE_CHECK_EVERY seconds, and at once when the master says
              it reaped a delivery worker or the local agent (a CHILD_ENDED datagram,
              elemta.queue.wakeup): messages leased to a worker that has certainly ended
              (elemta.queue.holders) are due again, one log line each "<qid>: its
              delivery worker <pid> died; due again"; a live worker keeps its leases
              however stuck it is
    reclaim   now and then, messages whose lease lapsed (a worker on another host, or one
              whose death could not be told) become due; the leases of this worker's
              deliveries still under way are renewed
    claim     due messages, as many as there is room for, leased to this worker
    deliver   each in its own greenlet (a claimed message whose spool file is gone is
              dropped, as reconcile would: its removal could not reach a full index):
              recipients grouped by destination (routing, which
              routing-stage plugins may change; delivery-stage plugins may settle some
              recipients first: elemta.delivery.stages), each
              group by its transport: SMTP to the first host that takes it (the next MX
              host when a host refuses the connection, greets badly or drops the
              session; elemta.delivery.smtp_transport), LMTP, local delivery, or the
              error transport's bounce (delivery.default_transport = error); at most
              delivery.destination_concurrency connections per destination across workers
              (elemta.delivery.concurrency)
    notify    the notices the sender asked for (elemta.delivery.bounce: bounce, delay
              warning, success) are queued first, so a crash before the next step
              repeats one at worst and never loses a bounce
    record    per recipient, durably (Queue.record_attempts, many messages per flush:
              elemta.delivery.recorder): sent recipients are never sent again; 4xx and
              connection errors wait an exponential backoff (min_backoff doubling to
              max_backoff), but a local agent that went away only AGENT_RETRY seconds
              (doubling, elemta.delivery.local_transport); 5xx bounce; past
              queue_lifetime the waiting ones bounce (results a full disk or index
              cannot take are tried again: the recorder); a
              delivery that broke on something unexpected waits a backoff too. The log
              gets one Postfix-style line per recipient: "<qid>: to=<a@b>,
              relay=host[ip]:port, delay=1.2, status=sent (250 ...)"
    purge     now and then, failed messages older than delivery.failed_retention go
    sleep     until new mail wakes it (the smtpd's committer sends a datagram to
              spool/run/delivery-<slot>.sock, elemta.queue.wakeup), a delivery ends, or the
              earliest next_attempt in the index comes: no polling interval.
    tlsrpt    beside the loop, with tlsrpt.enabled: TLS session results flushed to the
              spool, the daily TLS-RPT reports sent (elemta.delivery.tlsreports)

Stops gracefully on SIGTERM (deliveries under way get master.stop_grace seconds),
at once on SIGQUIT, and when the master is gone; a message cut short is given back, due
at once (after SIGQUIT or a kill: as soon as another worker sees this one has ended), and
another worker sends it (at worst twice, never lost).
See also: elemta.queue.queue (claim, reclaim, record_attempts), elemta.delivery.routing,
elemta.delivery.smtp_client, elemta.delivery.bounce, elemta.smtpd.worker (the same life cycle).
"""

import logging
import os
import random
import time
from collections import OrderedDict

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.pool import Pool

from elemta import metrics
from elemta.delivery import bounce, dane, deferrals
from elemta.delivery.concurrency import DestinationSlots
from elemta.delivery.error_transport import ErrorTransport
from elemta.delivery.lmtp import LMTPTransport
from elemta.delivery.local_transport import AGENT_RETRY, LocalTransport, went_away
from elemta.delivery.mx import MXResolver
from elemta.delivery.recorder import AttemptRecorder
from elemta.delivery.routing import ERROR, LMTP, LOCAL, SMTP, UNKNOWN_CLASS, Router
from elemta.delivery.smtp_transport import SMTPTransport
from elemta.delivery.stages import NO_RELAY, DeliveryStages
from elemta.delivery.tlsreports import TLSReporting
from elemta.maps import TableUnavailable
from elemta.queue import holders, wakeup
from elemta.queue.model import BOUNCED, PENDING, RCPT_DEFERRED, SENT
from elemta.queue.queue import (ATTEMPT_FAILED, ATTEMPT_GONE, ATTEMPT_LEASE_LOST,
                                ATTEMPT_REMOVED, Attempt, Queue)
from elemta.smtp.replies import lookup_failure
from elemta.tlsrpt.counter import TLSCounter
from elemta.tlsrpt.store import CountStore
from elemta.util.child import GeventChild
from elemta.util.logs import error_text
from elemta.util.threads import in_thread

log = logging.getLogger("elemta.delivery")

# Messages one worker delivers at once, and claims per write transaction.
MAX_IN_FLIGHT = 100
CLAIM_BATCH = 20
# Least seconds between two claims of a worker with deliveries under way: under load the
# deliveries ending and the mail arriving meanwhile are claimed for together. Each claim
# is a write transaction with its flush and a hop to a thread; claiming after every
# delivery that ended and every commit of the smtpd (a message each, under smtp-source
# load) cost more than the rest of the loop. An idle worker claims at once, and one
# claiming now and then too: the wait is only ever for what came within this time.
CLAIM_GATHER = 0.05
# Seconds before trying the index again when it cannot be written (a full disk).
INDEX_RETRY = 5
# Seconds between two looks for leases held by workers that have ended (besides the look
# the master's CHILD_ENDED datagram asks for): reads only the active messages.
GONE_CHECK_EVERY = 2.0
# Most seconds between two looks for failed messages past delivery.failed_retention.
PURGE_EVERY = 600.0
# Seconds a message waits when its second lease holder in a row has died (see
# orphan_delay): long enough for a respawned worker to boot (no tight crash loop).
ORPHAN_FIRST_WAIT = 5.0
EXPIRED = "message expired after %d seconds in the queue"


def backoff(attempts, minimum, maximum):
    """Seconds before the next attempt after `attempts` failed ones (Postfix: doubling)."""
    return min(maximum, minimum * 2 ** min(max(attempts - 1, 0), 32))


def orphan_delay(orphaned, minimum, maximum):
    """Seconds before a message whose lease holder ended is due again, `orphaned` counting
    the holders in a row that ended holding it. None the first time (the crash was most
    likely not its doing: kill -9, OOM, a restart), then ORPHAN_FIRST_WAIT doubling up to
    `minimum` (min_backoff), then on as the backoff after failed attempts up to
    `maximum`. Small at first: a worker killed twice in a row under chaos (or a busy
    OOM killer) must not cost an innocent message min_backoff; growing: a message that
    kills every worker taking it cannot keep them in a tight crash loop."""
    if orphaned <= 1:
        return 0.0
    steps = orphaned - 2           # doublings after the second holder's death
    wait = ORPHAN_FIRST_WAIT
    while steps and wait < minimum:
        wait *= 2
        steps -= 1
    if wait < minimum:
        return min(wait, maximum)
    return backoff(steps + 1, minimum, maximum)


class DeliveryWorker(GeventChild):
    """One delivery worker process (see the module docstring)."""

    kind = "delivery"
    max_use_option = "delivery"

    def __init__(self, config, slot, scoreboard, master_pid):
        super().__init__(config, slot, scoreboard, master_pid)
        self.delivery = config.delivery
        self.queue = None
        self.owner = None
        self.pool = Pool(MAX_IN_FLIGHT)
        self._wake = Event()
        self._look_for_gone = Event()    # the master reaped a worker: free its leases now
        self.wake_socket = None
        self.slots = None            # DestinationSlots, opened in boot()
        self.router = Router(config)
        self.transports = {}         # Destination.kind -> transport, made in boot()
        self.recorder = None
        self.stages = None           # DeliveryStages: routing and delivery plugins
        self.tls_reporting = None    # TLSReporting, when tlsrpt.enabled
        # First purge of old failed messages soon after start, spread among workers.
        self._next_purge = time.time() + random.uniform(1.0, 3.0)

    # ---- the life cycle (elemta.util.child) ---------------------------------------------

    def boot(self):
        spool = self.config.queue.spool_dir
        self.queue = Queue.from_config(self.config.queue)
        self.owner = holders.holder_name()
        resolver = MXResolver(list(self.delivery.nameservers) or None,
                              port=self.delivery.dns_port, timeout=self.delivery.dns_timeout,
                              dnssec=dane.wanted(self.delivery))
        self.wake_socket = wakeup.bind(spool, self.slot, gsocket)
        self.own_socket_file(wakeup.socket_path(spool, self.slot))
        store = self.queue.store
        self.slots = DestinationSlots(
            os.path.join(wakeup.run_dir(spool), "destinations.lock"),
            self.delivery.destination_concurrency,
            [(entry.domain, entry.limit) for entry in self.delivery.destination_limits])
        self.recorder = AttemptRecorder(self.queue, self.owner)
        self.stages = DeliveryStages(self.config)
        counter = None
        if self.config.tlsrpt.enabled:
            counter = TLSCounter()
            self.tls_reporting = TLSReporting(self.config, counter, CountStore(spool),
                                              self.owner)
        self.transports = {SMTP: SMTPTransport(self.config, store, resolver, counter),
                           LMTP: LMTPTransport(self.config, store),
                           LOCAL: LocalTransport(self.config, store),
                           ERROR: ErrorTransport()}
        log.info("delivery worker started (slot %d)", self.slot)

    def serve(self):
        """Deliver until stopped, then let the deliveries under way finish (within the
        grace) and give back what is left."""
        helpers = [gevent.spawn(self._listen, self.wake_socket),
                   gevent.spawn(self._renew_leases),
                   gevent.spawn(self._free_gone_leases)]
        if self.tls_reporting is not None:
            helpers.append(gevent.spawn(self.tls_reporting.run))
        self.free_gone_leases_now()          # before the first claim: what a dead one left
        try:
            self.loop()
            if self.pool.free_count() < self.pool.size:
                log.info("delivery stopping: %d message(s) in flight get %ds to finish",
                         self.pool.size - self.pool.free_count(), self.grace)
                self.pool.join(timeout=self.grace)
            unfinished = self._in_flight()
            self.pool.kill(block=True, timeout=1)
            self.give_back(unfinished)
        finally:
            gevent.killall(helpers)

    def shut_down(self):
        self.recorder.close()
        for transport in self.transports.values():
            transport.close()
        self.stages.close()
        if self.tls_reporting is not None:
            self.tls_reporting.close()
        self.wake_socket.close()
        self.queue.close()
        self.slots.close()

    def give_back(self, unfinished, timeout=10.0):
        """Once deliveries have stopped: record the results still waiting, then make the
        claims on `unfinished` messages due now (not when their leases lapse). Returns the
        ids given back. Results first: a message given back while its 250 waits could be
        claimed and sent again. If the recorder is still writing after `timeout`, nothing
        is given back: a result may yet be written after another worker took the message;
        the leases stay, and the other workers free them once this process is gone (the
        master tells them when it reaps it)."""
        if not self.recorder.close(timeout):
            if unfinished:
                log.error("delivery stopped with %d message(s) unfinished while results were "
                          "still being recorded; not given back: due again once this worker "
                          "has exited", len(unfinished))
            return []
        if not unfinished:
            return []
        try:
            given_back = self.queue.release_claims(self.owner, unfinished)
        except OSError as error:        # a full disk or index
            log.error("delivery stopped with %d message(s) unfinished; cannot give "
                      "them back (%s): due again when their leases lapse",
                      len(unfinished), error)
            return []
        log.info("delivery stopped with %d message(s) unfinished; due again",
                 len(given_back))
        for queue_id in given_back:        # a line each, for grep QUEUEID
            log.info("%s: delivery cut short by the stop; due again", queue_id)
        return given_back

    def on_stop(self):
        """Claim nothing more; deliveries under way get master.stop_grace (SIGQUIT: none;
        what they held returns to the queue when its lease lapses)."""
        self._wake.set()

    def _listen(self, wake_socket):
        """New mail was committed: wake the loop (many datagrams, one wake-up). A child
        of the master ended: look for leases it left."""
        while True:
            if wake_socket.recv(64) == wakeup.CHILD_ENDED:
                self._look_for_gone.set()
            else:
                self._wake.set()

    def _free_gone_leases(self):
        """Every GONE_CHECK_EVERY seconds (spread a little among workers), or at once when
        the master says a child ended: free_gone_leases_now."""
        while True:
            self._look_for_gone.wait(GONE_CHECK_EVERY * random.uniform(0.75, 1.25))
            self._look_for_gone.clear()
            self.free_gone_leases_now()

    def free_gone_leases_now(self):
        """The messages of lease holders that have ended are due again now, not when
        their leases lapse; one log line each."""
        try:
            freed = self.queue.free_gone_leases(self._orphan_delay)
        except Exception as error:   # this greenlet must live on: logged
            log.error("cannot look for messages of delivery workers that died: %s", error)
            return
        now = time.time()
        for queue_id, owner, due in freed:
            log.warning("%s: its delivery worker %s died; due again%s", queue_id,
                        holders.holder_pid(owner) or owner,
                        " in %d s" % round(due - now) if due > now + 0.5 else "")
        if freed:
            self._wake.set()

    def _orphan_delay(self, orphaned):
        return orphan_delay(orphaned, self.delivery.min_backoff, self.delivery.max_backoff)

    def _in_flight(self):
        """Queue ids of the messages this worker is delivering now."""
        return [g.args[0].queue_id for g in list(self.pool) if g.args]

    def _renew_leases(self):
        """Keep the leases of deliveries still under way from lapsing: every third of a
        lease, all of them in one transaction (a delivery may take longer than a lease:
        a slow server, a big message)."""
        lease = self.delivery.lease
        while True:
            gevent.sleep(lease / 3)
            in_flight = self._in_flight()
            if in_flight:
                try:
                    self.queue.renew_leases(self.owner, in_flight, lease)
                except OSError as error:
                    log.error("cannot renew the leases of %d message(s): %s",
                              len(in_flight), error)

    # ---- the loop -----------------------------------------------------------------------

    def _room(self):
        """How many messages the next claim may take: what the pool has room for, in
        batches, and never past max_use (a retiring worker holds no more leases than the
        messages it counts)."""
        room = min(self.pool.free_count(), CLAIM_BATCH)
        if self.max_use:
            room = min(room, max(self.max_use - self.uses, 0))
        return room

    def loop(self):
        reclaim_every = max(0.5, min(self.delivery.lease / 4, 30.0))
        next_reclaim = 0.0
        last_claim = 0.0             # time.monotonic() of the last claim
        while not self.stopping.is_set():
            now = time.time()
            # Cleared before claiming: a wake-up that comes during the claim is kept.
            self._wake.clear()
            room = self._room()
            gather = last_claim + CLAIM_GATHER - time.monotonic()
            if room and gather > 0 and self.pool.free_count() < self.pool.size:
                if self.stopping.wait(gather):
                    break
                room = self._room()
            last_claim = time.monotonic()
            try:
                if now >= next_reclaim:
                    for queue_id in self.queue.reclaim(now, self._orphan_delay):
                        log.warning("%s: lease lapsed (its delivery worker died); due again",
                                    queue_id)
                    next_reclaim = now + reclaim_every
                # In a thread: its flush must not stall the deliveries under way, nor
                # the results waiting to be recorded (elemta.delivery.recorder).
                claimed = in_thread(self.queue.claim, self.owner, room,
                                    self.delivery.lease) if room else []
            except OSError as error:
                # A full disk (the index cannot grow) or the like: nothing is claimed, so
                # nothing is at risk; look again soon rather than die and be respawned.
                log.error("cannot take work from the queue: %s; trying again in %d s",
                          error, INDEX_RETRY)
                self._wake.wait(INDEX_RETRY)
                continue
            self._purge_failed(now)
            for record in claimed:
                self.pool.spawn(self.deliver, record)
            if self.used(len(claimed), "took %d messages"):
                break
            if claimed and len(claimed) == room:
                if room == CLAIM_BATCH:
                    last_claim = 0.0     # a backlog: the next batch at once
                gevent.sleep(0)
                continue
            timeout = min(next_reclaim, self._next_purge) - time.time()
            if self.pool.free_count():
                due = self.queue.next_due_time()
                if due is not None:
                    timeout = min(timeout, due - time.time())
            if timeout > 0:
                self._wake.wait(timeout)

    def _purge_failed(self, now):
        """Now and then, remove failed messages kept longer than failed_retention (in a
        thread: it reads every failed record). Any worker may; they agree on what to
        remove."""
        if now < self._next_purge:
            return
        self._next_purge = now + min(PURGE_EVERY, max(1.0, self.delivery.failed_retention))
        try:
            removed = in_thread(self.queue.purge_failed,
                                now - self.delivery.failed_retention)
        except Exception as error:
            log.error("cannot remove old failed messages: %s", error)
            return
        for queue_id in removed:
            log.info("%s: removed (failed %d seconds ago or more)", queue_id,
                     self.delivery.failed_retention)

    # ---- one message --------------------------------------------------------------------

    def deliver(self, record):
        """One attempt at one claimed message: every recipient still waiting."""
        try:
            try:
                os.stat(self.queue.store.path(record.queue_id))
            except FileNotFoundError:   # only then: an unreadable file is not a gone one
                return self._drop_fileless(record)
            self._deliver(record)
        except OSError as error:        # the system's doing (a file, the disk): one line
            log.error("%s: delivery failed; the message stays queued: %s", record.queue_id,
                      error)
            self._defer_after_error(record, error)
        except Exception as error:      # ours: the traceback is for the bug report
            log.exception("%s: delivery failed; the message stays queued", record.queue_id)
            self._defer_after_error(record, error)
        finally:
            self._wake.set()

    def _drop_fileless(self, record):
        """A record whose message file is gone (the files are the truth): its message was
        delivered and removed, or deleted, but the record could not be (a full disk or
        index at that moment). Drop it, as reconcile would, rather than retry it forever."""
        try:
            in_thread(lambda: list(self.queue.delete([record.queue_id], why=None)))
        except OSError as error:
            log.error("%s: message file gone; cannot drop its record yet: %s",
                      record.queue_id, error)
            return
        log.warning("%s: message file gone (removed before its record could be); record "
                    "dropped", record.queue_id)

    def _defer_after_error(self, record, error):
        """A delivery that broke on something unexpected waits a backoff like a 4xx
        (not its whole lease, and not a hot loop); recipients already recorded keep
        their results."""
        delay = backoff(record.attempts + 1, self.delivery.min_backoff,
                        self.delivery.max_backoff)
        try:
            self.recorder.record(Attempt(
                record.queue_id, {}, time.time() + delay,
                "delivery failed: %s: %s" % (type(error).__name__, error_text(error))))
        except Exception as failure:
            log.error("%s: cannot defer it (%s); it is tried again when its lease lapses",
                      record.queue_id, failure)

    def _deliver(self, record):
        envelope = record.envelope
        groups = OrderedDict()       # Destination -> [(index, Recipient)]
        results = {}                 # index -> (status, reply, relay)
        # For the metrics, by index: Destination.kind, the domain class, and why a
        # deferred recipient was deferred (an elemta.delivery.deferrals word).
        transports, classes, reasons = {}, {}, {}
        for index, recipient in enumerate(envelope.recipients):
            if recipient.status not in (PENDING, RCPT_DEFERRED):
                continue
            try:
                routed, classes[index] = self.router.route(recipient.address)
            except TableUnavailable as error:
                # A domain table that cannot answer: this recipient waits (451 4.3.0).
                log.warning("%s: <%s>: lookup failed: %s", record.queue_id,
                            recipient.address, error)
                results[index] = (RCPT_DEFERRED, str(lookup_failure(recipient.address)),
                                  NO_RELAY)
                transports[index], classes[index] = NOT_ROUTED, UNKNOWN_CLASS
                reasons[index] = deferrals.LOOKUP
                continue
            destination = self.stages.routing(record, recipient, routed)
            transports[index] = destination.kind
            groups.setdefault(destination, []).append((index, recipient))
        if len(groups) == 1:         # the usual case: no greenlet of its own to spawn
            values = [_caught(self._deliver_group, record, *next(iter(groups.items())))]
        else:
            jobs = [gevent.spawn(_caught, self._deliver_group, record, destination, items)
                    for destination, items in groups.items()]
            gevent.joinall(jobs)
            values = [job.value for job in jobs]
        ours = {}                    # index -> the success notice that is ours to send
        for value, (destination, _) in zip(values, groups.items()):
            if isinstance(value, Exception):
                raise value
            decided, why = value
            reasons.update(why)
            for index, result in decided.items():
                results[index] = result[:3]
                # Local and LMTP delivery is final; an SMTP next hop may pass the DSN
                # request on (then a success notice is its job, not ours).
                if destination.kind != SMTP:
                    ours[index] = bounce.DELIVERED
                elif len(result) > 3 and result[3] is False:
                    ours[index] = bounce.RELAYED
        now = time.time()
        if now - envelope.arrival >= self.delivery.queue_lifetime:
            for index, (status, reply, relay) in list(results.items()):
                if status == RCPT_DEFERRED:
                    results[index] = (BOUNCED, "%s (%s)" % (
                        EXPIRED % self.delivery.queue_lifetime, reply), relay)
        # The notices go into the queue before the results are recorded: a crash in
        # between repeats the attempt (and a notice, at worst), never loses a bounce.
        warn = self._queue_notices(record, results, ours, now, reasons)
        waiting = [r for i, r in results.items() if r[0] == RCPT_DEFERRED]
        last_error = waiting[-1][1] if waiting else None
        next_attempt = now + self._retry_delay(record, results)
        outcome = self.recorder.record(
            Attempt(record.queue_id, results, next_attempt, last_error, now, warn))
        self._log_results(record, results, now, transports, classes, reasons)
        if outcome == ATTEMPT_REMOVED:
            log.info("%s: removed", record.queue_id,
                     extra={"event": "removed", "queue_id": record.queue_id})
        elif outcome == ATTEMPT_FAILED:
            log.info("%s: failed: no recipient left to try", record.queue_id,
                     extra={"event": "failed", "queue_id": record.queue_id})
        elif outcome in (ATTEMPT_LEASE_LOST, ATTEMPT_GONE):
            log.info("%s: %s during delivery (held, deleted or reclaimed); results kept for "
                     "each recipient", record.queue_id, outcome)

    def _retry_delay(self, record, results):
        """Seconds until the recipients still waiting are tried again: the backoff, or
        AGENT_RETRY doubling per attempt in a row when only the local agent going away
        (killed, restarting) held them up."""
        normal = backoff(record.attempts + 1, self.delivery.min_backoff,
                         self.delivery.max_backoff)
        waiting = [reply for status, reply, _ in results.values() if status == RCPT_DEFERRED]
        if waiting and all(went_away(reply) for reply in waiting):
            return min(normal, AGENT_RETRY * 2 ** min(_agent_away_streak(record), 32))
        return normal

    def _queue_notices(self, record, results, ours, now, reasons):
        """Queue the notices this attempt calls for: a bounce for the recipients that
        failed (if it cannot be queued they wait for the next attempt instead, as
        Postfix defers when its bounce service fails), a success notice for the sent
        ones in `ours` ({index: DELIVERED or RELAYED}), a delay warning. Returns whether
        a delay warning was queued."""
        envelope = record.envelope
        by_status = {SENT: [], BOUNCED: [], RCPT_DEFERRED: []}
        for index, (status, reply, _) in sorted(results.items()):
            recipient = envelope.recipients[index]
            recipient.status, recipient.last_reply = status, reply
            if status != SENT or index in ours:
                by_status[status].append(recipient)
        if not self._notify(record, "non-delivery notification", bounce.queue_bounce,
                            by_status[BOUNCED]):
            for index, (status, reply, relay) in list(results.items()):
                if status == BOUNCED:
                    results[index] = (RCPT_DEFERRED, "%s (no bounce could be queued; "
                                      "trying again)" % reply, relay)
                    reasons[index] = deferrals.INTERNAL
                    envelope.recipients[index].status = RCPT_DEFERRED
                    by_status[RCPT_DEFERRED].append(envelope.recipients[index])
        sent = [i for i, result in results.items() if result[0] == SENT and i in ours]
        self._notify(record, "delivery status notification", bounce.queue_notice,
                     by_status[SENT], bounce.DELIVERED if all(
                         ours[i] == bounce.DELIVERED for i in sent) else bounce.RELAYED)
        if (by_status[RCPT_DEFERRED] and self.delivery.delay_warning_time
                and not record.delay_warned
                and now - envelope.arrival >= self.delivery.delay_warning_time):
            return self._notify(record, "delay warning", bounce.queue_notice,
                                by_status[RCPT_DEFERRED], bounce.DELAYED,
                                envelope.arrival + self.delivery.queue_lifetime)
        return False

    def _log_results(self, record, results, now, transports, classes, reasons):
        """One Postfix smtp line per recipient: "to=<>, relay=, delay=, dsn=, status=
        (reply)", the facts also as JSON fields (pflogsumm and elemtactl report read
        either); counted by result, transport ({index: Destination.kind}) and domain
        class ({index: class}), a deferral also by its reason ({index: word})."""
        delay = now - record.envelope.arrival
        for index in sorted(results):
            status, reply, relay = results[index]
            word = {SENT: "sent", BOUNCED: "bounced"}.get(status, "deferred")
            address = record.envelope.recipients[index].address
            dsn = bounce.status_of(reply, _DSN_ACTION[word])
            log.info("%s: to=<%s>, relay=%s, delay=%s, dsn=%s, status=%s (%s)",
                     record.queue_id, address, relay, _seconds(delay), dsn, word, reply,
                     extra={"event": "delivery", "queue_id": record.queue_id, "to": address,
                            "relay": relay, "delay": round(delay, 3), "dsn": dsn,
                            "status": word, "reason": reply,
                            "size": record.envelope.size or None})
            transport = transports.get(index, NOT_ROUTED)
            domain_class = classes.get(index, UNKNOWN_CLASS)
            metrics.DELIVERIES.labels(word, transport, domain_class).inc()
            if word == "deferred":
                metrics.DEFERRALS.labels(deferrals.known(reasons.get(index)), transport,
                                         domain_class).inc()
            else:
                metrics.DELIVERY_DELAY.observe(delay)

    def _deliver_group(self, record, destination, items):
        """Deliver recipients sharing a destination by its transport, within the
        destination's concurrency limit, but for those the delivery-stage plugins decided
        on. Returns ({index: (status, reply, relay[, dsn_passed])}, {index: the reason,
        an elemta.delivery.deferrals word, for the deferrals metric})."""
        results = self.stages.delivery(record, destination, items) or {}
        reasons = dict.fromkeys(results, deferrals.PLUGIN)
        items = [item for item in items if item[0] not in results]
        if items:
            # The claim just read the priority; the index is asked again only while
            # the delivery waits (an admin may change it meanwhile).
            with self.slots.hold(destination, lambda: self._priority_now(record),
                                 initial=record.envelope.priority):
                delivered = self.transports[destination.kind].deliver(
                    record, destination, items)
            # The transport's own word, else what its kind says (the local agent's
            # replies are the local delivery's).
            default = deferrals.LOCAL if destination.kind == LOCAL else deferrals.OTHER
            for index, result in delivered.items():
                reasons[index] = (result[4] if len(result) > 4 else None) or default
            results.update(delivered)
        return results, reasons

    def _priority_now(self, record):
        """The message's priority as the index has it now: an admin may have changed it
        (elemtactl queue priority) since this worker claimed the message."""
        try:
            now = self.queue.get(record.queue_id)
        except Exception:           # an index that cannot be read: keep the claimed one
            log.debug("%s: priority not read again", record.queue_id, exc_info=True)
            now = None
        return record.envelope.priority if now is None else now.envelope.priority

    # ---- notices to the sender -----------------------------------------------------

    def _notify(self, record, what, queue_it, recipients, *args):
        """Queue an RFC 3464 notice about recipients (elemta.delivery.bounce decides
        whether one is due: NOTIFY, the null sender), in a thread: a commit waits for
        the disk. Returns False only when one was due and could not be queued."""
        if not recipients:
            return True
        try:
            queue_id = in_thread(queue_it, self.queue, self.config, record.envelope,
                                 recipients, *args)
        except Exception as error:
            log.error("%s: cannot queue the %s to <%s>: %s", record.queue_id, what,
                      record.envelope.sender, error)
            return False
        if queue_id is not None:
            metrics.NOTICES.labels(_NOTICE_KINDS[what]).inc()
            log.info("%s: sender %s: %s", record.queue_id, what, queue_id,
                     extra={"event": "notice", "queue_id": record.queue_id,
                            "notice": what, "notice_id": queue_id,
                            "to": record.envelope.sender})
            self._wake.set()
        return True


def _agent_away_streak(record):
    """How many attempts in a row, the latest first, ended with every result a deferral
    because the local agent went away (read from the message's history)."""
    streak, attempt_time = 0, None
    for when, _, status, _, reply in reversed(record.history):
        if status != RCPT_DEFERRED or not went_away(reply):
            break
        if when != attempt_time:
            streak, attempt_time = streak + 1, when
    return streak


def _caught(function, *args):
    """function(*args), or the Exception it raised: a greenlet that dies of one has it
    printed by gevent's hub besides; the caller raises it again in its own greenlet."""
    try:
        return function(*args)
    except Exception as error:
        return error


# A notice's kind, for elemta_delivery_notices_total (by what _notify calls it).
_NOTICE_KINDS = {"non-delivery notification": "failure", "delay warning": "delay",
                 "delivery status notification": "success"}
# The transport label of a recipient never routed (its domain table could not answer).
NOT_ROUTED = "none"

# The DSN class a result without an enhanced status gets (Postfix's dsn= for such).
_DSN_ACTION = {"sent": bounce.DELIVERED, "bounced": bounce.FAILED,
               "deferred": bounce.DELAYED}


def _seconds(value):
    """Postfix's delay= style: 0.12, 1.2, 12, 1234."""
    return "%.2g" % value if value < 10 else "%d" % round(value)


def run_delivery(config, slot, scoreboard, master_pid):
    """The main of a delivery child (its entry in elemta.services)."""
    return DeliveryWorker(config, slot, scoreboard, master_pid).run()
