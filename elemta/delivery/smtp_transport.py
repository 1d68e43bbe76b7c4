"""SMTP delivery of one group of recipients (Postfix's smtp): the next hop's hosts in
order, one transaction per message, the connection parked for reuse.

Owned by the delivery worker (`elemta: delivery`), which calls deliver() once per
destination of a message, in its own greenlet, inside the destination's concurrency limit.
A transport returns {recipient index: (status, reply text, relay[, dsn_passed[, reason]])};
status is SENT, BOUNCED or RCPT_DEFERRED (elemta.queue.model); dsn_passed (SMTP only) says
the next hop took the DSN request on, so no success notice is ours to send (None: no
session said); reason (SMTP and LMTP) is why, as an elemta.delivery.deferrals word, for
the deferrals metric. The LMTP and local transports
(elemta.delivery.lmtp, elemta.delivery.local_transport) answer the same way; LMTP shares
this one's host loop (deliver_to).

MTA-STS (RFC 8461, elemta.delivery.mtasts): for mail routed by MX to a domain that
publishes a policy in enforce or testing mode (delivery.mta_sts, or a tls_policy entry of
level mta-sts), the MX hosts the policy does not name are skipped and the others must
offer STARTTLS with a certificate valid for their name (level secure, against
delivery.mta_sts_ca_file); in enforce mode a failure defers the mail (4.7.5, the policy
named), in testing mode it is logged and the mail goes as without the policy.

DANE (RFC 7672, elemta.delivery.dane): for mail to a destination under DANE
(delivery.dane, or a tls_policy entry of level dane or dane-only), each host's TLS is
decided when it is connected to (DANEDelivery.connect): authenticated by its TLSA records,
encrypted only, given up, or, where DANE does not apply, as without it (MTA-STS included:
DANE wins over it for hosts it applies to, RFC 8461 2).

REQUIRETLS (RFC 8689, elemta.delivery.requiretls): a message that asks for it goes only
over sessions at level secure (against delivery.tls_ca_file, or under the domain's
MTA-STS policy) or authenticated by DANE (a host with usable TLSA records: RFC 8689 4.2.1
takes either) to servers that offer REQUIRETLS; where no host will do, it bounces
(4.2.1) with 5.7.30 (REQUIRETLS not offered) or 5.7.10 (TLS not had or not verified).
Routed by MX, it also needs MX host names it can trust (4.2.1): a DNSSEC-validated MX
answer or the domain's MTA-STS policy in enforce mode (testing mode vouches for nothing),
else it bounces with 5.7.10 before any connection, or is deferred (4.7.10) while the
policy cannot be found out (its TXT lookup or fetch failed); a bracketed relay host or
transport next hop is verified by the name the admin configured. A message whose header
says "TLS-Required: No" is delivered without the domain's MTA-STS policy.

TLS-RPT (RFC 8460, elemta.tlsrpt, when tlsrpt.enabled): each new session under an
MTA-STS policy or DANE TLSA records counts as a success or as a failure of the RFC's
result type (SessionError.tls_result; an MX host the policy does not name is a
validation-failure, a policy that cannot be fetched counts in elemta.delivery.mtasts);
parked sessions reused are not new sessions and count nothing.

SMTP AUTH to a next hop with credentials in delivery.sasl_password_file (elemta.delivery.sasl,
looked up by the next hop as written: "[host]:port" or "host:port"); a file that cannot be
used is logged as an error and defers the mail, never sends it unauthenticated.
See also: elemta.delivery.worker, elemta.delivery.smtp_client, elemta.delivery.connections.
"""

import logging
import os
import time

from elemta import metrics
from elemta.addressing.normal import normal_domain
from elemta.addressing.resolve import domain_entry
from elemta.delivery import deferrals
from elemta.delivery.connections import ConnectionCache
from elemta.delivery.dane import DANE_MODE, DANELookup, reported_policy
from elemta.delivery.dane import MODES as DANE_MODES
from elemta.delivery.mtasts import ENFORCE, MTASTS, NONE, PolicyCache, PolicyFetcher
from elemta.delivery.mx import RouteError
from elemta.delivery.requiretls import RequireTLSSessions, requires_tls, waives_tls_policy
from elemta.delivery.routing import hosts_for
from elemta.delivery.sasl import SASLFileError, SASLPasswords, nexthop_key
from elemta.delivery.smtp_client import (DELIVERED, PERMANENT, TLS_DANE, TLS_ENCRYPT,
                                         TLS_SECURE, SessionError, SMTPClient, Timeouts,
                                         TLSPolicy, outcome_of)
from elemta.delivery.wire import local_reply
from elemta.queue.model import BOUNCED, RCPT_DEFERRED, SENT
from elemta.tlsrpt import results
from elemta.tlsrpt.counter import NullCounter

log = logging.getLogger("elemta.delivery")

# The tls_policy level that hands a domain to MTA-STS, and the cache's place in the spool.
MTA_STS_LEVEL = "mta-sts"
MTA_STS_DIRECTORY = "mta-sts"


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

    def __init__(self, config, store, resolver, counter=None):
        self.hostname = config.hostname
        # TLS-RPT (RFC 8460): sessions under MTA-STS and DANE counted, when enabled.
        self.counter = counter if counter is not None else NullCounter()
        self.store = store
        self.resolver = resolver
        self.timeouts = client_timeouts(config.delivery)
        delivery = config.delivery
        self.tls_ca_file = delivery.tls_ca_file
        self.tls = TLSPolicy(delivery.tls_level, ca_file=self.tls_ca_file)
        self.requiretls_tls = TLSPolicy(TLS_SECURE, ca_file=self.tls_ca_file)
        self.level_by_destination = {normal_domain(entry.domain): entry.level
                                     for entry in delivery.tls_policy}
        self.mta_sts_default = delivery.mta_sts
        self.mta_sts_tls = TLSPolicy(TLS_SECURE, ca_file=delivery.mta_sts_ca_file)
        self.mta_sts = None
        if resolver is not None:
            cache = PolicyCache(os.path.join(config.queue.spool_dir, MTA_STS_DIRECTORY))
            fetcher = PolicyFetcher(resolver, delivery.mta_sts_ca_file,
                                    delivery.mta_sts_port, delivery.mta_sts_timeout)
            self.mta_sts = MTASTS(resolver, cache, fetcher, counter=counter)
        self.dane_default = delivery.dane
        self.dane = DANELookup(resolver) if resolver is not None else None
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
        Returns {index: (status, reply, relay[, dsn_passed, reason])}."""
        credentials = None
        if self.sasl is not None:
            try:
                credentials = self.sasl.lookup(nexthop_key(
                    destination.host, destination.port, destination.mx_lookup, self.mx_port))
            except SASLFileError as error:
                log.error("%s: %s", record.queue_id, error)
                reply = "451 4.3.0 SASL password lookup failed: %s" % error
                return {index: (RCPT_DEFERRED, reply, "none", None, deferrals.LOOKUP)
                        for index, _ in items}
        try:
            hosts = hosts_for(destination, self.resolver)
        except RouteError as error:
            reply = "%d %s %s" % (error.code, error.status, error.reason)
            status = BOUNCED if error.permanent else RCPT_DEFERRED
            return {index: (status, reply, "none", None, deferrals.DNS) for index, _ in items}
        requiretls = requires_tls(record.envelope)
        tls = self.requiretls_tls if requiretls else self.tls_for(destination)
        level, connect = tls.level, None
        policy, unknown = self.mta_sts_policy(destination, requiretls)
        if requiretls:
            refusal = self.untrusted_mx(destination, hosts, policy, unknown)
            if refusal is not None:
                log.warning("%s: %s", record.queue_id, refusal.text)
                status = BOUNCED if refusal.permanent else RCPT_DEFERRED
                return {index: (status, str(refusal), "none", None, deferrals.POLICY)
                        for index, _ in items}
        if policy is not None and not requiretls and self._waived(record.queue_id):
            log.info("%s: TLS-Required: No: the MTA-STS policy of %s is not applied "
                     "(RFC 8689)", record.queue_id, policy.domain)
            policy = None
        if policy is not None:
            sts = STSDelivery(record.queue_id, policy, tls, self.counter)
            hosts, refusal = sts.allowed(hosts)
            if refusal is not None:
                log.warning("%s: %s", record.queue_id, refusal.text)
                return {index: (RCPT_DEFERRED, str(refusal), "none", None, deferrals.POLICY)
                        for index, _ in items}
            tls, level, connect = self.mta_sts_tls, "mta-sts " + policy.mode, sts.connect
        mode = self.dane_mode(destination)
        if mode is not None:
            dane = DANEDelivery(record.queue_id, self.dane, mode, hosts, connect,
                                self.counter)
            level, connect = "%s, else %s" % (mode, level), dane.connect
        if requiretls:
            # Its own sessions: a parked one was not checked for REQUIRETLS.
            connect = RequireTLSSessions(record.queue_id, connect).connect
            level = "requiretls " + level
        targets = [(host.address, destination.port, host.name) for host in hosts]
        return self.deliver_to(record, items, targets, lambda tls=tls: SMTPClient(
            self.hostname, timeouts=self.timeouts, tls=tls, credentials=credentials,
            sasl_require_tls=self.sasl_require_tls),
            profile=(level, credentials[0] if credentials else None), connect=connect)

    def tls_for(self, destination):
        """The STARTTLS policy for a destination: delivery.tls_policy's entry for its
        domain or next-hop host, else delivery.tls_level (also for an mta-sts entry: what
        applies where the domain publishes no policy)."""
        level = domain_entry(self.level_by_destination, normal_domain(destination.host))
        if level is None or level == MTA_STS_LEVEL or level in DANE_MODES:
            return self.tls
        return TLSPolicy(level, ca_file=self.tls_ca_file)

    def _waived(self, queue_id):
        """True when the message's header says TLS-Required: No (RFC 8689 3)."""
        with self.store.open_content(queue_id) as content:
            return waives_tls_policy(content)

    def dane_mode(self, destination):
        """dane or dane-only when DANE applies to destination (its tls_policy entry, else
        delivery.dane), else None."""
        if self.dane is None:
            return None
        level = domain_entry(self.level_by_destination, normal_domain(destination.host))
        if level in DANE_MODES:
            return level
        return DANE_MODE if level is None and self.dane_default else None

    def mta_sts_policy(self, destination, requiretls=False):
        """(policy, unknown): the MTA-STS policy (enforce or testing) for mail routed by
        MX to destination's domain, or None: no MX routing, MTA-STS not asked for, no
        policy in force; unknown says why none could be found out (a failed TXT lookup or
        fetch), else None. Mail with REQUIRETLS always asks: the policy may be what
        vouches for its MX hosts."""
        if self.mta_sts is None or not destination.mx_lookup:
            return None, None
        domain = normal_domain(destination.host)
        level = domain_entry(self.level_by_destination, domain)
        if not (requiretls or level == MTA_STS_LEVEL
                or (level is None and self.mta_sts_default)):
            return None, None
        found = self.mta_sts.lookup(domain)
        if found.policy is not None and found.policy.mode == NONE:
            return None, None
        return found.policy, found.unknown

    def untrusted_mx(self, destination, hosts, policy, unknown=None):
        """None when the MX host names of a REQUIRETLS delivery can be trusted, else the
        reply that bounces it, or defers it when the domain's MTA-STS policy could not be
        found out (unknown: a passing DNS or HTTPS failure must not bounce). RFC 8689
        4.2.1: the MX lookup must be DNSSEC-validated, or the MX hosts must match the
        domain's MTA-STS policy in enforce mode (STSDelivery then skips those it does not
        name; testing mode only reports, so it vouches for nothing); PKIX against a name a
        spoofed answer gave proves nothing. A next hop the admin configured in brackets
        (relay host, transport map) is no MX lookup: its configured name is what is
        verified."""
        if not destination.mx_lookup:
            return None
        if hosts and all(host.mx_secure for host in hosts):
            return None
        if policy is not None and policy.mode == ENFORCE:
            return None
        if policy is None and unknown is not None:
            return local_reply(451, "4.7.10", "REQUIRETLS: the MX lookup of %s was not "
                               "DNSSEC-validated and %s, so its MX host names cannot be "
                               "trusted yet (RFC 8689 4.2.1)" % (destination.host, unknown))
        dnssec = self.resolver is not None and self.resolver.transport.dnssec
        why = ("the MX lookup of %s was not DNSSEC-validated%s and the domain has no "
               "MTA-STS policy in enforce mode%s, so its MX host names cannot be trusted "
               "(RFC 8689 4.2.1)" % (
                   destination.host, "" if dnssec else
                   " (DNSSEC lookups are off: see delivery.dane)",
                   "" if policy is None else " (its policy is in %s mode)" % policy.mode))
        return local_reply(550, "5.7.10", "REQUIRETLS support required: %s" % why)

    def deliver_to(self, record, items, targets, new_client, profile=None, connect=None):
        """Try targets [(address, port, server name)] in order until one takes the message
        (a parked connection first, else new_client() connected); the next one only after a
        failure of the session before the message was handed over. profile names what the
        session was opened with (TLS level, SASL user): a parked connection is reused
        only for the same, so a "may" session never carries mail that requires
        "verify", nor one authenticated as one user another's mail. connect(client,
        address, port, name, new_client), when given, opens the session instead of
        client.connect and returns the client to use (STSDelivery.connect)."""
        outcome = {}
        last_reply, last_reason, relay = None, None, "none"
        for address, port, name in targets:
            started = time.monotonic()
            client = self.connections.take(address, port, (name, profile))
            if client is None:
                client = new_client()
                try:
                    if connect is None:
                        client.connect(address, port, server_name=name)
                    else:
                        client = connect(client, address, port, name, new_client)
                except SessionError as error:
                    if error.tls_failure:
                        metrics.DELIVERY_TLS_FAILURES.labels(self.kind).inc()
                    # A connect hook may have given up before any client connected.
                    last_reply, last_reason = error.reply, error.reason
                    relay = client.peer or "%s[%s]:%d" % (name, address, port)
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
                                  result.dsn_passed, item.reason)
            if not result.try_next_host:
                return outcome
            last_reply = None
        if last_reply is not None:
            status = BOUNCED if outcome_of(last_reply) == PERMANENT else RCPT_DEFERRED
            text = str(last_reply)
            return {index: (status, text, relay, None, last_reason) for index, _ in items}
        return outcome


class STSDelivery:
    """One delivery under a domain's MTA-STS policy in enforce or testing mode (RFC 8461
    4.2): which MX hosts it may use, and each session's TLS checked. fallback_tls is
    what the session uses in testing mode when the check fails. counter: where the
    sessions' results are counted for TLS-RPT (a TLSCounter or NullCounter)."""

    def __init__(self, queue_id, policy, fallback_tls, counter):
        self.queue_id = queue_id
        self.policy = policy
        self.fallback_tls = fallback_tls
        self.counter = counter
        self.reported = policy.reported()

    def where(self):
        return "MTA-STS policy of %s (%s)" % (self.policy.domain, self.policy.mode)

    def allowed(self, hosts):
        """(the hosts to try, None), or ([], the reply that defers the mail) when the
        policy is enforced and names none of them."""
        misfits = sorted({host.name for host in hosts
                          if not self.policy.matches(host.name)})
        if not misfits:
            return hosts, None
        why = "MX host %s not named by the %s: mx %s" % (
            ", ".join(misfits), self.where(), ", ".join(self.policy.mx))
        for name in misfits:
            self.counter.failure(self.reported, results.VALIDATION_FAILURE, name,
                                 reason="MX host not named by the policy")
        if self.policy.mode != ENFORCE:
            log.warning("%s: %s; delivering anyway (testing mode)", self.queue_id, why)
            return hosts, None
        allowed = [host for host in hosts if self.policy.matches(host.name)]
        if not allowed:
            return [], local_reply(451, "4.7.5", why)
        log.warning("%s: %s; not used", self.queue_id, why)
        return allowed, None

    def connect(self, client, address, port, name, new_client):
        """client (made with the policy's TLS: level secure) connected, or in testing mode
        a fallback one when the TLS check fails. Raises SessionError."""
        try:
            client.connect(address, port, server_name=name)
        except SessionError as error:
            if not error.tls_failure:
                raise
            self.counter.failure(self.reported, error.tls_result or
                                 results.VALIDATION_FAILURE, name, address,
                                 error.reply.text)
            if self.policy.mode == ENFORCE:
                raise SessionError(local_reply(451, "4.7.5", "%s: %s" % (
                    self.where(), error.reply.text)), tls_failure=True,
                    tls_result=error.tls_result, reason=deferrals.POLICY)
            log.warning("%s: %s: %s; delivering without it (testing mode)", self.queue_id,
                        self.where(), error.reply.text)
            client = new_client(self.fallback_tls)
            client.connect(address, port, server_name=name)
            return client
        self.counter.success(self.reported)
        log.info("%s: %s: TLS with %s verified (%s)", self.queue_id, self.where(),
                 client.peer, client.tls_version)
        return client


class DANEDelivery:
    """One delivery under DANE (RFC 7672, elemta.delivery.dane) in mode dane or dane-only:
    each host's TLS decided by its TLSA records when it is connected to. fallback_connect
    (STSDelivery.connect, or None for a plain connect) is used where DANE does not apply.
    counter: where the sessions' results are counted for TLS-RPT."""

    def __init__(self, queue_id, lookup, mode, hosts, fallback_connect=None,
                 counter=None):
        self.queue_id = queue_id
        self.lookup = lookup
        self.mode = mode
        self.secure = {host.name: host.secure for host in hosts}
        self.fallback_connect = fallback_connect
        self.counter = counter if counter is not None else NullCounter()
        self._decided = {}       # (host name, port) -> HostTLS, once per delivery

    def connect(self, client, address, port, name, new_client):
        """A connected client for name at address: DANE-authenticated, encrypted only, or
        fallback_connect's. Raises SessionError (the host given up)."""
        key = (name, port)
        if key not in self._decided:
            self._decided[key] = self.lookup.tls_for(name, self.secure.get(name, False),
                                                     port, self.mode)
        host = self._decided[key]
        if host.refusal is not None:
            self.counter.failure(reported_policy(name), host.result, name, address,
                                 host.refusal)
            raise SessionError(local_reply(451, "4.7.5", "DANE: %s" % host.refusal),
                               reason=deferrals.POLICY)
        if host.encrypt:
            log.info("%s: DANE: %s: TLS required, certificate not checked (RFC 7672 2.2)",
                     self.queue_id, host.why)
            client = new_client(TLSPolicy(TLS_ENCRYPT))
        elif host.records:
            client = new_client(TLSPolicy(TLS_DANE, tlsa=host.records))
        else:
            log.debug("%s: DANE does not apply: %s", self.queue_id, host.why)
            if self.fallback_connect is not None:
                return self.fallback_connect(client, address, port, name, new_client)
            return client.connect(address, port, server_name=name)
        try:
            client.connect(address, port, server_name=name)
        except SessionError as error:
            if host.records and error.tls_failure:
                self.counter.failure(reported_policy(name, host.records), error.tls_result
                                     or results.VALIDATION_FAILURE, name, address,
                                     error.reply.text)
            raise
        if host.records:
            self.counter.success(reported_policy(name, host.records))
            log.info("%s: DANE: Verified TLS connection established to %s (%s, TLSA %s "
                     "matched)", self.queue_id, client.peer, client.tls_version,
                     client.tls_verified)
        return client
