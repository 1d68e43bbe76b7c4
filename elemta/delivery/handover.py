"""Handing this node's queued messages to other nodes over SMTP (`elemtactl drain`).

Runs in elemtactl's own process, as the spool's owner (elemta.cli.draincmd), beside the
daemon's delivery workers. Each message is claimed with a lease under this process's
holder name (Queue.claim_ids, elemta.queue.holders), as a delivery worker claims one, so
the two never send one message twice; a handover killed midway leaves leases that the
delivery workers free once they see it gone.

A message goes as it was received: MAIL FROM with SIZE, BODY, SMTPUTF8, RET and ENVID, a
RCPT with NOTIFY and ORCPT for each recipient still waiting, the content as stored
(elemta.delivery.smtp_client). A recipient the peer takes (250 after the data) is
recorded sent, relayed to the peer, and the message leaves this node once none is left.
Whatever the peer refuses, for now or for good, stays here with the peer's reply as its
last error, due when it was: a handover never bounces mail (a peer that refuses is a
cluster to mend, not a sender to tell). Nor does it drop a DSN request: a message that
carries one goes only to a peer that offers DSN.

Spread hands a pass's messages to several peers in turn (a drain in a cluster: the
live nodes of the registry), passing over a peer that cannot be reached.

The peer must take the mail as a relay: its handover listener does for a client that
logs in with the cluster's credential (the new_client the caller gives carries it:
elemta.cli.draincmd), an smtp listener only for its relay.mynetworks (elemta(8),
Running a cluster).
See also: elemta.queue.draining, elemta.delivery.smtp_transport (the same client for
ordinary delivery).
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Tuple

from elemta.delivery.smtp_client import DELIVERED, SessionError
from elemta.queue import holders
from elemta.queue.model import PENDING, RCPT_DEFERRED, SENT
from elemta.queue.queue import Attempt

log = logging.getLogger("elemta.delivery")


class PeerUnavailable(Exception):
    """No session with the peer (refused, timed out, 421 greeting): the rest of the pass
    would fail the same way. done: the HandoverPass up to then."""
    done = None


@dataclass
class HandoverPass:
    """What one pass over the queue did."""
    moved: List[str] = field(default_factory=list)            # ids that left this node
    kept: List[Tuple[str, str]] = field(default_factory=list)  # (id, why it stays)
    unreachable: List[str] = field(default_factory=list)       # peers passed over: why


def parse_target(text, default_port=25):
    """(host, port) of "host", "host:port", "[address]" or "[address]:port"."""
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
        elif rest:
            raise ValueError("not host[:port]: %r" % text)
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise ValueError("no host in %r" % text)
    try:
        port = int(port)
    except ValueError:
        raise ValueError("the port in %r is not a number" % text) from None
    if not 0 < port < 65536:
        raise ValueError("the port in %r is not from 1 to 65535" % text)
    return host, port


def _waiting(record):
    """Indexes of the recipients still to deliver."""
    return [i for i, r in enumerate(record.envelope.recipients)
            if r.status in (PENDING, RCPT_DEFERRED)]


def _asks_for_dsn(record, indexes):
    envelope = record.envelope
    return bool(envelope.ret or envelope.envid or any(
        envelope.recipients[i].notify or envelope.recipients[i].orcpt for i in indexes))


class Handover:
    """Hands messages of `queue` to the SMTP server at target (host, port).

    new_client(): an unconnected SMTPClient (the delivery settings' TLS and timeouts).
    lease_seconds: how long a message claimed here is ours (delivery.lease)."""

    def __init__(self, queue, target, new_client: Callable, lease_seconds: float,
                 name=None):
        self.queue = queue
        self.host, self.port = target
        self.name = name                # the node's, when it has one
        self.new_client = new_client
        self.lease_seconds = lease_seconds
        self.owner = holders.holder_name()
        self.client = None

    @property
    def where(self):
        address = "%s:%d" % (self.host if ":" not in self.host else "[%s]" % self.host,
                             self.port)
        return "%s (%s)" % (self.name, address) if self.name else address

    def run(self, queue_ids: Iterable[str]) -> HandoverPass:
        """Hand over each of queue_ids that waits (incoming or deferred); messages being
        delivered, held or gone meanwhile are passed by. Raises PeerUnavailable (after
        giving back the message in hand) when the peer cannot be reached."""
        return Spread([self]).run(queue_ids)

    def hand_over(self, record, outcome):
        queue_id = record.queue_id
        indexes = _waiting(record)
        if not indexes:          # nothing left to send: the queue removes or fails it
            self._give_back(record, {}, None)
            return
        try:
            client = self._session()
        except SessionError as error:
            self._give_back(record, {}, "handover to %s: %s" % (self.where, error.reply))
            self.close()
            raise PeerUnavailable("%s: %s" % (self.where, error.reply)) from None
        if _asks_for_dsn(record, indexes) and "DSN" not in client.extensions:
            self._keep(record, {}, "handover to %s: it does not offer DSN, and this "
                                   "message's DSN request would be lost" % self.where,
                       outcome)
            return
        try:
            _, content = self.queue.open_message(queue_id)
            with content:
                result = client.send(record.envelope, content,
                                     [record.envelope.recipients[i] for i in indexes])
        except (OSError, ValueError, LookupError) as error:
            # The spool file is damaged or was deleted meanwhile: nothing was handed over
            # (the client cut the data short), and the peer's session cannot be trusted.
            self.close()
            self._keep(record, {}, "cannot read it: %s" % error, outcome)
            return
        except BaseException:
            self._give_back(record, {}, "handover to %s interrupted" % self.where)
            self.close()
            raise
        sent, refused = {}, []
        for index, item in zip(indexes, result.recipients):
            if item.outcome == DELIVERED:
                sent[index] = (SENT, str(item.reply), client.peer)
            else:
                refused.append("<%s>: %s" % (item.recipient.address, item.reply))
        if not client.usable:
            self.client = None
        if refused:
            self._keep(record, sent, "handover to %s refused %s" % (
                self.where, "; ".join(refused)), outcome)
            return
        self._give_back(record, sent, None)
        outcome.moved.append(queue_id)
        log.info("%s: handed over to %s (%d recipient(s)): %s", queue_id, client.peer,
                 len(sent), result.recipients[0].reply if result.recipients else "")

    def _keep(self, record, sent, why, outcome):
        """The message stays here, its sent recipients recorded, due when it was."""
        self._give_back(record, sent, why)
        outcome.kept.append((record.queue_id, why))
        log.info("%s: stays on this node: %s", record.queue_id, why)

    def _give_back(self, record, sent, why):
        """Record what the peer took; the rest waits for record.next_attempt again (the
        file and record go once every recipient is sent: Queue.record_attempts)."""
        self.queue.record_attempts(self.owner, [Attempt(
            record.queue_id, sent, next_attempt=record.next_attempt or time.time(),
            last_error=why or record.last_error)])

    def _session(self):
        if self.client is None or not self.client.usable:
            client = self.new_client()
            client.connect(self.host, self.port, server_name=self.host)
            self.client = client
        return self.client

    def close(self):
        if self.client is not None:
            self.client.quit()
            self.client = None



class Spread:
    """Hands messages to several peers in turn (one Handover each), so a drained node's
    queue is shared among the others. A peer that cannot be reached (down, drained
    itself: 421) is passed over for the rest of the pass, and the message in hand goes
    to the next; PeerUnavailable only when none is left."""

    def __init__(self, handovers):
        self.handovers = list(handovers)

    @property
    def where(self):
        return ", ".join(handover.where for handover in self.handovers)

    def run(self, queue_ids: Iterable[str]) -> HandoverPass:
        outcome = HandoverPass()
        live, unreachable, turn = list(self.handovers), [], 0
        try:
            for queue_id in queue_ids:
                while live:
                    handover = live[turn % len(live)]
                    taken = handover.queue.claim_ids(handover.owner, [queue_id],
                                                     handover.lease_seconds)
                    if not taken:           # delivered, held or gone meanwhile
                        break
                    try:
                        handover.hand_over(taken[0], outcome)
                    except PeerUnavailable as error:
                        live.remove(handover)
                        unreachable.append(str(error))
                        continue
                    turn += 1
                    break
                if not live:
                    outcome.kept.append((queue_id, "; ".join(unreachable)))
                    raise PeerUnavailable("; ".join(unreachable))
        except PeerUnavailable as error:
            error.done = outcome
            raise
        finally:
            for handover in self.handovers:
                handover.close()
        outcome.unreachable = unreachable
        return outcome
