"""Rspamd: ask Rspamd's normal worker about each message and act on its answer.

Owned by the processes that take mail in - the smtpd worker and pickup - as the `rspamd`
built-in, data stage: the content as received, once per message however many recipients
it has (elemta.plugins.content). The protocol is Rspamd's HTTP one, as Exim's and
Haraka's integrations speak it: POST /checkv2 with the message as the body and the
envelope in request headers (From, one Rcpt per recipient, IP, Helo, Hostname, User,
Queue-Id, MTA-Name, Settings-ID for outbound mail, Password when configured); the answer
is JSON: {"action": ..., "score": ..., "required_score": ..., "symbols": {...},
"messages": {"smtp_message": ...}, "subject": ..., "milter": {...}}.

    reject           554 5.7.1, Rspamd's messages.smtp_message or reject_text
    soft reject      451 4.7.1 (smtp_message or "Try again later")
    greylist         451 4.7.1 greylisted
    rewrite subject  Subject replaced by Rspamd's `subject`
    add header       spam_header: Yes
    no action        nothing
and on every scanned message X-Spamd-Result / X-Spam-Status as configured (inbound copies
of the headers we write are removed), and the add/remove header edits of Rspamd's
milter_headers module when its answer carries them.

A message larger than max_size is not sent and passes, logged. An Rspamd that cannot be
reached, answers other than 200 or sends what is not its JSON raises ScannerError: the
manager answers 451 4.3.0, or with fail_open carries on, and logs it in one line.
One log line per verdict: "QUEUEID: rspamd: action=reject score=15.00/15.00
symbols=GTUBE (0.012s)". Sending and waiting go through elemta.plugins.scanner (gevent
sockets, the body sent from memory in chunks, metrics); the answer is parsed with the
standard library's http.client over that socket.
See also: elemta.plugins.settings.RspamdSettings, tests/test_rspamd.py (a real Rspamd).
"""

import email.header
import http.client
import json
import logging
import re

from elemta import metrics
from elemta.plugins import scanner
from elemta.plugins.api import Plugin, Result
from elemta.plugins.settings import RspamdSettings

log = logging.getLogger("elemta.plugins.rspamd")

# Rspamd's answer: its JSON with every symbol and option; a few kilobytes, a megabyte is
# not Rspamd.
MAX_ANSWER = 1 << 20
# Symbols named in the log line at most (the header carries them all).
LOG_SYMBOLS = 20
# Action name -> our metrics label and what we do.
_LABELS = {"no action": "no_action", "add header": "add_header",
           "rewrite subject": "rewrite_subject", "greylist": "greylist",
           "soft reject": "soft_reject", "reject": "reject"}
SPAM_ACTIONS = ("reject", "soft reject", "rewrite subject", "add header")
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]+")


class RspamdPlugin(Plugin):
    name = "rspamd"
    Settings = RspamdSettings
    order = 70              # after the authentication checks and clamav
    default_timeout = 30.0  # Rspamd's own task_timeout is 8 s; leave it room for DNS
    scans_content = True    # release --rescan runs it again (elemta.plugins.rescan)

    def init(self, settings):
        self.settings = settings = settings or RspamdSettings()
        self.address = scanner.parse_address(settings.address)

    def on_data(self, ctx):
        raw = ctx.message.raw
        where = ctx.queue_id or "NOQUEUE"
        with scanner.measured(self.name) as scan:
            if len(raw) > self.settings.max_size:
                scan.verdict("unscanned", "pass")
                log.info("%s: rspamd: not scanned: %d bytes is more than max_size %d",
                         where, len(raw), self.settings.max_size)
                return None
            answer = self.check(ctx, raw)
            return self.verdict(ctx, scan, answer)

    # ---- the request --------------------------------------------------------------

    def request_headers(self, ctx, length):
        """The HTTP request head: Rspamd's protocol headers for this message."""
        fields = [("Content-Length", str(length)), ("Connection", "close"),
                  ("From", ctx.sender or "<>")]
        fields += [("Rcpt", recipient) for recipient in ctx.recipients]
        if ctx.client_address:
            fields.append(("IP", ctx.client_address))
        if ctx.helo:
            fields.append(("Helo", ctx.helo))
        if ctx.client_name and ctx.client_name != "unknown":
            fields.append(("Hostname", ctx.client_name))
        if ctx.auth_user:
            fields.append(("User", ctx.auth_user))
        if ctx.queue_id:
            fields.append(("Queue-Id", ctx.queue_id))
        fields.append(("MTA-Name", ctx.hostname))
        if ctx.outbound and self.settings.outbound_settings_id:
            fields.append(("Settings-ID", self.settings.outbound_settings_id))
        if self.settings.password:
            fields.append(("Password", self.settings.password))
        host = "localhost" if isinstance(self.address, str) else scanner.describe(
            self.address)                              # a unix socket has no host name
        lines = ["POST /checkv2 HTTP/1.1", "Host: %s" % host]
        lines += ["%s: %s" % (name, _CONTROL.sub(" ", value)) for name, value in fields]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    def check(self, ctx, raw):
        """Rspamd's JSON answer (a dict) about raw."""
        where = scanner.describe(self.address)
        sock = scanner.connect(self.address, "rspamd")
        try:
            try:
                sock.sendall(self.request_headers(ctx, len(raw)))
                scanner.send_chunks(sock, raw)
            except OSError as error:
                raise scanner.ScannerError("rspamd at %s closed the connection: %s"
                                           % (where, error.strerror or error)) from None
            response = http.client.HTTPResponse(sock, method="POST")
            try:
                response.begin()
                body = response.read(MAX_ANSWER + 1)
            except (http.client.HTTPException, OSError) as error:
                raise scanner.ScannerError("rspamd at %s gave no HTTP answer: %s" % (
                    where, scanner.printable(str(error) or type(error).__name__,
                                             spaces=True))) from None
            finally:
                response.close()
        finally:
            sock.close()
        if response.status != 200:
            raise scanner.ScannerError("rspamd at %s answered HTTP %d: %s" % (
                where, response.status, scanner.printable(body[:200].decode(
                    "utf-8", "replace"), spaces=True)))
        if len(body) > MAX_ANSWER:
            raise scanner.ScannerError("rspamd at %s answered more than %d bytes"
                                       % (where, MAX_ANSWER))
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("action"), str):
            raise scanner.ScannerError("rspamd at %s answered no action: %s" % (
                where, scanner.printable(body[:200].decode("utf-8", "replace"),
                                         spaces=True)))
        return answer

    # ---- the answer ---------------------------------------------------------------

    def verdict(self, ctx, scan, answer):
        settings = self.settings
        action = answer["action"]
        score, required = _number(answer.get("score")), _number(answer.get("required_score"))
        symbols = answer.get("symbols") if isinstance(answer.get("symbols"), dict) else {}
        smtp_message = ""
        messages = answer.get("messages")
        if isinstance(messages, dict) and isinstance(messages.get("smtp_message"), str):
            smtp_message = scanner.printable(messages["smtp_message"], 400, spaces=True)
        headers, remove = [], []
        # Inbound copies of what we write are forgeries or stale: remove them.
        ours = [name for name, wanted in (("X-Spamd-Result", settings.result_header),
                                          ("X-Spam-Status", settings.status_header),
                                          (settings.spam_header, bool(settings.spam_header)))
                if wanted]
        remove += [(name, value) for name, value in ctx.message.headers
                   if name.lower() in {n.lower() for n in ours}]
        if settings.result_header:
            headers.append(("X-Spamd-Result", result_header(action, score, required,
                                                            symbols)))
        if settings.status_header:
            headers.append(("X-Spam-Status", "%s, score=%.2f required=%.2f" % (
                "Yes" if action in SPAM_ACTIONS else "No", score, required)))
        if settings.milter_headers and isinstance(answer.get("milter"), dict):
            self.milter_edits(ctx, answer["milter"], headers, remove)

        reply, ours_action = None, "pass"
        if action == "reject":
            reply, ours_action = Result.reject(554, "5.7.1", smtp_message
                                               or settings.reject_text), "reject"
        elif action == "soft reject":
            reply, ours_action = Result.tempfail(451, "4.7.1", smtp_message
                                                 or "Try again later"), "tempfail"
        elif action == "greylist":
            reply, ours_action = Result.tempfail(451, "4.7.1", "Greylisted, please try "
                                                 "again later"), "tempfail"
        elif action == "rewrite subject" and isinstance(answer.get("subject"), str):
            remove += [(name, value) for name, value in ctx.message.headers
                       if name.lower() == "subject"]
            headers.append(("Subject", _encoded(answer["subject"])))
            ours_action = "header"
        elif action == "add header" and settings.spam_header:
            headers.append((settings.spam_header, "Yes"))
            ours_action = "header"
        elif action not in _LABELS:
            log.warning("%s: rspamd: unknown action %r taken as no action",
                        ctx.queue_id or "NOQUEUE", scanner.printable(action, spaces=True))

        scan.verdict(_LABELS.get(action, "unknown"), ours_action)
        metrics.RSPAMD_SCORE.observe(score)
        names = sorted(scanner.printable(name) for name in symbols)
        log.info("%s: rspamd: action=%s score=%.2f/%.2f symbols=%s%s (%.3fs)",
                 ctx.queue_id or "NOQUEUE", _LABELS.get(action, "unknown"), score, required,
                 ",".join(names[:LOG_SYMBOLS]) + (",..." if len(names) > LOG_SYMBOLS
                                                  else ""),
                 {"reject": ", rejected", "tempfail": ", deferred"}.get(ours_action, ""),
                 scan.seconds)
        if reply is not None:
            return reply
        return Result.proceed(headers, remove)

    def milter_edits(self, ctx, milter, headers, remove):
        """Rspamd's milter_headers answer: {"add_headers": {name: value | {"value": v} |
        [...]}, "remove_headers": {name: n}} (n 0: every copy, n > 0: the n-th, n < 0:
        the n-th from the end)."""
        removals = milter.get("remove_headers")
        if isinstance(removals, dict):
            for name, which in removals.items():
                copies = [(n, v) for n, v in ctx.message.headers if n.lower() == str(
                    name).lower()]
                if not isinstance(which, int) or isinstance(which, bool) or which == 0:
                    remove += copies
                elif 0 < which <= len(copies):
                    remove.append(copies[which - 1])
                elif 0 < -which <= len(copies):
                    remove.append(copies[which])
        additions = milter.get("add_headers")
        if isinstance(additions, dict):
            for name, values in additions.items():
                if not _HEADER_NAME.match(str(name)):
                    log.warning("%s: rspamd: header name %r from milter_headers skipped",
                                ctx.queue_id or "NOQUEUE", scanner.printable(name))
                    continue
                for value in values if isinstance(values, list) else [values]:
                    if isinstance(value, dict):
                        value = value.get("value")
                    if isinstance(value, str):
                        headers.append((name, _folded(value)))


def result_header(action, score, required, symbols):
    """X-Spamd-Result as Rspamd's milter_headers writes it: "default: False [0.30 /
    15.00];" then one folded line per symbol, "NAME(score)[options]"."""
    parts = ["default: %s [%.2f / %.2f]" % ("True" if action in SPAM_ACTIONS else "False",
                                           score, required)]
    for name in sorted(symbols):
        symbol = symbols[name] if isinstance(symbols[name], dict) else {}
        options = symbol.get("options") if isinstance(symbol.get("options"), list) else []
        parts.append("%s(%.2f)[%s]" % (scanner.printable(name), _number(
            symbol.get("score")), ",".join(scanner.printable(o, 100) for o in options[:10])))
    return ";\r\n\t".join(parts)


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(
        value, bool) else 0.0


def _folded(value):
    """A header value from Rspamd, its line breaks made folding and controls dropped."""
    lines = [_CONTROL.sub("", line).strip() for line in re.split(r"\r?\n", value)]
    return "\r\n\t".join(line for line in lines if line)


def _encoded(text):
    """A Subject from Rspamd as a header value: RFC 2047 when it is not ASCII."""
    text = _CONTROL.sub(" ", text).strip()
    try:
        text.encode("ascii")
        return text
    except UnicodeEncodeError:
        return email.header.Header(text, "utf-8").encode()
