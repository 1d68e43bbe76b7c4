"""DMARC (RFC 7489): policy discovery, identifier alignment and the policy's disposition.

Owned by the smtpd worker (the `dmarc` built-in, data stage, after spf and dkim). For the
one RFC5322.From domain it finds the policy at _dmarc.<From domain>, else at _dmarc.<its
organizational domain>; the organizational domain comes from the Public Suffix List that
the publicsuffixlist package ships (checkdmarc.utils.get_base_domain: no download at run
time). The TXT records are fetched through the plugin resolver (gevent sockets) and the
record is checked by checkdmarc's parser; checkdmarc's own lookups are not used because
they block the event loop.

DMARC passes when SPF passed for an aligned MAIL FROM domain or a DKIM signature passed
for an aligned d= (relaxed: same organizational domain; strict: same domain). On failure
the disposition is p= (sp= for a subdomain), applied to pct= percent of messages, the rest
one step milder (RFC 7489 6.6.4). With `enforce: true`, reject gives 550 5.7.1 and
quarantine holds the message in the queue; mail from our own users is never checked.

See also: elemta.plugins.spf, elemta.plugins.dkim, tests/test_dmarc.py.
"""

import email.utils
import logging
import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import checkdmarc.dmarc
from checkdmarc.utils import get_base_domain

from elemta import metrics
from elemta.plugins.api import MethodResult, Plugin, Result
from elemta.plugins.resolver import TemporaryDNSError
from elemta.plugins.settings import DMARCSettings

log = logging.getLogger("elemta.plugins.dmarc")

DISPOSITIONS = ("none", "quarantine", "reject")
# RFC 7489 6.6.4: when pct= leaves a message out, apply the next milder policy.
MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


class PolicyError(ValueError):
    """The published record is not valid DMARC; str() says why (a permerror)."""


@dataclass(frozen=True)
class Policy:
    domain: str            # where the record was found (From domain or organizational)
    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    record: str = ""


@dataclass(frozen=True)
class DMARCResult:
    result: str                      # pass, fail, none, temperror, permerror
    from_domain: str = ""
    disposition: str = "none"        # what the policy asks for this message
    policy: Optional[Policy] = None
    reason: str = ""

    def method_result(self):
        props = (("header.from", self.from_domain),) if self.from_domain else ()
        reason = self.reason if self.result != "pass" else ""
        return MethodResult("dmarc", self.result, reason, props)


def organizational_domain(domain):
    """RFC 7489 3.2: the public suffix plus one label, from the shipped suffix list."""
    domain = domain.lower().rstrip(".")
    return get_base_domain(domain) or domain


def aligned(identifier, from_domain, mode):
    identifier = identifier.lower().rstrip(".")
    from_domain = from_domain.lower().rstrip(".")
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


def parse_policy(record, domain):
    # type: (str, str) -> Policy
    """A Policy from a record's text; PolicyError when checkdmarc finds it invalid."""
    # Report addresses are not needed to decide, and checkdmarc would verify them by DNS.
    text = ";".join(part for part in record.split(";")
                    if part.strip().lower()[:3] not in ("rua", "ruf"))
    try:
        tags = checkdmarc.dmarc.parse_dmarc_record(text, domain)["tags"]
    except Exception as error:   # checkdmarc has a dozen error classes, all "invalid"
        raise PolicyError(str(error).splitlines()[0] if str(error) else type(error).__name__)
    p = tags.get("p", {}).get("value")
    if p not in DISPOSITIONS:
        raise PolicyError("no valid p= tag")
    sp = tags.get("sp", {}).get("value", p) if tags.get("sp", {}).get("explicit") else p
    pct = 100
    match = re.search(r"(?:^|;)\s*pct\s*=\s*([^;\s]*)", record, re.I)
    if match:
        if not match.group(1).isdigit() or int(match.group(1)) > 100:
            raise PolicyError("pct=%s is not a percentage" % match.group(1))
        pct = int(match.group(1))
    return Policy(domain, p, sp, pct, tags.get("adkim", {}).get("value", "r"),
                  tags.get("aspf", {}).get("value", "r"), record)


def find_policy(resolver, from_domain):
    # type: (object, str) -> Optional[Policy]
    """The policy for from_domain, None if there is none. Raises TemporaryDNSError,
    PolicyError."""
    from_domain = from_domain.lower().rstrip(".")
    candidates = [from_domain]
    org = organizational_domain(from_domain)
    if org != from_domain:
        candidates.append(org)
    for domain in candidates:
        records = [r.decode("utf-8", "replace") for r in resolver.txt("_dmarc." + domain)]
        records = [r for r in records if re.match(r"^v\s*=\s*DMARC1\s*(;|$)", r)]
        if len(records) > 1:
            # RFC 7489 6.6.3: several records mean no DMARC for this domain.
            raise PolicyError("%d DMARC records at _dmarc.%s" % (len(records), domain))
        if records:
            return parse_policy(records[0], domain)
    return None


def evaluate(policy, from_domain, spf_result=None, spf_domain="", dkim_results=(),
             sample=None):
    # type: (Policy, str, Optional[str], str, Sequence, Optional[float]) -> DMARCResult
    """Apply a policy. spf_result/spf_domain: the MAIL FROM (or HELO for <>) check;
    dkim_results: objects with .result and .domain. sample: 0 <= x < 1 for pct (random
    when None)."""
    if spf_result == "pass" and spf_domain and aligned(spf_domain, from_domain, policy.aspf):
        return DMARCResult("pass", from_domain, policy=policy)
    for signature in dkim_results:
        if signature.result == "pass" and signature.domain and aligned(
                signature.domain, from_domain, policy.adkim):
            return DMARCResult("pass", from_domain, policy=policy)
    requested = policy.p if from_domain.lower().rstrip(".") == policy.domain else policy.sp
    sample = random.random() if sample is None else sample
    disposition = requested if sample * 100 < policy.pct else MILDER[requested]
    reason = "no aligned SPF or DKIM pass; policy of %s is p=%s" % (policy.domain, requested)
    if disposition != requested:
        reason += ", pct=%d sampled out to %s" % (policy.pct, disposition)
    return DMARCResult("fail", from_domain, disposition, policy, reason)


def from_domain_of(message):
    """The From domain, or (None, why) when the message has not exactly one address."""
    values = message.get_all("From")
    if len(values) != 1:
        return None, "message has %d From fields" % len(values)
    addresses = [a for _, a in email.utils.getaddresses([values[0]]) if a]
    if len(addresses) != 1:
        return None, "From has %d addresses" % len(addresses)
    domain = addresses[0].rpartition("@")[2].strip().lower().rstrip(".")
    if not domain or not re.match(r"^[a-z0-9.-]+$", domain) or "." not in domain:
        return None, "From address has no usable domain"
    return domain, ""


class DMARCPlugin(Plugin):
    name = "dmarc"
    Settings = DMARCSettings
    order = 30

    def init(self, settings):
        self.settings = settings or DMARCSettings()

    def check(self, ctx):
        domain, why = from_domain_of(ctx.message)
        if domain is None:
            return DMARCResult("permerror", reason=why)
        try:
            policy = find_policy(ctx.resolver, domain)
        except TemporaryDNSError as error:
            return DMARCResult("temperror", domain, reason="policy lookup failed: %s"
                               % error.reason)
        except PolicyError as error:
            return DMARCResult("permerror", domain, reason="invalid policy: %s" % error)
        if policy is None:
            return DMARCResult("none", domain, reason="no policy published")
        spf = ctx.state.get("spf")
        return evaluate(policy, domain, getattr(spf, "result", None),
                        getattr(spf, "domain", ""), ctx.state.get("dkim", ()))

    def on_data(self, ctx):
        if ctx.message is None or ctx.resolver is None or ctx.checked_elsewhere:
            return None
        result = self.check(ctx)
        ctx.state["dmarc"] = result
        ctx.auth_results.append(result.method_result())
        metrics.count_email_authentication("dmarc", result.result)
        where = ctx.queue_id or "NOQUEUE"
        if result.result in ("temperror", "permerror") or result.disposition != "none":
            log.info("%s: DMARC %s for header.from=%s from [%s]: %s%s", where, result.result,
                     result.from_domain or "?", ctx.client_address, result.reason,
                     "" if self.settings.enforce else " (not enforced)")
        if not self.settings.enforce or result.result != "fail":
            return None
        if result.disposition == "reject":
            return Result.reject(550, "5.7.1", self.settings.reject_text
                                 % {"domain": result.policy.domain})
        if result.disposition == "quarantine":
            return Result.quarantine("DMARC policy of %s asks for quarantine"
                                     % result.policy.domain)
        return None
