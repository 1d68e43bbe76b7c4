"""ARC (RFC 8617): verify the chain on inbound mail, seal the mail Elemta forwards.

Owned by the smtpd worker. It verifies at the data stage (the result, cv =
none/pass/fail, goes into our Authentication-Results as arc=...) and seals at the storage
stage, at receive time as OpenARC does, the mail Elemta forwards: a message with a
recipient outside our local domains (ctx.outbound) that is not our own users' submission
(AUTH or sendmail) - mail relayed for a mynetworks host such as a list server, or any
other client. For such mail the chain is verified even from a mynetworks client, so our
Authentication-Results carries arc=. dkimpy does the cryptography; its sealer reads the
chain status from our own Authentication-Results, which is why sealing comes after the
data stage (the storage stage sees the content with that header added). Keys are fetched
through the plugin resolver (gevent sockets); a DNS failure is reported as arc=temperror
and such a message is not sealed (cv= may only be none, pass or fail).

Verifying and sealing are CPU work over the whole message: they run in a helper process
(elemta.util.offload), so a large message never stalls the worker's other sessions and the
plugin timeout can stop them; the body is hashed once however many ARC sets cover it
(elemta.plugins.dkim.BodyHashCache), and a chain longer than RFC 8617's 50 sets fails
unchecked.

Sealing uses RSA keys (dkimpy's ARC supports rsa-sha256 only) from the same kind of key
file as DKIM signing; `elemtactl dkim keygen` makes them.

See also: elemta.plugins.dkim, elemta.plugins.authres, tests/test_arc.py.
"""

import logging
import re
from dataclasses import dataclass
from typing import List, Tuple

import dkim as dkimpy

from elemta import metrics
from elemta.plugins.api import MethodResult, Plugin, PluginConfigError, Result
from elemta.plugins.authres import authserv_id_of
from elemta.plugins.dkim import (BodyHashCache, KeyFileError, load_private_key,
                                 precanonicalized)
from elemta.plugins.resolver import TemporaryDNSError
from elemta.plugins.settings import ARCSettings
from elemta.util import offload

log = logging.getLogger("elemta.plugins.arc")
_quiet = logging.getLogger("elemta.plugins.arc.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False

CHAIN_RESULTS = ("none", "pass", "fail")
# RFC 8617 4.2.1: at most 50 ARC sets; a longer chain fails (and is not checked: each set
# costs key lookups and signature checks).
MAX_INSTANCES = 50


class _LookupFailed(Exception):
    """Carries a TemporaryDNSError out through dkimpy, which would call it a failure."""


@dataclass(frozen=True)
class ARCResult:
    cv: str                 # none, pass, fail, or temperror
    instances: int = 0      # how many ARC sets the message carries
    reason: str = ""


def verify_chain(raw, resolver, minkey=1024):
    # type: (bytes, object, int) -> ARCResult
    def dnsfunc(name, timeout=5):
        name = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = resolver.txt(name.rstrip("."))
        except TemporaryDNSError as error:
            raise _LookupFailed(error.reason)
        return records[0] if records else None

    try:
        verifier = _ARCVerifier(raw, logger=_quiet, minkey=minkey)
        instances = verifier.sorted_arc_headers()[0]
        if instances > MAX_INSTANCES:
            return ARCResult("fail", instances, "%d ARC sets, more than the %d RFC 8617 "
                                                "allows; not checked" % (instances,
                                                                         MAX_INSTANCES))
        cv, results, reason = verifier.verify(dnsfunc=dnsfunc)
    except _LookupFailed as error:
        return ARCResult("temperror", reason="key lookup failed: %s" % error)
    except (dkimpy.DKIMException, ValueError, IndexError, KeyError, TypeError) as error:
        return ARCResult("fail", reason="malformed ARC set: %s" % error)
    cv = cv.decode("ascii") if isinstance(cv, bytes) else str(cv)
    reason = reason.decode("ascii", "replace") if isinstance(reason, bytes) else reason
    if cv not in CHAIN_RESULTS:
        cv = "fail"
    return ARCResult(cv, len(results or ()), reason or "")


class _ARCVerifier(BodyHashCache, dkimpy.ARC):
    """dkimpy's ARC verifier hashing the body once, not once per ARC set."""


def seal(raw, selector, domain, key_pem, authserv_id, timestamp=None):
    # type: (bytes, str, str, bytes, str, object) -> List[Tuple[str, str]]
    """The next ARC set, as (name, value) fields in the order to prepend them; [] when the
    message carries no Authentication-Results of ours (nothing to seal)."""
    # dkimpy.arc_sign, but with the body canonicalized in linear time (ARC is relaxed).
    sealer = precanonicalized(dkimpy.ARC(raw, logger=_quiet, signature_algorithm=b"rsa-sha256"))
    fields = sealer.sign(selector.encode("ascii"), domain.encode("ascii"), key_pem,
                         authserv_id.encode("ascii"),
                         include_headers=sealer.default_sign_headers(), timestamp=timestamp)
    out = []
    for field in fields:
        name, _, value = field.decode("ascii", "replace").partition(":")
        out.append((name, value.rstrip("\r\n")))
    if out and not out[0][0].lower() == "arc-seal":
        out.reverse()           # the seal on top, as trace fields go (RFC 8617 5.1)
    return out


class ARCPlugin(Plugin):
    name = "arc"
    Settings = ARCSettings
    order = 25

    def init(self, settings):
        self.settings = settings = settings or ARCSettings()
        self.key = None
        if settings.seal:
            try:
                self.key = load_private_key(settings.key_file, "rsa-sha256")
            except KeyFileError as error:
                raise PluginConfigError("plugins.%s.key_file: %s" % (self.name, error)) \
                    from None

    def close(self):
        offload.shutdown()

    def forwarded(self, ctx):
        """True for mail this server seals: it leaves, and is not our users' own."""
        return (self.key is not None and ctx.outbound and ctx.auth_user is None
                and not ctx.local and not ctx.handover)

    def on_data(self, ctx):
        if not self.settings.verify or ctx.message is None or ctx.resolver is None:
            return None
        if ctx.checked_elsewhere and not self.forwarded(ctx):
            return None
        # In a helper process: hashing a large body must not stall the other sessions.
        checked = offload.call(verify_chain, ctx.message.raw, ctx.resolver)
        ctx.state["arc"] = checked
        props = (("smtp.remote-ip", ctx.client_address),) if ctx.client_address else ()
        reason = checked.reason if checked.cv not in ("pass", "none") else ""
        ctx.auth_results.append(MethodResult("arc", checked.cv, reason, props))
        metrics.count_email_authentication("arc", checked.cv)
        if checked.cv in ("fail", "temperror"):
            log.info("%s: ARC %s from [%s]: %s", ctx.queue_id or "NOQUEUE", checked.cv,
                     ctx.client_address, checked.reason)
        return None

    def on_storage(self, ctx):
        if ctx.message is None or not self.forwarded(ctx):
            return None
        authserv_id = self.settings.authserv_id or ctx.hostname
        claimed = [re.findall(r"(?:^|;)\s*arc\s*=\s*([A-Za-z]+)", value)
                   for value in ctx.message.get_all("Authentication-Results")
                   if (authserv_id_of(value) or "").lower() == authserv_id.lower()]
        if any(result.lower() not in CHAIN_RESULTS for found in claimed for result in found):
            log.info("%s: not ARC-sealed: the chain could not be checked on arrival",
                     ctx.queue_id or "NOQUEUE")
            return None
        try:
            fields = offload.call(seal, ctx.message.raw, self.settings.selector,
                                  self.settings.domain, self.key, authserv_id)
        except (dkimpy.DKIMException, ValueError) as error:
            log.warning("%s: not ARC-sealed: %s", ctx.queue_id or "NOQUEUE", error)
            return None
        return Result.proceed(headers=fields) if fields else None
