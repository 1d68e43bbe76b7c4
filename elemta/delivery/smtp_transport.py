"""SMTP delivery of one group of recipients (Postfix's smtp): the next hop's hosts in
order, one transaction per message, the connection parked for reuse.

Owned by the delivery worker (`elemta: delivery`), which calls deliver() once per
destination of a message, in its own greenlet, inside the destination's concurrency limit.
A transport returns {recipient index: (status, reply text, relay)}; status is SENT,
BOUNCED or RCPT_DEFERRED (elemta.queue.model). The LMTP and local transports
(elemta.delivery.lmtp, elemta.delivery.local_transport) answer the same way.
See also: elemta.delivery.worker, elemta.delivery.smtp_client, elemta.delivery.connections.
"""

import logging
import time

from elemta import metrics
from elemta.delivery.connections import ConnectionCache
from elemta.delivery.mx import RouteError
from elemta.delivery.routing import hosts_for
from elemta.delivery.smtp_client import (DELIVERED, PERMANENT, SessionError, SMTPClient,
                                         Timeouts, TLSPolicy, outcome_of)
from elemta.queue.model import BOUNCED, RCPT_DEFERRED, SENT

log = logging.getLogger("elemta.delivery")


def client_timeouts(delivery):
    """The client's RFC 5321 timeouts from the delivery config."""
    return Timeouts(
        connect=delivery.connect_timeout, greeting=delivery.command_timeout,
        helo=delivery.command_timeout, mail=delivery.command_timeout,
        rcpt=delivery.command_timeout, data=delivery.command_timeout,
        data_block=delivery.data_timeout, data_done=delivery.data_timeout,
        rset=min(20.0, delivery.command_timeout), quit=min(20.0, delivery.command_timeout))


def status_of(outcome):
    """A client outcome (DELIVERED, PERMANENT, ...) as a recipient status."""
    if outcome == DELIVERED:
        return SENT
    return BOUNCED if outcome == PERMANENT else RCPT_DEFERRED


class SMTPTransport:
    """Delivers over SMTP for one worker; holds its connection cache."""

    def __init__(self, config, store, resolver):
        self.hostname = config.hostname
        self.store = store
        self.resolver = resolver
        self.timeouts = client_timeouts(config.delivery)
        self.tls = TLSPolicy(config.delivery.tls_level)
        self.connections = ConnectionCache()

    def close(self):
        self.connections.close()

    def deliver(self, record, destination, items):
        """Deliver recipients [(index, Recipient)] sharing a destination.
        Returns {index: (status, reply, relay)}."""
        try:
            hosts = hosts_for(destination, self.resolver)
        except RouteError as error:
            reply = "%d %s %s" % (error.code, error.status, error.reason)
            status = BOUNCED if error.permanent else RCPT_DEFERRED
            return {index: (status, reply, "none") for index, _ in items}
        port = destination.port
        outcome = {}
        last_reply, relay = None, "none"
        for host in hosts:
            started = time.monotonic()
            client = self.connections.take(host.address, port, host.name)
            if client is None:
                client = SMTPClient(self.hostname, timeouts=self.timeouts, tls=self.tls)
                try:
                    client.connect(host.address, port, server_name=host.name)
                except SessionError as error:
                    last_reply, relay = error.reply, client.peer
                    log.info("%s: %s", record.queue_id, error.reply.text or error.reply)
                    if error.try_next_host:
                        continue
                    break
            try:
                with self.store.open_content(record.queue_id) as content:
                    result = client.send(record.envelope, content,
                                         [recipient for _, recipient in items])
            except BaseException:
                client.close()
                raise
            self.connections.park(host.address, port, host.name, client)
            metrics.DELIVERY_ATTEMPT.observe(time.monotonic() - started)
            relay = client.peer
            for (index, _), item in zip(items, result.recipients):
                outcome[index] = (status_of(item.outcome), str(item.reply), relay)
            if not result.try_next_host:
                return outcome
            last_reply = None
        if last_reply is not None:
            status = BOUNCED if outcome_of(last_reply) == PERMANENT else RCPT_DEFERRED
            text = str(last_reply)
            return {index: (status, text, relay) for index, _ in items}
        return outcome
