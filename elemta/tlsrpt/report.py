"""The TLS-RPT report (RFC 8460 section 4) and the mail that carries it (section 5.3).

Shared (elemta.tlsrpt): elemta.tlsrpt.send builds one per policy domain and day from
elemta.tlsrpt.store's counts; tests read what it built.

    rua_uris(records)       the mailto: addresses and the https: URLs of a domain's one
                            "v=TLSRPTv1" TXT record (section 3)
    report_gzip(report)     the report as the gzipped JSON both ways carry (5.3, 5.4)
    build_report(...)       the JSON object: organization-name, date-range, contact-info,
                            report-id, policies[] (policy, summary, failure-details)
    build_message(...)      a multipart/report (report-type "tlsrpt") with a text part and
                            the gzipped JSON as an application/tlsrpt+gzip attachment,
                            Subject "Report Domain: D Submitter: S Report-ID: <ID>", the
                            TLS-Report-Domain and TLS-Report-Submitter fields, and
                            "TLS-Required: No" (RFC 8689 3: a report about TLS trouble
                            must not be held up by the same trouble, RFC 8460 5.3)
"""

import calendar
import email.policy
import email.utils
import gzip
import json
import time
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from urllib.parse import unquote, urlsplit

from elemta.smtp.address import AddressError, validate_mailbox
from elemta.util.text import printable

MEDIA_TYPE = "application/tlsrpt+gzip"
VERSION = "v=TLSRPTv1"


# An https: rua longer than this is not worth a connection.
MAX_URL_LENGTH = 2048


def rua_uris(records):
    """([mailto addresses], [https URLs], None), or ([], [], why there are none) for the
    TXT strings of _smtp._tls.<domain>: RFC 8460 3 wants exactly one record starting
    "v=TLSRPTv1;", whose rua lists mailto: and https: URIs."""
    ours = [r for r in records if r.replace(" ", "").startswith(VERSION + ";")]
    if len(ours) != 1:
        return [], [], "%d v=TLSRPTv1 records" % len(ours)
    fields = {}
    for item in ours[0].split(";"):
        key, _, value = item.strip().partition("=")
        fields.setdefault(key.strip(), value.strip())
    addresses, urls, others = [], [], []
    for uri in filter(None, (u.strip() for u in fields.get("rua", "").split(","))):
        scheme = uri.split(":", 1)[0].lower()
        if scheme == "https":
            why = https_url_problem(uri)
            if why is None:
                urls.append(uri)
            else:
                others.append("%s (%s)" % (uri, why))
            continue
        if scheme != "mailto":
            others.append(uri)
            continue
        address = unquote(uri[len("mailto:"):].split("?")[0])
        try:
            addresses.append(validate_mailbox(address))
        except AddressError as error:
            others.append("%s (%s)" % (uri, error))
    if addresses or urls:
        return addresses, urls, None
    return [], [], "no usable mailto: or https: rua%s" % (
        " (only %s)" % ", ".join(printable(o) for o in others) if others else "")


def https_url_problem(url):
    """Why url cannot be POSTed to (it comes from DNS: nothing but a host name or
    address, a port and a path), or None."""
    if len(url) > MAX_URL_LENGTH or any(c <= " " or c == "\x7f" for c in url):
        return "too long or with spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port                 # raises ValueError when it is not a number
    except ValueError as error:
        return str(error)
    if not parts.hostname or "@" in parts.netloc:
        return "no host, or a user name in it"
    return None


def report_gzip(report):
    """The report as application/tlsrpt+gzip content (RFC 8460 5.3 and 5.4)."""
    return gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)


def day_range(day):
    """(first second, last second) of a UTC day "YYYY-MM-DD", as Unix times."""
    start = calendar.timegm(time.strptime(day, "%Y-%m-%d"))
    return start, start + 86399


def _rfc3339(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def report_id(day, domain, submitter):
    """Stable for a day and domain: a report sent again (tlsrpt send --date) can be told
    for the same one (RFC 8460 4.4: unique; 5.3: the Report-ID is a msg-id)."""
    return "%s.%s@%s" % (day, domain, submitter)


def build_report(day, domain, entries, organization, contact, submitter):
    """The report (a dict) for domain's entries of day (elemta.tlsrpt.store.counts)."""
    start, end = day_range(day)
    policies = []
    for entry in entries:
        details = []
        for detail, count in sorted(entry["details"].items()):
            item = json.loads(detail)
            item["failed-session-count"] = count
            details.append(item)
        policies.append({
            "policy": entry["policy"],
            "summary": {"total-successful-session-count": entry["success"],
                        "total-failure-session-count": entry["failure"]},
            "failure-details": details})
    return {"organization-name": organization,
            "date-range": {"start-datetime": _rfc3339(start),
                           "end-datetime": _rfc3339(end)},
            "contact-info": contact,
            "report-id": report_id(day, domain, submitter),
            "policies": policies}


def build_message(report, domain, submitter, sender, recipients, now=None):
    """The report as a message (bytes, CRLF lines) from sender to recipients."""
    now = time.time() if now is None else now
    start, end = day_range(report["date-range"]["start-datetime"][:10])
    message = MIMEMultipart("report", report_type="tlsrpt")
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = email.utils.formatdate(now)
    message["Subject"] = "Report Domain: %s Submitter: %s Report-ID: <%s>" % (
        domain, submitter, report["report-id"])
    message["Message-ID"] = "<%s>" % report["report-id"]
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message["TLS-Required"] = "No"
    message["Auto-Submitted"] = "auto-generated"
    totals = [(p["summary"]["total-successful-session-count"],
               p["summary"]["total-failure-session-count"]) for p in report["policies"]]
    message.attach(MIMEText(
        "This is an aggregate TLS report (RFC 8460) from %s for %s, covering %s to %s:\n"
        "%d successful and %d failed TLS sessions.\n" % (
            submitter, domain, report["date-range"]["start-datetime"],
            report["date-range"]["end-datetime"], sum(t[0] for t in totals),
            sum(t[1] for t in totals)), "plain", "us-ascii"))
    attachment = MIMEApplication(report_gzip(report), "tlsrpt+gzip")
    attachment.add_header("Content-Disposition", "attachment", filename="%s!%s!%d!%d!%s"
                          ".json.gz" % (submitter, domain, start, end,
                                        report["report-id"].split("@")[0]))
    message.attach(attachment)
    return message.as_bytes(policy=email.policy.SMTP)
