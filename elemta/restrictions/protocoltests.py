"""Postscreen's pregreet and pipelining tests, done by the smtpd session itself.

Owned by the smtpd worker: elemta.smtpd.session makes one ProtocolTests per connection
and asks it (1) before the greeting, whether the client talks before its turn, and (2)
when the protocol core reports ImproperPipelining (elemta.smtp.events), what to do. They
are not plugins: the first must watch the socket before any SMTP is spoken, the second
sees the raw input stream, which plugins never do.

  pregreet    After the first line of the greeting ("220-host banner", the bait), wait
              greet_wait seconds; input arriving meanwhile (looked at with MSG_PEEK, so
              it is still read as commands afterwards) fails the test, logged as
              postscreen logs it: "PREGREET 14 after 0.02 from [192.0.2.1]:1234: EHLO
              x\\r\\n". Real MTAs wait for the whole multi-line 220; spambots often do not.
              The connection-stage plugins (the DNSBL lookups) run during the wait, as
              postscreen's do, so a client costs the longer of the two, not their sum.
  pipelining  A command line with more input behind it where RFC 2920 forbids sending
              ahead (no EHLO reply with PIPELINING seen yet, or after DATA), logged
              "COMMAND PIPELINING from [192.0.2.1]:1234 after HELO: MAIL FROM:<a@b>\\r\\n".

A failed test does what its action says (Postfix's postscreen_*_action): ignore - only
the log line; enforce - the session goes on, and every RCPT is refused with 550 5.5.1
Protocol error, logged "NOQUEUE: reject: RCPT ... (restriction pregreet)", so the
sender and recipients are on record; drop - 521 5.5.1 Protocol error and the connection
closes. Whatever the action, the failed tests are noted for the plugins in
ctx.session["protocol_tests_failed"] (a list of names), so a scoring check can weigh
them. Unlike postscreen, the greeting is still sent to an enforced pregreeter, and no
pass is remembered: every connection of a client is tested. Clients in mynetworks and
listeners other than smtp are never tested.

See also: elemta.config.schema.ProtocolTestSettings, tests/test_protocol_tests.py.
"""

import logging
import socket
import time

from elemta.smtp.replies import Reply

log = logging.getLogger("elemta.smtpd")

IGNORE, ENFORCE, DROP = "ignore", "enforce", "drop"
# postscreen's replies (postscreen_early.c, postscreen_smtpd.c).
ENFORCED = Reply(550, "5.5.1", "Protocol error")
DROPPED = Reply(521, "5.5.1", "Protocol error", close=True)
PEEK_BYTES = 1024       # input looked at (the log line shows the first 100 bytes)
SHOWN = 100


def escape(data):
    """Input bytes as a log line may show them: printable ASCII as is, the rest C-escaped
    (\\r, \\n, \\t, \\ooo), as postscreen's escape() does."""
    out = []
    for byte in data:
        if 0x20 <= byte < 0x7f and byte != 0x5c:
            out.append(chr(byte))
        else:
            out.append({0x0d: "\\r", 0x0a: "\\n", 0x09: "\\t", 0x5c: "\\\\"}.get(
                byte, "\\%03o" % byte))
    return "".join(out)


class ProtocolTests:
    """The protocol tests of one session. `failed` names the test whose enforce action
    now refuses the client's recipients (None while it has failed none so enforced)."""

    def __init__(self, settings, listener_mode, trusted, client_ip, client_port,
                 notes=None):
        """notes: the plugins' per-connection notes (Context.session), where the names
        of the failed tests are listed under "protocol_tests_failed"."""
        self.settings = settings
        self.active = listener_mode == "smtp" and not trusted
        self.where = "[%s]:%s" % (client_ip, client_port)
        self.failed = None
        self.notes = notes if notes is not None else {}

    def _act(self, test, action):
        """The reply that drops the client, or None (enforce: remember the failure)."""
        self.notes.setdefault("protocol_tests_failed", []).append(test)
        if action == DROP:
            return DROPPED
        if action == ENFORCE and self.failed is None:
            self.failed = test
        return None

    def waits(self):
        """True when the pregreet test is on for this client: pregreet() waits."""
        return self.active and self.settings.greet_wait > 0

    def pregreet(self, sock, teaser):
        """Run the pregreet test (when on): send `teaser` (the bait, bytes, or b"" for
        none), then wait up to greet_wait seconds for input without consuming it.
        Returns DROPPED when the client is to be dropped, else None."""
        if not self.waits():
            return None
        wait = self.settings.greet_wait
        start = time.monotonic()
        try:
            if teaser and self.settings.greet_banner:
                sock.sendall(teaser)
            sock.settimeout(wait)
            data = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except socket.timeout:
            return None                    # passed: it waited for its turn
        except OSError:
            return None                    # gone: the session will find out
        if not data:
            return None
        log.info("PREGREET %d after %.2f from %s: %s", len(data), time.monotonic() - start,
                 self.where, escape(data[:SHOWN]))
        return self._act("pregreet", self.settings.greet_action)

    def pipelining(self, event):
        """The core reported ImproperPipelining: log it (when the test is on for this
        client); DROPPED when the client is to be dropped, else None."""
        if not self.active:
            return None
        log.info("COMMAND PIPELINING from %s after %s: %s", self.where, escape(
            event.command.encode("ascii", "replace")), escape(event.following[:SHOWN]))
        return self._act("pipelining", self.settings.pipelining_action)

    def refusal(self):
        """The reply refusing a recipient of a client that failed an enforced test."""
        return ENFORCED if self.failed is not None else None
