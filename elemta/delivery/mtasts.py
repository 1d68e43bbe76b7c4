"""MTA-STS (RFC 8461): which recipient domains want their MX hosts authenticated, and how.

Owned by the delivery worker (`elemta: delivery`); elemta.delivery.smtp_transport asks
`MTASTS.policy_for(domain)` before it delivers to a domain's MX hosts, then applies the
STSPolicy it gets (mx patterns, mode) itself. In RFC 8461's order:

    discover  the TXT record at _mta-sts.<domain>: exactly one "v=STSv1; id=..." (3.1);
              none, several or a broken one mean no policy is published
    fetch     https://mta-sts.<domain>/.well-known/mta-sts.txt (3.3): the host's address
              from our own resolver (delivery.nameservers), its certificate checked
              against delivery.mta_sts_ca_file or the system's CAs, no redirect followed,
              200 and text/plain only, at most MAX_POLICY_BYTES, within
              delivery.mta_sts_timeout; over gevent sockets, so a slow policy server stalls
              one delivery, never the worker
    cache     each policy a small JSON file under spool/mta-sts/, shared by every delivery
              worker and kept across restarts, used until its max_age runs out (5.1): a
              missing TXT record or a failed fetch does not end a cached policy
    refresh   when the TXT id changes, or once REFRESH_AT of max_age has passed; a fetch
              that fails is not tried again for FETCH_RETRY seconds (per worker)
    report    a fetch that fails counts once for TLS-RPT (elemta.tlsrpt), as the RFC 8460
              result type STSPolicyError names: sts-webpki-invalid (the policy server's
              certificate), sts-policy-invalid (the policy), sts-policy-fetch-error

lookup(domain) also says when no policy could be found out (a failed TXT lookup or fetch)
as against none published: RFC 8461 treats both as no policy, but a REQUIRETLS delivery
that needs the policy to vouch for its MX defers on the first instead of bouncing.

See also: elemta.delivery.smtp_transport (applies the policy), elemta.delivery.mx (the
TXT lookup), tests/test_mta_sts.py.
"""

import http.client
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import gevent
from gevent import socket, ssl

from elemta.delivery.mx import RouteError
from elemta.tlsrpt import results
from elemta.tlsrpt.counter import NullCounter

log = logging.getLogger("elemta.delivery")

ENFORCE = "enforce"
TESTING = "testing"
NONE = "none"
MODES = (ENFORCE, TESTING, NONE)

# RFC 8461 3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31557600
# RFC 8461 3.3: senders may limit the policy's size; 64 KiB is what it suggests.
MAX_POLICY_BYTES = 64 * 1024
# Fetch a policy again once this fraction of its max_age has passed (it stays in force
# meanwhile, and afterwards until it expires if the new fetch fails).
REFRESH_AT = 0.75
# Seconds before a worker tries again to fetch a policy whose fetch failed.
FETCH_RETRY = 300.0
WELL_KNOWN = "/.well-known/mta-sts.txt"
# RFC 8461 3.1: sts-id = 1*32(ALPHA / DIGIT).
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
# A host name as normal_domain spells it: only such a domain is looked up, put in a
# request's Host field or made a cache file's name.
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_HOST_NAME = re.compile(r"^%s(?:\.%s)*$" % (_LABEL, _LABEL))


class STSPolicyError(Exception):
    """No usable policy could be had (the fetch failed, or the policy does not parse).
    result: the RFC 8460 result type (sts-policy-invalid, sts-webpki-invalid or
    sts-policy-fetch-error)."""

    def __init__(self, message, result=results.STS_POLICY_INVALID):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class STSPolicy:
    """One domain's MTA-STS policy as fetched: the TXT id it was fetched for, its mode,
    its mx patterns, its max_age, and when it was fetched (seconds since the epoch)."""
    domain: str
    policy_id: str
    mode: str
    mx: Tuple[str, ...]
    max_age: int
    fetched: float

    @property
    def expires(self):
        return self.fetched + self.max_age

    def matches(self, host):
        """True when an mx pattern names host (RFC 8461 4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def describe(self):
        return "mode %s, id %s, max_age %d, mx %s" % (
            self.mode, self.policy_id, self.max_age, " ".join(self.mx) or "(none)")

    def reported(self):
        """The policy as a TLS-RPT report names it (RFC 8460 4.4: its lines, mx
        patterns)."""
        lines = ("version: STSv1", "mode: %s" % self.mode) + tuple(
            "mx: %s" % mx for mx in self.mx) + ("max_age: %d" % self.max_age,)
        return results.ReportedPolicy(results.STS, self.domain, lines, self.mx)


def mx_matches(pattern, host):
    """RFC 8461 4.1: "mail.example.org" matches itself; "*.example.org" matches one more
    label on the left (a.example.org, not example.org nor a.b.example.org). Case and a
    final dot do not matter."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return pattern == host


def published_id(records):
    """The id of the one "v=STSv1" TXT record among records (strings), or None when
    there is none, several, or a broken one (RFC 8461 3.1: then no policy is
    published)."""
    ours = [r for r in records if r.startswith("v=STSv1;") or r.strip() == "v=STSv1"]
    if len(ours) != 1:
        return None
    fields = {}
    for item in ours[0].split(";"):
        key, equals, value = item.strip().partition("=")
        if key and not equals:
            return None
        if key:
            fields.setdefault(key, value)
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(text, domain, policy_id, fetched):
    """The STSPolicy in text (RFC 8461 3.2: "key: value" lines); raises STSPolicyError
    naming what is wrong."""
    fields, mx = {}, []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise STSPolicyError("line %d is not \"key: value\": %r"
                                 % (number, line[:80]))
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise STSPolicyError("version is %r, not STSv1" % fields.get("version"))
    mode = fields.get("mode")
    if mode not in MODES:
        raise STSPolicyError("mode is %r, not one of %s" % (mode, ", ".join(MODES)))
    max_age = fields.get("max_age", "")
    if not (max_age.isdigit() and len(max_age) <= 10):
        raise STSPolicyError("max_age is %r, not a number of seconds" % max_age)
    if mode != NONE and not mx:
        raise STSPolicyError("mode %s with no mx line" % mode)
    return STSPolicy(domain, policy_id, mode, tuple(mx),
                     min(int(max_age), MAX_AGE_LIMIT), fetched)


class PolicyCache:
    """Policies as JSON files in one directory (spool/mta-sts), one per domain. A cache:
    a file that cannot be read or written costs a fetch, never a delivery."""

    def __init__(self, directory):
        self.directory = directory

    def get(self, domain):
        path = self._path(domain)
        if path is None:
            return None
        try:
            with open(path) as stored:
                data = json.load(stored)
            data["mx"] = tuple(data["mx"])
            return STSPolicy(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as error:
            log.warning("MTA-STS cache file %s is unusable (%s); fetching the policy again",
                        path, error)
            return None

    def put(self, policy):
        path = self._path(policy.domain)
        if path is None:
            return
        temporary = "%s.%d.tmp" % (path, os.getpid())
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            with open(temporary, "w") as stored:
                json.dump(asdict(policy), stored)
            os.replace(temporary, path)    # whole or not at all, for the other workers
        except OSError as error:
            log.warning("cannot keep the MTA-STS policy of %s in %s: %s", policy.domain,
                        self.directory, error)

    def _path(self, domain):
        if not _HOST_NAME.match(domain):
            return None
        return os.path.join(self.directory, domain)


class PolicyFetcher:
    """Fetches https://mta-sts.<domain>/.well-known/mta-sts.txt (see the module docstring).
    resolver: an elemta.delivery.mx.MXResolver (for the policy host's address)."""

    def __init__(self, resolver, ca_file=None, port=443, timeout=20.0):
        self.resolver = resolver
        self.ca_file = ca_file
        self.port = port
        self.timeout = timeout

    def context(self):
        """Certificates checked against ca_file or the system's CAs, and the host name."""
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        return ssl.create_default_context()

    def fetch(self, domain, policy_id, now):
        host = "mta-sts." + domain
        addresses, error = self.resolver._host_addresses(host)
        if error is not None:
            raise STSPolicyError("no address for %s (%s)" % (host, error.reason),
                                 results.STS_POLICY_FETCH_ERROR)
        problems = []
        for address in addresses:
            try:
                body = self._get(host, address)
            except STSPolicyError as error:
                problems.append(error)
                continue
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise STSPolicyError("the policy at https://%s%s is not UTF-8"
                                     % (host, WELL_KNOWN))
            return parse_policy(text, domain, policy_id, now)
        raise STSPolicyError("; ".join(str(p) for p in problems), problems[-1].result)

    def _get(self, host, address):
        """The body of the policy at address, or STSPolicyError."""
        where = "https://%s%s (%s)" % (host, WELL_KNOWN, address)
        timer = gevent.Timeout(self.timeout)
        timer.start()
        sock = None
        try:
            sock = socket.create_connection((address, self.port))
            sock = self.context().wrap_socket(sock, server_hostname=host)
            sock.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: Elemta\r\n"
                          "Connection: close\r\n\r\n" % (WELL_KNOWN, host)).encode("ascii"))
            response = http.client.HTTPResponse(sock)
            response.begin()
            if response.status != 200:
                # RFC 8461 3.3: redirects are not followed; only 200 is a policy.
                raise STSPolicyError("%s answered %d %s" % (where, response.status,
                                                             response.reason),
                                     results.STS_POLICY_FETCH_ERROR)
            media_type = (response.getheader("Content-Type") or "").split(";")[0]
            if media_type.strip().lower() != "text/plain":
                raise STSPolicyError("%s is %s, not text/plain"
                                     % (where, media_type or "of no media type"))
            body = response.read(MAX_POLICY_BYTES + 1)
            if len(body) > MAX_POLICY_BYTES:
                raise STSPolicyError("%s is larger than %d bytes"
                                     % (where, MAX_POLICY_BYTES))
            return body
        except gevent.Timeout as expired:
            if expired is not timer:
                raise
            raise STSPolicyError("%s: no answer within %g s" % (where, self.timeout),
                                 results.STS_POLICY_FETCH_ERROR)
        except ssl.SSLError as error:
            reason = getattr(error, "verify_message", None) or getattr(error, "reason",
                                                                       None) or error
            raise STSPolicyError("%s: TLS failed: %s" % (where, reason),
                                 results.STS_WEBPKI_INVALID)
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise STSPolicyError("%s: %s" % (where, getattr(error, "strerror", None)
                                             or error or type(error).__name__),
                                 results.STS_POLICY_FETCH_ERROR)
        finally:
            timer.close()
            if sock is not None:
                sock.close()


@dataclass(frozen=True)
class PolicyLookup:
    """What MTASTS.lookup found: the policy in force (None: none), and when there is
    none, why it could not be found out (None: the domain publishes none)."""
    policy: Optional["STSPolicy"]
    unknown: Optional[str] = None

    def __post_init__(self):
        if self.policy is not None:         # a policy in force is known, whatever failed
            object.__setattr__(self, "unknown", None)


class MTASTS:
    """The policy in force for a domain: discovered, fetched, cached, refreshed."""

    def __init__(self, resolver, cache, fetcher, clock=time.time, counter=None):
        self.resolver = resolver
        self.cache = cache
        self.fetcher = fetcher
        self.clock = clock
        # TLS-RPT: fetch failures counted (elemta.tlsrpt.counter.TLSCounter).
        self.counter = counter if counter is not None else NullCounter()
        self._failed = {}          # domain -> when this worker may try to fetch again
        self._failed_why = {}      # domain -> why its last fetch failed

    def policy_for(self, domain):
        # type: (str) -> Optional[STSPolicy]
        """The domain's policy (any mode), or None when it has none in force."""
        return self.lookup(domain).policy

    def lookup(self, domain):
        # type: (str) -> PolicyLookup
        """The domain's policy (any mode) and, when there is none in force, whether that
        is known (no TXT record: unknown None) or could not be found out (the TXT lookup
        or the fetch failed: unknown says why). RFC 8461 treats both as no policy; a
        REQUIRETLS delivery that needs the policy to vouch for its MX defers on the
        second rather than bouncing on a passing failure."""
        if not _HOST_NAME.match(domain):
            return PolicyLookup(None)   # an address literal, or nothing a policy is for
        now = self.clock()
        cached = self.cache.get(domain)
        if cached is not None and cached.expires <= now:
            cached = None
        try:
            policy_id = published_id(self.resolver.txt("_mta-sts." + domain))
        except RouteError as error:
            log.info("MTA-STS TXT lookup for %s failed (%s)%s", domain, error.reason,
                     "; its cached policy still applies" if cached else "")
            if error.permanent:     # not a name that could have a record
                return PolicyLookup(cached)
            return PolicyLookup(cached, "the MTA-STS TXT lookup for %s failed (%s)" % (
                domain, error.reason))
        if policy_id is None:
            # RFC 8461 5.1: a withdrawn record ends nothing before max_age
            return PolicyLookup(cached)
        if cached is not None and cached.policy_id == policy_id and \
                now < cached.fetched + cached.max_age * REFRESH_AT:
            return PolicyLookup(cached)
        if now < self._failed.get(domain, 0):
            return PolicyLookup(cached, "the MTA-STS policy of %s could not be fetched "
                                "(%s)" % (domain, self._failed_why.get(domain)))
        try:
            policy = self.fetcher.fetch(domain, policy_id, now)
        except STSPolicyError as error:
            self._failed[domain] = now + FETCH_RETRY
            self._failed_why[domain] = str(error)
            log.warning("MTA-STS policy of %s (id %s) not fetched: %s%s", domain, policy_id,
                        error, "; its cached policy still applies" if cached else "")
            # RFC 8460 4.3.2.2: the domain says it has a policy; none could be had.
            self.counter.failure(results.ReportedPolicy(results.STS, domain), error.result,
                                 reason=str(error))
            return PolicyLookup(cached, "the MTA-STS policy of %s could not be fetched "
                                "(%s)" % (domain, error))
        self._failed.pop(domain, None)
        self._failed_why.pop(domain, None)
        self.cache.put(policy)
        log.info("MTA-STS policy of %s fetched: %s", domain, policy.describe())
        return PolicyLookup(policy)
