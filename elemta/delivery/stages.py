"""The routing and delivery plugin stages, for the delivery worker.

Owned by the delivery worker (`elemta: delivery`): it builds one DeliveryStages after the
fork, asks routing() for each recipient while grouping them by next hop, and delivery()
for each group just before handing it to its transport:

    stages = DeliveryStages(config)                               # in run(), after fork
    destination = stages.routing(record, recipient, router.destination(address))
    refused = stages.delivery(record, destination, items)         # None: go on
    # deliver only the items not in `refused`; merge `refused` into the results
    stages.close()                                                # at exit

Both calls return at once when no enabled plugin serves their stage (only plugins that
serve routing or delivery are loaded here). What a plugin sees and may answer is in
elemta.plugins.api:

    routing    Result.route("smtp:[10.0.0.5]:25") sends the recipient to that next hop
               (transport-map syntax, elemta.config.schema.parse_transport); a reject,
               tempfail or discard is remembered and reported by delivery() for that
               recipient, so the worker needs no second code path for it;
    delivery   per recipient of the group, with the message content (read from the
               spool once per group): reject -> BOUNCED, tempfail -> RCPT_DEFERRED,
               discard -> SENT "250 2.0.0 discarded by <plugin>"; quarantine -> waits
               (RCPT_DEFERRED: a message is not held in the middle of its delivery).

A plugin failing (raising, overrunning its timeout, an unusable next hop) defers the
recipient with 451 4.3.0 and is logged by name, or is passed over when fail_open.
See also: elemta.delivery.routing (Destination), elemta.plugins.manager.
"""

import logging
from collections import OrderedDict

from elemta.config.schema import parse_transport
from elemta.delivery.routing import (LMTP, LMTP_PORT, LOCAL, LOCAL_DESTINATION, SMTP,
                                     Destination)
from elemta.plugins.api import DELIVERY, REJECT, ROUTING, Context, Message
from elemta.plugins.manager import PLUGIN_FAILURE, PluginManager
from elemta.plugins.resolver import Resolver
from elemta.queue.model import BOUNCED, RCPT_DEFERRED, SENT
from elemta.queue.store import SpoolStore

log = logging.getLogger("elemta.delivery")

# The relay named in the log for a recipient a plugin decided on (Postfix: relay=none).
NO_RELAY = "none"
# Messages whose routing verdicts wait for delivery(); a bound, in case one never comes.
MAX_REMEMBERED = 10000


def destination_of(nexthop, mx_port):
    # type: (str, int) -> Destination
    """The Destination for a transport-map next hop ("smtp:[host]:port", "smtp:host",
    "lmtp:[host]:port", "lmtp:unix:/path", "local"), defaults as the transport map has
    them (delivery.mx_port for SMTP, 24 for LMTP); raises ValueError."""
    kind, host, port, mx_lookup = parse_transport(nexthop)
    if kind == LOCAL:
        return LOCAL_DESTINATION
    if kind == LMTP:
        return Destination(LMTP, host, 0 if host.startswith("/") else port or LMTP_PORT,
                           False)
    return Destination(SMTP, host, port or mx_port, mx_lookup)


def nexthop_of(destination):
    """The next hop of a Destination in transport-map syntax (what plugins see)."""
    return destination.key


class DeliveryStages:
    """The delivery worker's plugins: the routing and delivery stages."""

    def __init__(self, config, known=None):
        """known: name -> plugin class, instead of the installed ones (tests)."""
        self.hostname = config.hostname
        self.mx_port = config.delivery.mx_port
        self.plugins = PluginManager(config.plugins.to_run(), known=known,
                                     stages=(ROUTING, DELIVERY)).start()
        self.routes = self.plugins.wants(ROUTING)
        self.delivers = self.plugins.wants(DELIVERY)
        self.resolver = None
        self.store = None
        if self.routes or self.delivers:
            dns = config.dns
            self.resolver = Resolver(nameservers=list(dns.nameservers) or None,
                                     port=dns.port, timeout=dns.timeout)
        if self.delivers:
            self.store = SpoolStore(config.queue.spool_dir)
        # queue id -> {recipient index: (status, reply, relay)} decided at routing.
        self._decided = OrderedDict()

    def close(self):
        self.plugins.close()

    # ---- routing ------------------------------------------------------------------------

    def routing(self, record, recipient, destination):
        """The Destination for this recipient of a claimed record: `destination` (the
        router's) unless a routing plugin chose another next hop."""
        if not self.routes:
            return destination
        envelope = record.envelope
        ctx = self._context(record, [r.address for r in envelope.recipients], destination)
        ctx.recipient = recipient.address
        outcome = self.plugins.run(ROUTING, ctx)
        if outcome.nexthop is not None:
            try:
                chosen = destination_of(outcome.nexthop, self.mx_port)
            except ValueError as error:
                log.error("%s: plugin %s routed <%s> to an unusable next hop: %s; "
                          "the recipient waits", record.queue_id, outcome.decided_by,
                          recipient.address, error)
                self._remember(record, recipient, (
                    RCPT_DEFERRED, "%d %s %s" % PLUGIN_FAILURE, NO_RELAY))
                return destination
            if chosen != destination:
                log.info("%s: to=<%s>: next hop %s (plugin %s; was %s)", record.queue_id,
                         recipient.address, chosen.key, outcome.decided_by, destination.key)
            return chosen
        verdict = self._verdict(record, recipient.address, outcome, ROUTING)
        if verdict is not None:
            self._remember(record, recipient, verdict)
        return destination

    def _remember(self, record, recipient, verdict):
        index = _index_of(record.envelope.recipients, recipient)
        if index is None:               # not this message's recipient: nothing to report
            return
        self._decided.setdefault(record.queue_id, {})[index] = verdict
        self._decided.move_to_end(record.queue_id)
        while len(self._decided) > MAX_REMEMBERED:
            self._decided.popitem(last=False)

    # ---- delivery -----------------------------------------------------------------------

    def delivery(self, record, destination, items):
        """Before `items` ([(index, Recipient)], one group for `destination`) go to their
        transport: None to deliver them all, or {index: (status, reply, relay)} for the
        recipients plugins decided on (the worker delivers only the others)."""
        decided = self._decided.get(record.queue_id) if self._decided else None
        if not self.delivers and not decided:
            return None
        results = {}
        if decided:
            for index, _ in items:
                if index in decided:
                    results[index] = decided.pop(index)
            if not decided:
                del self._decided[record.queue_id]
        waiting = [(index, r) for index, r in items if index not in results]
        if self.delivers and waiting:
            ctx = self._context(record, [r.address for _, r in items], destination)
            ctx.message = self._message(record)
            for index, recipient in waiting:
                ctx.recipient = recipient.address
                verdict = self._verdict(record, recipient.address,
                                        self.plugins.run(DELIVERY, ctx), DELIVERY)
                if verdict is not None:
                    results[index] = verdict
        return results or None

    # ---- helpers ------------------------------------------------------------------------

    def _context(self, record, recipients, destination):
        envelope = record.envelope
        return Context(client_address=envelope.client_address, helo=envelope.client_helo,
                       auth_user=envelope.auth_user, local=envelope.protocol == "local",
                       hostname=self.hostname, resolver=self.resolver,
                       queue_id=record.queue_id, sender=envelope.sender,
                       recipients=recipients, nexthop=nexthop_of(destination))

    def _message(self, record):
        """The content as spooled, for delivery-stage plugins; None if it cannot be read
        (the transport will meet the same problem and say so)."""
        try:
            with self.store.open_content(record.queue_id) as file:
                return Message(file.read())
        except (OSError, ValueError) as error:
            log.warning("%s: delivery-stage plugins see no content: %s", record.queue_id,
                        error)
            return None

    def _verdict(self, record, address, outcome, stage):
        """(status, reply, relay) for a plugin's decision on one recipient, or None."""
        if outcome.reply is not None:
            status = BOUNCED if outcome.action == REJECT else RCPT_DEFERRED
            reply = "%d %s %s" % outcome.reply
            word = "rejected" if outcome.action == REJECT else "deferred"
            who = outcome.decided_by
        elif outcome.discard:
            status, reply, word, who = (SENT, "250 2.0.0 discarded by %s"
                                        % outcome.decided_by, "discarded",
                                        outcome.decided_by)
        elif outcome.quarantine:
            status, who, word = RCPT_DEFERRED, outcome.quarantined_by, "deferred"
            reply = "451 4.7.0 held back by %s: %s" % (who, outcome.quarantine)
        else:
            return None
        log.info("%s: to=<%s>: %s by plugin %s at %s stage: %s", record.queue_id, address,
                 word, who, stage, reply)
        return status, reply, NO_RELAY


def _index_of(recipients, recipient):
    """The index of recipient in the envelope: the same object, else the first with its
    address."""
    for index, candidate in enumerate(recipients):
        if candidate is recipient:
            return index
    for index, candidate in enumerate(recipients):
        if candidate.address == recipient.address:
            return index
    return None

