"""SPF (RFC 7208) for inbound mail: the HELO and MAIL FROM identities, checked with pyspf.

Owned by the smtpd worker (the `spf` built-in). At MAIL FROM it checks the HELO name and
the envelope sender (postmaster@HELO for the null sender, RFC 7208 2.4) against the
client address, records both results for Authentication-Results and DMARC, and at the data
stage adds the Received-SPF header (RFC 7208 9.1). With `enforce: true`, a "fail" is
refused with 550 5.7.23 and a "temperror" with 451 4.7.24 (RFC 7372); without it nothing
is refused. Mail from authenticated, mynetworks or local clients is not checked.

DNS: pyspf asks its module-level DNSLookup for every record. We point that at the plugin
resolver (elemta.plugins.resolver), which waits on gevent sockets, rather than running
pyspf in gevent's thread pool: a check makes up to ten lookups plus their answers, and a
pool of a few threads shared by thousands of sessions would queue them behind one slow
domain, while greenlets waiting on sockets cost nothing. pyspf itself only computes.
Which resolver a check uses is greenlet-local, so concurrent sessions do not mix.

    check_spf(resolver, "192.0.2.1", "alice@example.com", "mail.example.com")
        -> SPFResult(result="pass", identity="mailfrom", domain="example.com", ...)

See also: elemta.plugins.dmarc (uses the mailfrom result), tests/test_spf.py (the RFC 7208
test suite served by NSD).
"""

import ipaddress
import logging
from dataclasses import dataclass

import gevent.local
import spf as pyspf

from elemta import metrics
from elemta.plugins.api import MethodResult, Plugin, Result
from elemta.plugins.resolver import TemporaryDNSError
from elemta.plugins.settings import SPFSettings

log = logging.getLogger("elemta.plugins.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# RFC 7208 4.6.4: at least 20 seconds for the whole check.
QUERY_TIME = 20


@dataclass(frozen=True)
class SPFResult:
    result: str           # one of RESULTS
    identity: str         # "mailfrom" or "helo"
    domain: str           # the domain whose policy was checked
    sender: str           # the identity checked, as an address (postmaster@helo for helo)
    explanation: str = ""
    header: str = ""      # the Received-SPF field body, without the name


_current = gevent.local.local()


def _lookup(name, qtype, strict=True, timeout=None):
    """pyspf's DNSLookup: [((name, qtype), value)], as its dnspython driver returns."""
    resolver = getattr(_current, "resolver", None)
    if resolver is None:
        raise pyspf.TempError("DNS: no resolver for this check")
    rdtype = "TXT" if qtype == "SPF" else qtype
    try:
        answer = resolver.query(name, rdtype)
    except TemporaryDNSError as error:
        raise pyspf.TempError("DNS %s" % error.reason)
    out = []
    for record in answer.records:
        if qtype in ("A", "AAAA"):
            value = record.address
        elif qtype == "MX":
            value = (record.preference, record.exchange.to_text(omit_final_dot=True))
        elif qtype == "PTR":
            value = record.target.to_text(omit_final_dot=True)
        elif qtype in ("TXT", "SPF"):
            value = tuple(record.strings)
        else:
            continue
        out.append(((name, qtype), value))
    return out


pyspf.DNSLookup = _lookup


def check_spf(resolver, client_ip, sender, helo, receiver="unknown", identity=None):
    # type: (object, str, str, str, str, object) -> SPFResult
    """Check one identity: "mailfrom" (the default when sender is not empty) or "helo"."""
    if identity == "helo" or not sender:
        checked = "postmaster@%s" % helo if helo else ""
        identity = "helo" if identity == "helo" else "mailfrom"
    else:
        checked, identity = sender, "mailfrom"
    domain = checked.rpartition("@")[2]
    if not domain or not _is_fqdn(domain):
        # RFC 7208 4.3: a malformed domain or an address literal gives "none".
        return SPFResult("none", identity, domain, checked, "no valid domain to check")
    _current.resolver = resolver
    try:
        query = pyspf.query(i=client_ip, s=checked, h=helo or domain, receiver=receiver,
                            querytime=QUERY_TIME)
        if identity == "helo":
            query.ident = "helo"
        result, _code, explanation = query.check()
        result = {"unknown": "permerror", "error": "temperror"}.get(result, result)
        header = query.get_header(result, receiver=receiver)
    except pyspf.TempError as error:
        return SPFResult("temperror", identity, domain, checked, str(error))
    except pyspf.PermError as error:
        return SPFResult("permerror", identity, domain, checked, str(error))
    finally:
        _current.resolver = None
    if result not in RESULTS:
        result = "permerror"
    # A Received-SPF value is one header line: fold nothing, drop what cannot be sent.
    header = "".join(ch if " " <= ch <= "~" else "?" for ch in header)
    return SPFResult(result, identity, domain, checked, explanation or "", header)


def _is_fqdn(domain):
    if domain.startswith("[") or "." not in domain.strip("."):
        return False
    try:
        ipaddress.ip_address(domain)
        return False
    except ValueError:
        return True


class SPFPlugin(Plugin):
    name = "spf"
    Settings = SPFSettings
    order = 10
    default_timeout = 30.0       # RFC 7208's 20 s per check, for two identities

    def init(self, settings):
        self.settings = settings or SPFSettings()

    def on_mail(self, ctx):
        if ctx.checked_elsewhere or not ctx.client_address or ctx.resolver is None:
            return None
        results = []
        if self.settings.check_helo and ctx.helo:
            cached = ctx.session.get("spf_helo")
            if cached is None or cached[0] != (ctx.helo, ctx.client_address):
                helo_result = check_spf(ctx.resolver, ctx.client_address, "", ctx.helo,
                                        ctx.hostname, identity="helo")
                ctx.session["spf_helo"] = ((ctx.helo, ctx.client_address), helo_result)
            results.append(ctx.session["spf_helo"][1])
        # The null sender is checked as postmaster@HELO (RFC 7208 2.4).
        results.append(check_spf(ctx.resolver, ctx.client_address, ctx.sender or "",
                                 ctx.helo, ctx.hostname))
        mailfrom = results[-1]
        ctx.state["spf"] = mailfrom
        # The MAIL FROM identity only: one count per transaction, the result DMARC uses.
        metrics.count_email_authentication("spf", mailfrom.result)
        for checked in results:
            prop = ("smtp.helo", ctx.helo) if checked.identity == "helo" else (
                "smtp.mailfrom", checked.sender)
            ctx.auth_results.append(MethodResult("spf", checked.result, properties=(prop,)))
            if checked.result in ("temperror", "permerror"):
                log.info("%s: SPF %s for %s=%s from [%s]: %s", ctx.queue_id or "NOQUEUE",
                         checked.result, checked.identity, checked.sender,
                         ctx.client_address, checked.explanation)
        if not self.settings.enforce:
            return None
        for checked in results:
            if checked.result == "fail":
                text = "SPF: %s is not allowed to send mail from %s" % (
                    ctx.client_address, checked.domain)
                if checked.explanation:
                    text += ": " + checked.explanation
                return Result.reject(550, "5.7.23", text)
        for checked in results:
            if checked.result == "temperror":
                return Result.tempfail(451, "4.7.24", "SPF: temporary DNS error for %s, "
                                       "try again later" % checked.domain)
        return None

    def on_data(self, ctx):
        checked = ctx.state.get("spf")
        if checked is None or not self.settings.received_spf or not checked.header:
            return None
        return Result.proceed(headers=[("Received-SPF", checked.header)])
