"""One day's TLS-RPT reports sent: one message per policy domain, to the mailto: rua
of its _smtp._tls TXT record (RFC 8460 3), through the maildrop.

Shared (elemta.tlsrpt): the delivery workers call send_day once a day for the days
before today (whichever claims the day sends it), and `elemtactl tlsrpt send` whenever
the admin asks. Why the maildrop, not Queue.add as bounces are queued: both callers run
as the spool's owner (elemtactl drops root first, as for the queue commands), the
maildrop is a path either may write, and pickup gives the report what local mail gets
and a DSN does not: DKIM signing by the sender's domain (RFC 8460 5.3 asks reports be
signed), header checks, and its "uid=... from=<...>" log line.
A claimed day is not sent again by the daily run: a domain whose TXT lookup fails then
gets no report for it (the log says so; `elemtactl tlsrpt send --date` sends again).
The TXT records are asked of delivery.nameservers (elemta.plugins.resolver: gevent's
sockets, so a slow nameserver never stalls a delivery worker's other greenlets).
See also: elemta.tlsrpt.report (the message), elemta.queue.maildrop (the files).
"""

import time
from collections import OrderedDict

from elemta.plugins.resolver import Resolver, TemporaryDNSError
from elemta.queue import maildrop
from elemta.queue.model import Recipient
from elemta.tlsrpt.report import build_message, build_report, rua_addresses
from elemta.util.text import printable


def settings(config):
    """(organization, contact, sender, submitter) of config's reports."""
    tlsrpt = config.tlsrpt
    sender = tlsrpt.sender or "postmaster@%s" % config.origin
    return (tlsrpt.organization or config.origin, tlsrpt.contact or sender, sender,
            config.hostname)


def send_day(store, config, day, by, force=False, now=None, resolver=None):
    """Queue day's reports unless another process claimed the day (force: send anyway).
    Returns None when it was claimed already, else [(policy domain, what became of its
    report)]. OSError when the maildrop cannot be written."""
    now = time.time() if now is None else now
    if not store.claim(day, by, now, force):
        return None
    if resolver is None:
        delivery = config.delivery
        resolver = Resolver(list(delivery.nameservers) or None, port=delivery.dns_port,
                            timeout=delivery.dns_timeout)
    organization, contact, sender, submitter = settings(config)
    by_domain = OrderedDict()
    for entry in store.counts(day):
        by_domain.setdefault(entry["policy"]["policy-domain"], []).append(entry)
    outcome = []
    for domain, entries in sorted(by_domain.items()):
        try:
            records = [r.decode("utf-8", "replace")
                       for r in resolver.txt("_smtp._tls." + domain)]
        except TemporaryDNSError as error:
            outcome.append((domain, "not sent: TXT lookup of _smtp._tls.%s failed (%s)"
                            % (domain, error.reason)))
            continue
        recipients, why = rua_addresses(records)
        if not recipients:
            outcome.append((domain, "not sent: _smtp._tls.%s has %s" % (domain, why)))
            continue
        report = build_report(day, domain, entries, organization, contact, submitter)
        content = build_message(report, domain, submitter, sender, recipients, now)
        name = _drop(config.queue.spool_dir, content, sender, recipients)
        outcome.append((domain, "report %s for %s queued to %s (maildrop file %s)" % (
            report["report-id"], day, ", ".join(printable(r) for r in recipients), name)))
    if any("queued" in text for _, text in outcome):
        maildrop.notify(config.queue.spool_dir)
    return outcome


def _drop(spool_dir, content, sender, recipients):
    writer = maildrop.MaildropWriter(spool_dir)
    try:
        writer.write(content)
        return writer.finish(sender, [Recipient(address) for address in recipients])
    except BaseException:
        writer.abort()
        raise
