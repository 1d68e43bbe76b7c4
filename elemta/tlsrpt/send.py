"""One day's TLS-RPT reports sent: per policy domain, one message to the mailto: rua
of its _smtp._tls TXT record (RFC 8460 3), through the maildrop, and one POST to each
https: rua (5.4, elemta.tlsrpt.post).

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
A POST that fails is logged and noted in the count store; retry_posts, at each of the
delivery workers' report runs, posts it again (the report rebuilt from the day's
counts) until it is taken, MAX_POST_ATTEMPTS have failed, or the day is pruned.
See also: elemta.tlsrpt.report (the message), elemta.queue.maildrop (the files),
elemta.tlsrpt.post.
"""

import time
from collections import OrderedDict

from elemta.plugins.resolver import Resolver, TemporaryDNSError
from elemta.queue import maildrop
from elemta.queue.model import Recipient
from elemta.tlsrpt.post import PostError, PostRefused, post_report
from elemta.tlsrpt.report import build_message, build_report, report_gzip, rua_uris
from elemta.util.text import printable

# Runs of the daily report check (about every 10 minutes) an https: rua gets for one
# report before it is given up.
MAX_POST_ATTEMPTS = 6


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
    resolver = resolver or resolver_for(config)
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
        recipients, urls, why = rua_uris(records)
        if why is not None:
            outcome.append((domain, "not sent: _smtp._tls.%s has %s" % (domain, why)))
            continue
        report = build_report(day, domain, entries, organization, contact, submitter)
        if recipients:
            content = build_message(report, domain, submitter, sender, recipients, now)
            name = _drop(config.queue.spool_dir, content, sender, recipients)
            outcome.append((domain, "report %s for %s queued to %s (maildrop file %s)" % (
                report["report-id"], day, ", ".join(printable(r) for r in recipients),
                name)))
        for url in urls:
            outcome.append((domain, _post(store, config, resolver, day, domain, url,
                                          report)))
    if any("queued" in text for _, text in outcome):
        maildrop.notify(config.queue.spool_dir)
    return outcome


def retry_posts(store, config, now=None, resolver=None):
    """Post again the reports https: ruas did not take on earlier runs; returns
    [(policy domain, what became of each)]."""
    outcome = []
    pending = store.pending_posts()
    if not pending:
        return outcome
    resolver = resolver or resolver_for(config)
    organization, contact, _, submitter = settings(config)
    for day, post in pending:
        domain, url = post["domain"], post["url"]
        entries = [e for e in store.counts(day) if e["policy"]["policy-domain"] == domain]
        if not entries:                 # pruned meanwhile: nothing left to report
            store.post_done(day, domain, url)
            continue
        report = build_report(day, domain, entries, organization, contact, submitter)
        outcome.append((domain, _post(store, config, resolver, day, domain, url, report)))
    return outcome


def _post(store, config, resolver, day, domain, url, report):
    """POST report to url; what became of it (a failure noted for retry_posts)."""
    try:
        status = post_report(url, report_gzip(report), resolver,
                             ca_file=config.tlsrpt.https_ca_file,
                             timeout=config.tlsrpt.https_timeout,
                             allow_private=config.tlsrpt.https_allow_private)
    except PostRefused as error:
        store.post_done(day, domain, url)       # no use trying again
        return "report %s for %s not posted to %s: %s" % (
            report["report-id"], day, printable(url), error)
    except PostError as error:
        attempts = store.post_failed(day, domain, url, str(error))
        if attempts >= MAX_POST_ATTEMPTS:
            store.post_done(day, domain, url)
            return "report %s for %s not posted to %s: %s; given up after %d attempts" % (
                report["report-id"], day, printable(url), error, attempts)
        return "report %s for %s not posted to %s: %s; attempt %d of %d, the next on " \
               "the next run" % (report["report-id"], day, printable(url), error,
                                 attempts, MAX_POST_ATTEMPTS)
    store.post_done(day, domain, url)
    return "report %s for %s posted to %s (%s)" % (report["report-id"], day,
                                                    printable(url), status)


def resolver_for(config):
    """A resolver asking delivery.nameservers, as the delivery does."""
    delivery = config.delivery
    return Resolver(list(delivery.nameservers) or None, port=delivery.dns_port,
                    timeout=delivery.dns_timeout)


def _drop(spool_dir, content, sender, recipients):
    writer = maildrop.MaildropWriter(spool_dir)
    try:
        writer.write(content)
        return writer.finish(sender, [Recipient(address) for address in recipients])
    except BaseException:
        writer.abort()
        raise
