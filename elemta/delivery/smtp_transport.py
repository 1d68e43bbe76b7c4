"""SMTP delivery of one group of recipients (Postfix's smtp): the next hop's hosts in
order, one transaction per message, the connection parked for reuse.

Owned by the delivery worker (`elemta: delivery`), which calls deliver() once per
destination of a message, in its own greenlet, inside the destination's concurrency limit.
A transport returns {recipient index: (status, reply text, relay[, dsn_passed])}; status
is SENT, BOUNCED or RCPT_DEFERRED (elemta.queue.model); dsn_passed (SMTP only) says the
next hop took the DSN request on, so no success notice is ours to send. The LMTP and local transports
(elemta.delivery.lmtp, elemta.delivery.local_transport) answer the same way; LMTP shares
this one's host loop (deliver_to).

SMTP AUTH to a next hop with credentials in delivery.sasl_password_file (elemta.delivery.sasl,
looked up by the next hop as written: "[host]:port" or "host:port"); a file that cannot be
used is logged as an error and defers the mail, never sends it unauthenticated.
See also: elemta.delivery.worker, elemta.delivery.smtp_client, elemta.delivery.connections.
"""

import logging
import time

from elemta import metrics
from elemta.addressing.normal import normal_domain
from elemta.addressing.resolve import domain_entry
from elemta.delivery.connections import ConnectionCache
from elemta.delivery.mx import RouteError
from elemta.delivery.routing import hosts_for
from elemta.delivery.sasl import SASLFileError, SASLPasswords, nexthop_key
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

    kind = "smtp"             # its Destination.kind: the transport label of its metrics

    def __init__(self, config, store, resolver):
        self.hostname = config.hostname
        self.store = store
        self.resolver = resolver
        self.timeouts = client_timeouts(config.delivery)
        self.tls = TLSPolicy(config.delivery.tls_level)
        self.tls_by_destination = {normal_domain(entry.domain): TLSPolicy(entry.level)
                                   for entry in config.delivery.tls_policy}
        self.connections = ConnectionCache()
        self.mx_port = config.delivery.mx_port
        self.sasl_require_tls = config.delivery.sasl_require_tls
        self.sasl = None
        if config.delivery.sasl_password_file:
            self.sasl = SASLPasswords(config.delivery.sasl_password_file)

    def close(self):
        self.connections.close()

    def deliver(self, record, destination, items):
        """Deliver recipients [(index, Recipient)] sharing a destination.
        Returns {index: (status, reply, relay)}."""
        credentials = None
        if self.sasl is not None:
            try:
                credentials = self.sasl.lookup(nexthop_key(
                    destination.host, destination.port, destination.mx_lookup, self.mx_port))
            except SASLFileError as error:
                log.error("%s: %s", record.queue_id, error)
                reply = "451 4.3.0 SASL password lookup failed: %s" % error
                return {index: (RCPT_DEFERRED, reply, "none") for index, _ in items}
        try:
            hosts = hosts_for(destination, self.resolver)
        except RouteError as error:
            reply = "%d %s %s" % (error.code, error.status, error.reason)
            status = BOUNCED if error.permanent else RCPT_DEFERRED
            return {index: (status, reply, "none") for index, _ in items}
        targets = [(host.address, destination.port, host.name) for host in hosts]
        tls = self.tls_for(destination)
        return self.deliver_to(record, items, targets, lambda: SMTPClient(
            self.hostname, timeouts=self.timeouts, tls=tls, credentials=credentials,
            sasl_require_tls=self.sasl_require_tls),
            profile=(tls.level, credentials[0] if credentials else None))

    def tls_for(self, destination):
        """The STARTTLS policy for a destination: delivery.tls_policy's entry for its
        domain or next-hop host, else delivery.tls_level."""
        return domain_entry(self.tls_by_destination, normal_domain(destination.host),
                            self.tls)

    def deliver_to(self, record, items, targets, new_client, profile=None):
        """Try targets [(address, port, server name)] in order until one takes the message
        (a parked connection first, else new_client() connected); the next one only after a
        failure of the session before the message was handed over. profile names what the
        session was opened with (TLS level, SASL user): a parked connection is reused
        only for the same, so a "may" session never carries mail that requires
        "verify", nor one authenticated as one user another's mail."""
        outcome = {}
        last_reply, relay = None, "none"
        for address, port, name in targets:
            started = time.monotonic()
            client = self.connections.take(address, port, (name, profile))
            if client is None:
                client = new_client()
                try:
                    client.connect(address, port, server_name=name)
                except SessionError as error:
                    if error.tls_failure:
                        metrics.DELIVERY_TLS_FAILURES.labels(self.kind).inc()
                    last_reply, relay = error.reply, client.peer
                    log.info("%s: %s", record.queue_id, error.reply.text or error.reply)
                    if error.try_next_host:
                        continue
                    break
                tls = client.tls_version or "none"
                metrics.DELIVERY_SESSIONS.labels(self.kind, tls).inc()
            try:
                with self.store.open_content(record.queue_id) as content:
                    result = client.send(record.envelope, content,
                                         [recipient for _, recipient in items])
            except BaseException:
                client.close()
                raise
            self.connections.park(address, port, (name, profile), client)
            metrics.DELIVERY_ATTEMPT.observe(time.monotonic() - started)
            relay = client.peer
            for (index, _), item in zip(items, result.recipients):
                # The 4th item: whether the server took NOTIFY on (else a NOTIFY=SUCCESS
                # recipient gets a "relayed" notice from us).
                outcome[index] = (status_of(item.outcome), str(item.reply), relay,
                                  result.dsn_passed)
            if not result.try_next_host:
                return outcome
            last_reply = None
        if last_reply is not None:
            status = BOUNCED if outcome_of(last_reply) == PERMANENT else RCPT_DEFERRED
            text = str(last_reply)
            return {index: (status, text, relay) for index, _ in items}
        return outcome
