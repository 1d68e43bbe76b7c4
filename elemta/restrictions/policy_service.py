"""Policy delegation: Postfix's check_policy_service, the `policy_service` built-in plugin.

Owned by the smtpd worker (rcpt, data_command and data stages). For each recipient
(protocol_state RCPT) and, for the servers configured so, at the DATA command, before the
354 and any content (DATA, Postfix's smtpd_data_restrictions), and once the content is in
(END-OF-MESSAGE, smtpd_end_of_data_restrictions), Elemta sends each policy server the
attributes Postfix sends (SMTPD_POLICY_README, up to Postfix 3.8), and acts on the
access(5) action the server answers
(elemta.restrictions.policy_action). What Elemta does not know is sent empty (or 0):
ccert_* (it asks clients for no certificate), sasl_sender, etrn_domain, stress and
compatibility_level; mail_version is Elemta's. As in Postfix, client_name is the
forward-confirmed name and reverse_client_name the PTR name, confirmed or not, each
"unknown" when there is none (elemta.plugins.peername).
The servers are asked in their configured order:

    OK                  accept: later servers and the later plugins of the stage are skipped
                        (at RCPT and DATA; at END-OF-MESSAGE only the later servers)
    DUNNO, WARN, INFO   no opinion: the next server is asked
    REJECT, DEFER, 4NN/5NN   the recipient (RCPT), the DATA command (in place of the 354:
                        the client sends no content) or the message (END-OF-MESSAGE) is
                        refused with that reply, "<to>: Recipient address rejected: text",
                        "<DATA>: Data command rejected: text" as Postfix words it
    HOLD                the message is queued on hold (plugin quarantine); the next server
                        is still asked and may refuse
    DISCARD             the message is accepted and dropped (the whole message, as Postfix)
    PREPEND             the header field is added to the message, above our Received
                        header when given at RCPT or DATA (where Postfix writes it), at
                        the top of the content, below Received, when given at
                        END-OF-MESSAGE (Postfix cannot; Elemta edits the content there
                        anyway)
    DEFER_IF_PERMIT     remembered; a later server's REJECT still rejects, otherwise 450
                        once the servers are done. Postfix waits for the outcome of all
                        later restrictions; Elemta approximates: the plugins after this
                        one in the stage are not asked (a client that would have been
                        rejected by one of them gets 450 and is rejected on its retry)
    DEFER_IF_REJECT     remembered; a later server's REJECT becomes 450; a later plugin's
                        reject stays a reject (the same approximation)

A server that cannot be asked (refused, reset, timed out after try_limit attempts) or that
answers nonsense (no action, an invalid action, a 2xx code, control characters) is logged
by address and reason, and its `default_action` is taken: 451 4.3.5 Server configuration
problem unless configured otherwise, as Postfix's smtpd_policy_service_default_action.

All requests about one message carry the same `instance` (new at MAIL FROM, RSET and the
end of DATA) and go, when possible, over the same connection (elemta.restrictions.
policy_client), so a server can tell them apart from the next message's: policyd-spf adds
its Received-SPF once per message by it. Mail submitted on this host (pickup) has no SMTP
client and is not sent to policy servers, as in Postfix.

Logged: each answer other than DUNNO, with the server and the envelope; refusals are
logged by the session as "NOQUEUE: reject: RCPT from ...; ... (plugin policy_service)".
See also: elemta.plugins.settings (PolicyServiceSettings), Postfix SMTPD_POLICY_README,
tests/test_policy_service.py.
"""

import itertools
import logging
import os
import time

from elemta import __version__
from elemta.plugins.api import ACCEPT, DATA_COMMAND, Plugin, Result
from elemta.plugins.api import DATA as DATA_STAGE
from elemta.plugins.settings import PolicyServiceSettings
from elemta.restrictions import policy_action as actions
from elemta.restrictions.policy_client import (PolicyAnswerError, PolicyClient,
                                               PolicyUnavailable, encode_request)

log = logging.getLogger("elemta.restrictions.policy")

RCPT, DATA, END_OF_MESSAGE = "RCPT", "DATA", "END-OF-MESSAGE"
# How Postfix names what was refused, by protocol state: (reply name, class).
_REFUSED = {RCPT: (None, "Recipient address rejected"),
            DATA: ("<DATA>", "Data command rejected"),
            END_OF_MESSAGE: ("<END-OF-MESSAGE>", "End-of-data rejected")}
_INSTANCE = "policy_service.instance"      # ctx.state key: this message's instance
_COUNTER = itertools.count(1)


def new_instance():
    """A value unique to one message in this host's lifetime, like Postfix's."""
    return "%x.%x.%x" % (os.getpid(), int(time.time()), next(_COUNTER))


def reverse_name(ctx):
    """The client's PTR name, whether its forward lookup confirms it or not, or
    "unknown" (no PTR, no lookup made): Postfix's reverse_client_name."""
    found = ctx.client_lookup
    return getattr(found, "reverse_name", None) or "unknown"


def request_attributes(state, ctx, policy_context=""):
    """[(name, value)]: Postfix's policy request attributes for `state`, from ctx."""
    recipients = ctx.recipients or []
    if state == RCPT:
        recipient, count = ctx.recipient or "", 0
    else:
        recipient = recipients[0] if len(recipients) == 1 else ""
        count = len(recipients)
    if state == END_OF_MESSAGE and ctx.message is not None:
        size = len(ctx.message.raw)
    else:
        size = ctx.declared_size or 0
    instance = ctx.state.get(_INSTANCE)
    if instance is None:
        instance = ctx.state[_INSTANCE] = new_instance()
    return [
        ("request", "smtpd_access_policy"),
        ("protocol_state", state),
        ("protocol_name", "ESMTP" if ctx.esmtp else "SMTP"),
        ("helo_name", ctx.helo or ""),
        ("queue_id", ctx.queue_id or ""),
        ("sender", ctx.sender or ""),
        ("recipient", recipient),
        ("recipient_count", count),
        ("client_address", ctx.client_address or ""),
        ("client_name", ctx.client_name or "unknown"),
        ("reverse_client_name", reverse_name(ctx)),
        ("instance", instance),
        ("sasl_method", ctx.auth_method or ""),
        ("sasl_username", ctx.auth_user or ""),
        ("sasl_sender", ""),
        ("size", size),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", ctx.tls_protocol or ""),
        ("encryption_cipher", ctx.tls_cipher or ""),
        ("encryption_keysize", ctx.tls_bits or 0),
        ("etrn_domain", ""),
        ("stress", ""),
        ("client_port", ctx.client_port or 0),
        ("policy_context", policy_context),
        ("server_address", ctx.server_address or ""),
        ("server_port", ctx.server_port or 0),
        ("compatibility_level", ""),
        ("mail_version", __version__),
    ]


class PolicyServicePlugin(Plugin):
    name = "policy_service"
    Settings = PolicyServiceSettings
    # After the cheap built-in checks (greylist 5) and the DNS-based ones of the data
    # stage (spf 10 .. dmarc 30), before the Authentication-Results writer (90); as
    # Postfix places check_policy_service after reject_unauth_destination, it always
    # runs after the relay check (the session makes that before any rcpt plugin).
    order = 60
    # Postfix's defaults allow one server try_limit (2) x timeout (100 s) + retry_delay:
    # the manager's deadline must not cut the default action short.
    default_timeout = 250.0

    def init(self, settings):
        self.settings = settings = settings or PolicyServiceSettings()
        # (client, its default action as a PolicyDecision), in the order configured.
        self.servers = [(PolicyClient(server), actions.parse_action(server.default_action))
                        for server in settings.servers]

    def close(self):
        for client, _ in getattr(self, "servers", ()):
            client.close()

    def stages(self):
        """rcpt, data_command when some server is asked at DATA, and data only when some
        server is asked at END-OF-MESSAGE: a data-stage plugin makes the smtpd keep each
        message in memory until its end."""
        servers = getattr(getattr(self, "settings", None), "servers", ())
        asked = {state for server in servers for state in server.protocol_states}
        idle = {stage for stage, state in ((DATA_COMMAND, DATA), (DATA_STAGE, END_OF_MESSAGE))
                if state not in asked}
        return tuple(stage for stage in super().stages() if stage not in idle)

    def on_rcpt(self, ctx):
        if ctx.local:
            return None
        return self._ask_servers(RCPT, ctx)

    def on_data_command(self, ctx):
        """DATA, before the 354: a refusal takes its place."""
        if ctx.local:
            return None
        return self._ask_servers(DATA, ctx)

    def on_data(self, ctx):
        """END-OF-MESSAGE. An OK ends the asking of the servers but skips no later
        plugin: Elemta's data stage also does what Postfix does after its restrictions
        (Authentication-Results, signing), which no policy server's OK should turn
        off."""
        if ctx.local:
            return None
        result = self._ask_servers(END_OF_MESSAGE, ctx)
        if result is not None and result.action == ACCEPT:
            return Result.proceed(result.headers)
        return result

    # ---- one protocol state ---------------------------------------------------------

    def _ask_servers(self, state, ctx):
        """The Result of asking, in order, every server configured for `state`."""
        headers, hold, if_permit, if_reject = [], None, None, None
        for client, default in self.servers:
            if state not in client.settings.protocol_states:
                continue
            decision = self._decide(client, default, state, ctx)
            kind = decision.kind
            if kind == actions.ACCEPT:
                if if_permit is not None:
                    return self._refusal(state, ctx, if_permit)
                if hold is not None:
                    return Result.quarantine(hold, headers)
                return Result.accept(headers)
            if kind == actions.REFUSE:
                if decision.code >= 500 and if_reject is not None:
                    return self._refusal(state, ctx, if_reject)
                return self._refusal(state, ctx, decision)
            if kind == actions.DISCARD:
                return Result.discard(decision.text or "discarded by policy server %s"
                                      % client.address)
            if kind == actions.HOLD and hold is None:
                hold = decision.text or "held by policy server %s" % client.address
            elif kind == actions.DEFER_IF_PERMIT and if_permit is None:
                if_permit = decision
            elif kind == actions.DEFER_IF_REJECT and if_reject is None:
                if_reject = decision
            elif kind == actions.PREPEND and decision.header not in headers:
                headers.append(decision.header)
        if if_permit is not None:
            return self._refusal(state, ctx, if_permit)
        if hold is not None:
            return Result.quarantine(hold, headers)
        return Result.proceed(headers) if headers else None

    def _refusal(self, state, ctx, decision):
        name, what = _REFUSED[state]
        text = "%s: %s: %s" % (name or "<%s>" % (ctx.recipient or ""), what, decision.text)
        if decision.code >= 500:
            return Result.reject(decision.code, decision.status, text)
        return Result.tempfail(decision.code, decision.status, text)

    def _decide(self, client, default, state, ctx):
        """The server's PolicyDecision, or its default action when it cannot be asked
        or answers nonsense (logged)."""
        request = encode_request(request_attributes(state, ctx,
                                                    client.settings.policy_context))
        key = "policy_service.connection:%s" % client.address
        where = "%s: %s from %s[%s]: from=<%s> to=<%s>" % (
            ctx.queue_id or "NOQUEUE", state, ctx.client_name or "unknown",
            ctx.client_address, ctx.sender or "", ctx.recipient or "")
        try:
            action, connection = client.ask(request, ctx.session.get(key))
        except PolicyUnavailable as error:
            log.warning("%s: policy server %s unavailable: %s; default action %s",
                        where, client.address, error, client.settings.default_action)
            return default
        except PolicyAnswerError as error:
            log.warning("%s: policy server %s answered malformed: %s; default action %s",
                        where, client.address, error, client.settings.default_action)
            return default
        ctx.session[key] = connection
        decision = actions.parse_action(action)
        shown = action.strip()[:200]
        if decision.problem:
            log.warning("%s: policy server %s answered an invalid action %r: %s; default "
                        "action %s", where, client.address, shown, decision.problem,
                        client.settings.default_action)
            return default
        if decision.note:
            log.warning("%s: policy server %s: %s (action=%s)", where, client.address,
                        decision.note, shown)
        elif decision.kind != actions.DUNNO:
            log.info("%s: policy server %s: action=%s", where, client.address, shown)
        return decision
