"""A seeded grammar fuzzer for a live SMTP server: random sessions over real sockets, every
reply checked.

Used by tests/bench/fuzz_sessions.py (`make fuzz`: a million sessions) and by
tests/test_fuzz_live.py (a short run of the same generator in the suite). Session number
K of seed S draws everything from random.Random("S:K"), so `fuzz_sessions.py --seed S
--replay K` plays one session again with its transcript.

A session picks a port (smtp, submission, smtps) and a loopback source address, then a
series of steps from a grammar of SMTP: EHLO/HELO, MAIL and RCPT with valid and broken
addresses and ESMTP parameters, DATA content (dot-stuffing, 8-bit, NULs, bare CR/LF, long
lines, over the size limit), BDAT chunks (good sizes, bad sizes, sizes too big to send),
AUTH PLAIN and LOGIN (right and wrong passwords, bad base64, cancels), STARTTLS (a real
handshake, a handshake cut short, garbage or plaintext where the ClientHello belongs,
commands pipelined behind it), RSET, NOOP, HELP, VRFY, noise lines (NULs, control
characters, 8-bit, lines of 1,000 octets and more), many commands in one write, and early
disconnects (close, reset, half a command) at any point.

The client knows what the server must do with its bytes without knowing its state: in
command mode every line (ended by LF) gets exactly one reply, a BDAT with a valid size is
followed by exactly that many octets and one reply, and a command that may switch mode
(DATA, AUTH, STARTTLS, QUIT) is always the last of a write, so its reply says which mode
follows (354, 334, 220, 221). Checked for every reply: the format (tests/reply_format.py),
that it came (a reply due but missing, the connection closed without a 421 or 221, or no
answer within the timeout), and a few codes that cannot vary (NOOP 250, QUIT 221, EHLO
250, only DATA says 354, only AUTH 334, only STARTTLS 220; 421 ends every session). Bytes
after the 221 of QUIT are a failure too.
"""

import base64
import hashlib
import os
import random
import re
import socket as stdsocket
import ssl as stdssl
import struct

import gevent
from gevent import socket, ssl

from tests.reply_format import MAX_REPLY_LINE, line_problem

HOSTNAME = "mx.test"
USER, PASSWORD = "alice", "wonderland"
MESSAGE_SIZE = 65536            # limits.message_size of the fuzzed server
MAX_RECIPIENTS = 5              # limits.recipients of the fuzzed server
SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")   # .1 alone is mynetworks
CLOSING = (221, 421)

_BDAT_SIZE = re.compile(rb"^BDAT (\d{1,10})( LAST)?$", re.IGNORECASE)


def server_sections(cert, key, credentials, sink_port, workers=2, log_level="info"):
    """The fuzzed server's config sections for tests/harness.py's ElemtaServer: three
    listeners, STARTTLS and smtps with `cert`/`key`, AUTH from `credentials`, small limits
    so their edges are reached cheaply, and everything accepted relayed to a discarding
    smtp-sink on `sink_port`, so a million sessions do not fill the disk (sink_port None:
    no delivery, the accepted mail stays in the spool, for short runs)."""
    delivery = ({"workers": 1, "relayhost": "[127.0.0.1]:%d" % sink_port} if sink_port
                else {"workers": 0})
    return {
        "listeners": [{"mode": "smtp"}, {"mode": "submission"}, {"mode": "smtps"}],
        "smtpd": {"workers": workers},
        "tls": {"cert_file": cert, "key_file": key, "handshake_timeout": 10},
        # The AUTH penalty is for brute force; here it would only slow the fuzzer down.
        "auth": {"credentials_file": credentials, "failure_delay": 0.001,
                 "max_failure_delay": 0.002},
        "limits": {"message_size": MESSAGE_SIZE, "recipients": MAX_RECIPIENTS,
                   "connections_per_client": 500},
        "relay": {"local_domains": ["example.test"], "mynetworks": ["127.0.0.1/32"]},
        "local": {"reject_unknown_users": True},
        "delivery": delivery,
        "api": {"enabled": False},
        "logging": {"level": log_level},
    }


def write_credentials(path):
    """A credentials file for USER in the documented $scrypt$ format (elemta.util.credentials)
    at a low cost (ln=4), so that thousands of AUTH attempts cost the server little CPU."""
    salt = os.urandom(16)
    key = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=16, r=8, p=1, dklen=32)

    def b64(data):
        return base64.b64encode(data).decode().rstrip("=")
    with open(path, "w") as f:
        f.write("%s:$scrypt$ln=4,r=8,p=1$%s$%s\n" % (USER, b64(salt), b64(key)))
    os.chmod(path, 0o644)
    return path


# ---- results --------------------------------------------------------------------------

class Stats:
    """Counters of one client process, added up by the caller."""

    FIELDS = ("sessions", "replies", "reply_lines", "messages_accepted", "tls_handshakes",
              "our_disconnects", "server_closes", "malformed", "missing", "unexpected",
              "client_errors")

    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, 0)
        self.failures = []      # (kind, session id, detail, transcript), the first few

    def add(self, other):
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.extend(other.failures[:20 - len(self.failures)])

    def as_dict(self):
        d = {name: getattr(self, name) for name in self.FIELDS}
        d["failures"] = self.failures
        return d

    @classmethod
    def from_dict(cls, d):
        stats = cls()
        for name in cls.FIELDS:
            setattr(stats, name, d[name])
        stats.failures = [tuple(f) for f in d["failures"]]
        return stats


class Failure(Exception):
    """The server did something a well-behaved server must not: kind is malformed, missing
    or unexpected."""

    def __init__(self, kind, detail):
        super().__init__("%s: %s" % (kind, detail))
        self.kind, self.detail = kind, detail


class Closed(Exception):
    """The server closed the connection (at a reply boundary)."""


class Done(Exception):
    """The session is over (we hung up or the server did, legitimately)."""


# ---- the connection ---------------------------------------------------------------------

class Conn:
    """A client socket that reads replies and checks each one as it arrives."""

    def __init__(self, sock, stats, timeout, transcript):
        self.sock = sock
        self.stats = stats
        self.timeout = timeout
        self.transcript = transcript
        self.buf = bytearray()
        self.closing_reply = None       # the 221 or 421 that ended the session, if any

    def send(self, data):
        self.transcript.append((">", bytes(data[:300]) + (b"..." if len(data) > 300 else b"")))
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            # The server hung up: the replies read next say whether it was allowed.
            self.transcript.append(("*", ("send failed: %r" % exc).encode()))

    def reply(self):
        """(code, [lines]) of one complete reply; raises Closed or Failure."""
        lines = []
        while True:
            line = self._line(partial=bool(lines))
            problem = line_problem(line, lines[-1] if lines else None)
            if problem:
                raise Failure("malformed", problem)
            lines.append(line)
            self.stats.reply_lines += 1
            if line[3:4] == b" ":
                break
        self.stats.replies += 1
        code = int(lines[0][:3])
        self.transcript.append(("<", b"\r\n".join(lines)))
        if code == 421:
            self.closing_reply = code
        return code, lines

    def _line(self, partial):
        while True:
            end = self.buf.find(b"\r\n")
            if 0 <= end:
                if end + 2 > MAX_REPLY_LINE:
                    raise Failure("malformed", "reply line of %d octets: %r"
                                  % (end + 2, bytes(self.buf[:100])))
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if len(self.buf) > MAX_REPLY_LINE:
                raise Failure("malformed", "no CRLF within %d octets: %r"
                              % (MAX_REPLY_LINE, bytes(self.buf[:100])))
            data = self._recv()
            if not data:
                if self.buf or partial:
                    raise Failure("malformed", "reply cut short: %r" % bytes(self.buf))
                raise Closed()
            self.buf += data

    def _recv(self):
        self.sock.settimeout(self.timeout)
        try:
            return self.sock.recv(65536)
        except (socket.timeout, stdsocket.timeout):
            raise Failure("missing", "no reply within %ss" % self.timeout) from None
        except (OSError, ssl.SSLError) as exc:
            self.transcript.append(("*", ("recv failed: %r" % exc).encode()))
            return b""

    def eof_after_close(self):
        """After 221/421 the server must close, with nothing more to say."""
        if self.buf:
            raise Failure("unexpected", "bytes after the closing reply: %r" % bytes(self.buf))
        data = self._recv()
        if data:
            raise Failure("unexpected", "bytes after the closing reply: %r" % data[:200])


# ---- the grammar ------------------------------------------------------------------------

class Cmd:
    """One command line (plus, for BDAT, its chunk): wire bytes, what may follow its reply,
    and the codes it may get (None: any well-formed code)."""

    __slots__ = ("wire", "kind", "codes", "chunk_size")

    def __init__(self, wire, kind="plain", codes=None, chunk_size=None):
        self.wire = wire
        self.kind = kind            # plain, DATA, AUTH, STARTTLS, QUIT, BDAT, EHLO, MAIL, RCPT
        self.codes = codes
        self.chunk_size = chunk_size


def case(rng, word):
    r = rng.random()
    if r < 0.8:
        return word
    if r < 0.9:
        return word.lower()
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in word)


def noise_bytes(rng, n, lf=False):
    """n random octets; no LF unless lf (an LF would end the command early)."""
    data = bytes(rng.getrandbits(8) for _ in range(n))
    return data if lf else data.replace(b"\n", b"_")


DOMAINS = ["relay.test", "far.example", "example.test", HOSTNAME, "[127.0.0.1]",
           "[IPv6:::1]", "sub.domain.test", "xn--bcher-kva.test"]
LOCALS = ["a", "user.name", "u+tag", "\"quoted local\"", "postmaster", "x" * 64, "root",
          "b", "nobody", "o'neil"]


def mailbox(rng, utf8_ok=True):
    r = rng.random()
    if r < 0.75:
        return "%s@%s" % (rng.choice(LOCALS), rng.choice(DOMAINS))
    return rng.choice([
        "x" * 65 + "@long.test", "a@" + "d" * 250 + ".test", "a@b@c.test", "@no.local",
        "nodomain", "a@", "a@-bad-.test", "a..b@dots.test", ".a@dots.test",
        "j\u00f6rg@m\u00fcller.test" if utf8_ok else "jorg@muller.test", "a b@space.test",
        "a@[999.1.1.1]", "a@[IPv6:zz]", "\"unterminated@q.test", "<nested>@x.test",
        "a\\@esc.test", "a@" + "l" * 64 + ".test", "a@b.test.", "A@B.TEST"])


XTEXT = ["batch+2B42", "abc", "+00", "+ZZ", "+", "a+2", "x" * 120, "caf\u00e9", ""]


def mail_params(rng):
    chosen = []
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3, 5))):
        chosen.append(rng.choice([
            "SIZE=%d" % rng.randint(0, MESSAGE_SIZE), "SIZE=%d" % (MESSAGE_SIZE + 1),
            "SIZE=99999999999999999999999", "SIZE=-1", "SIZE=", "SIZE", "SIZE=1e3",
            "BODY=8BITMIME", "BODY=7BIT", "BODY=BINARYMIME", "BODY=", "body=8bitmime",
            "SMTPUTF8", "SMTPUTF8=yes", "RET=FULL", "RET=HDRS", "RET=ALL",
            "ENVID=" + rng.choice(XTEXT), "AUTH=<>", "AUTH=a+40b.test", "AUTH",
            "FOO=bar", "=x", "X-UNKNOWN", "SIZE=10 SIZE=20"]))
    return "".join(" " + p for p in chosen)


def rcpt_params(rng):
    chosen = []
    for _ in range(rng.choice((0, 0, 0, 1, 2))):
        chosen.append(rng.choice([
            "NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=DELAY", "NOTIFY=NEVER,SUCCESS",
            "NOTIFY=", "NOTIFY=BOGUS", "ORCPT=rfc822;a@b.test", "ORCPT=rfc822;" +
            rng.choice(XTEXT), "ORCPT=utf-8;a@b.test", "ORCPT=x", "ORCPT=rfc822;+0D+0Ax",
            "FOO=1", "NOTIFY"]))
    return "".join(" " + p for p in chosen)


def path(rng, keyword, address, params):
    r = rng.random()
    if r < 0.85:
        text = "%s:<%s>%s" % (keyword, address, params)
    else:
        text = rng.choice([
            "%s:%s%s" % (keyword, address, params), "%s: <%s>%s" % (keyword, address, params),
            "%s:<%s%s" % (keyword, address, params), "%s<%s>" % (keyword, address),
            "%s:<@route.test:%s>" % (keyword, address), "%s:" % keyword, keyword,
            "%s:<>%s" % (keyword, params), "%s:<%s> %s" % (keyword, address, "x" * 990)])
    return text


def ehlo(rng):
    verb = "EHLO" if rng.random() < 0.8 else "HELO"
    if rng.random() < 0.9:
        arg = rng.choice(["client.test", "[127.0.0.1]", "localhost", "x", "a.b.c.d.e.test"])
        return Cmd(("%s %s\r\n" % (case(rng, verb), arg)).encode(), "EHLO", codes={250, 421})
    arg = rng.choice(["", " ", "x" * 300, "\u00e9t\u00e9.test", "a b c", "[1.2.3.4"])
    return Cmd(("%s %s\r\n" % (case(rng, verb), arg)).encode("utf-8"), "EHLO")


def mail_cmd(rng):
    sender = "" if rng.random() < 0.1 else mailbox(rng)
    text = case(rng, "MAIL") + " " + path(rng, case(rng, "FROM"), sender, mail_params(rng))
    return Cmd(text.encode("utf-8") + b"\r\n", "MAIL")


def rcpt_cmd(rng):
    address = "postmaster" if rng.random() < 0.03 else mailbox(rng)
    text = case(rng, "RCPT") + " " + path(rng, case(rng, "TO"), address, rcpt_params(rng))
    return Cmd(text.encode("utf-8") + b"\r\n", "RCPT")


def simple_cmd(rng):
    return rng.choice([
        Cmd(case(rng, "NOOP").encode() + b"\r\n", codes={250, 421}),
        Cmd(b"NOOP anything at all\r\n", codes={250, 421}),
        Cmd(case(rng, "RSET").encode() + b"\r\n", "RSET", codes={250, 421}),
        Cmd(b"RSET now\r\n"),
        Cmd(case(rng, "HELP").encode() + b"\r\n", codes={214, 421}),
        Cmd(b"VRFY postmaster\r\n"), Cmd(b"VRFY\r\n"), Cmd(b"EXPN staff\r\n"),
        Cmd(b"ETRN relay.test\r\n"), Cmd(b"TURN\r\n"), Cmd(b"DATA now\r\n"),
        Cmd(b"STARTTLS now\r\n"), Cmd(b"BDAT\r\n"), Cmd(b"BDAT x LAST\r\n"),
        Cmd(b"BDAT -1\r\n"), Cmd(b"BDAT 12345678901\r\n"), Cmd(b"BDAT 1 LAST extra\r\n"),
        Cmd(b"QUIT now please\r\n", "QUIT"),
    ])


def noise_cmd(rng):
    """A line of noise: it must get one reply (500 or so) and never a traceback."""
    r = rng.random()
    if r < 0.25:
        body = noise_bytes(rng, rng.randint(0, 60))
    elif r < 0.4:
        # No Q: a line starting "QUIT " would end the session where no reply says so.
        body = bytes(rng.choice(b"ABCDEFGHIJKLMNOPRSTUVWXYZ :<>@.=") for _ in range(40))
    elif r < 0.55:
        body = b"MAIL FROM:<" + b"a" * rng.choice((980, 990, 995, 996, 997, 998, 999, 1200,
                                                   5000, 70000)) + b"@x.test>"
    elif r < 0.65:
        body = rng.choice([b"\x00", b"NOOP\x00", b"MAIL FROM:<a\x00@b.test>", b"\x00" * 50])
    elif r < 0.75:
        body = rng.choice([b"MAIL FROM:<\xff@b.test>", b"RCPT TO:<\xc3\xa9@b.test>",
                           b"EHLO \xc3", b"\xe2\x80\x8bNOOP", b"NOOP \xed\xa0\x80"])
    elif r < 0.85:
        body = rng.choice([b"NOOP\rRSET", b"NO\tOP", b"MAIL FROM:<a@b.test>\x7f",
                           b"\x1b[31mHELO x", b"\r", b"\r\r"])
    else:
        body = rng.choice([b"", b" ", b".", b"..", b"*", b"=", b"\t", b"   EHLO x",
                           b"GET / HTTP/1.1", b"\x16\x03\x01\x00\xa5"])
    end = b"\n" if rng.random() < 0.15 else b"\r\n"
    return Cmd(body + end)


def auth_cmd(rng):
    mech = rng.choice(["PLAIN", "PLAIN", "LOGIN", "LOGIN", "CRAM-MD5", "XOAUTH2", ""])
    r = rng.random()
    if not mech or r < 0.4:
        initial = ""
    elif mech == "PLAIN":
        initial = " " + auth_response(rng, "PLAIN").decode("latin-1")
    else:
        initial = " " + rng.choice([b64(USER), b64("nobody"), "!!", "=", "a b"])
    return Cmd(("%s %s%s\r\n" % (case(rng, "AUTH"), case(rng, mech), initial))
               .encode("latin-1"), "AUTH")


def b64(text):
    return base64.b64encode(text.encode("utf-8") if isinstance(text, str) else text).decode()


def auth_response(rng, mechanism, step=0):
    """The client's answer to a 334 (or a PLAIN initial response)."""
    r = rng.random()
    if r < 0.08:
        return b"*"
    if r < 0.16:
        return rng.choice([b"!!!notbase64", b"abc", b"====", b"", b"\xc3\xa9", b"YWJj ZA==",
                           b"A" * 1200, b"MAIL FROM:<a@b.test>"])
    if mechanism == "PLAIN":
        # Unknown users cost the server a full-strength scrypt (a dummy verify): rarely.
        user = USER if rng.random() < 0.98 else "mallory"
        password = PASSWORD if rng.random() < 0.5 else "guess"
        return b64(rng.choice(["\0%s\0%s" % (user, password), "%s\0%s\0%s" % (user, user,
                                                                               password),
                               "other\0%s\0%s" % (user, password), "\0\0x", "noseparators",
                               b"\0alice\0\xff"])).encode()
    return b64(USER if step == 0 else rng.choice([PASSWORD, "guess"])).encode()


def content(rng):
    """DATA content with its dot-stuffing, without the final CRLF.CRLF; never contains
    CRLF.CRLF itself (that would end the data early)."""
    lines = []
    if rng.random() < 0.8:
        lines += [b"From: a@client.test", b"To: b@relay.test", b"Subject: fuzz %d"
                  % rng.randint(0, 10 ** 6), b""]
    for _ in range(rng.choice((0, 1, 2, 5, 20, 50))):
        r = rng.random()
        if r < 0.5:
            line = bytes(rng.choice(b"abcdefghij .,:-") for _ in range(rng.randint(0, 78)))
        elif r < 0.6:
            line = rng.choice([b".", b"..", b". ", b".x", b"...", b"-- ", b"From x"])
        elif r < 0.7:
            line = "caf\u00e9 na\u00efve \u4e2d\u6587".encode() if rng.random() < 0.7 \
                else noise_bytes(rng, 30)
        elif r < 0.75:
            line = b"nul\x00here"
        elif r < 0.8:
            line = b"bare\nlf" if rng.random() < 0.5 else b"bare\rcr"
        elif r < 0.85:
            line = b"y" * rng.choice((998, 1000, 5000))
        else:
            line = noise_bytes(rng, rng.randint(1, 100), lf=True)
        lines.append(line)
    if rng.random() < 0.03:
        lines.append(b"z" * (MESSAGE_SIZE + rng.randint(1, 3000)))     # over the limit
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    body = b"\r\n".join(stuffed)
    # Noise may hold CRLF: keep every CRLF.CRLF and a leading ".CRLF" from ending it early.
    while b"\r\n.\r\n" in body:
        body = body.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    if body.startswith(b".\r\n") or body == b".":
        body = b"." + body
    if body.endswith(b"\r\n."):
        body += b"x"
    return body


def chunk(rng):
    r = rng.random()
    if r < 0.7:
        n = rng.choice((0, 1, 2, 10, 100, 1000, 4000))
    elif r < 0.9:
        n = rng.randint(0, 20000)
    else:
        n = MESSAGE_SIZE + rng.randint(1, 2000)
    if rng.random() < 0.5:
        return bytes(rng.choice(b"abc\r\n. ") for _ in range(n))
    return noise_bytes(rng, n, lf=True)


def bdat_cmd(rng, last):
    data = chunk(rng)
    head = "%s %d%s" % (case(rng, "BDAT"), len(data), " " + case(rng, "LAST") if last else "")
    return Cmd(head.encode() + b"\r\n" + data, "BDAT", chunk_size=len(data))


# ---- one session ------------------------------------------------------------------------

class Session:
    """One fuzzed session, driven step by step from its own random generator."""

    def __init__(self, rng, ports, stats, timeout, session_id):
        self.rng = rng
        self.ports = ports
        self.stats = stats
        self.timeout = timeout
        self.id = session_id
        self.transcript = []
        self.conn = None
        self.tls = False
        self.greeted = False
        self.in_txn = False
        self.rcpts = 0
        self.chunking = False

    def run(self):
        rng = self.rng
        mode = rng.choices(("smtp", "submission", "smtps"), (80, 10, 10))[0]
        source = rng.choice(SOURCES)
        try:
            sock = socket.create_connection(("127.0.0.1", self.ports[mode]), timeout=self.timeout,
                                            source_address=(source, 0))
        except OSError as exc:
            self.stats.client_errors += 1
            self._record("client_error", "connect to %s: %s" % (mode, exc))
            return
        self.transcript.append(("*", ("%s from %s" % (mode, source)).encode()))
        self.conn = Conn(sock, self.stats, self.timeout, self.transcript)
        try:
            try:
                if mode == "smtps":
                    self._implicit_tls()
                self._greeting()
                for _ in range(rng.choice((1, 2, 3, 5, 8, 12, 20))):
                    self._step()
                self._finish()
            except Done:
                pass
            except Closed:
                if self.conn.closing_reply is None:
                    raise Failure("missing", "connection closed while a reply was due")
                self.stats.server_closes += 1
        except Failure as exc:
            setattr(self.stats, exc.kind, getattr(self.stats, exc.kind) + 1)
            self._record(exc.kind, exc.detail)
        finally:
            self.stats.sessions += 1
            try:
                self.conn.sock.close()
            except OSError:
                pass

    def _record(self, kind, detail):
        if len(self.stats.failures) < 20:
            self.stats.failures.append((kind, self.id, detail, [
                (d, t.decode("latin-1")) for d, t in self.transcript[-40:]]))

    # ---- plumbing ----

    def _replies(self, cmds, send=True):
        """Send cmds in one write; read and check one reply per command. Returns the
        last (cmd, code); raises Done when the server ended the session on the way."""
        if send:
            self.conn.send(b"".join(c.wire for c in cmds))
        code = None
        for cmd in cmds:
            try:
                code, lines = self.conn.reply()
            except Closed:
                if self.conn.closing_reply is not None:
                    self.stats.server_closes += 1
                    raise Done() from None
                raise Failure("missing", "no reply to %r: connection closed"
                              % cmd.wire[:80]) from None
            self._check(cmd, code, lines)
            if code in CLOSING:
                self.conn.closing_reply = code
                self.conn.eof_after_close()
                self.stats.server_closes += 1
                raise Done()
            self._track(cmd, code)
        return cmds[-1], code

    def _check(self, cmd, code, lines):
        if code == 421:
            return      # the server may hang up on any command (errors, junk, shutdown)
        if cmd.codes is not None and code not in cmd.codes:
            raise Failure("unexpected", "%d to %r (expected one of %s)"
                          % (code, cmd.wire[:80], sorted(cmd.codes)))
        only = {354: "DATA", 334: "AUTH", 220: "STARTTLS", 235: "AUTH", 221: "QUIT"}
        if code in only and cmd.kind != only[code]:
            raise Failure("unexpected", "%d to %r" % (code, cmd.wire[:80]))
        if cmd.kind == "QUIT" and code not in (221, 421, 501):
            raise Failure("unexpected", "%d to QUIT" % code)

    def _track(self, cmd, code):
        """Follow the server's state from its replies (for choosing sensible next steps)."""
        kind = cmd.kind
        if kind == "EHLO" and code == 250:
            self.greeted, self.in_txn, self.rcpts, self.chunking = True, False, 0, False
        elif kind == "MAIL" and code == 250:
            self.in_txn, self.rcpts = True, 0
        elif kind == "RCPT" and code == 250:
            self.rcpts += 1
        elif kind == "RSET" and code == 250:
            self.in_txn, self.rcpts, self.chunking = False, 0, False
        elif kind == "BDAT":
            if code == 250 and b" LAST" in cmd.wire.split(b"\r\n", 1)[0].upper():
                self.stats.messages_accepted += 1
                self.in_txn, self.rcpts, self.chunking = False, 0, False
            elif code == 250:
                self.chunking = True
            else:
                self.in_txn, self.rcpts, self.chunking = False, 0, False

    def _hang_up(self, how=None):
        """An early disconnect of ours: close, reset, or half a command first."""
        rng = self.rng
        how = how or rng.choice(("close", "reset", "partial", "shut_wr"))
        if how == "shut_wr" and self.tls:
            how = "close"       # SSLSocket.shutdown() drops TLS: we would read raw records
        sock = self.conn.sock
        self.stats.our_disconnects += 1
        self.transcript.append(("*", b"we hang up: " + how.encode()))
        if how == "partial":
            self.conn.send(rng.choice([b"MAIL FROM:<a@b.te", b"EHLO", b"\x00\xff", b"RCPT",
                                       b"x" * 3000]))
        if how == "reset":
            sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "shut_wr":
            # Half-close: whatever the server still says must be well formed.
            try:
                sock.shutdown(stdsocket.SHUT_WR)
                while True:
                    self.conn.reply()
            except (Closed, OSError):
                pass
        raise Done()

    # ---- the grammar's top level ----

    def _implicit_tls(self):
        rng = self.rng
        r = rng.random()
        if r < 0.9:
            self._handshake()
        elif r < 0.95:
            self.conn.send(b"EHLO plaintext.test\r\n")      # no TLS into a TLS port
            self._hang_up("close")
        else:
            self._cut_handshake()

    def _greeting(self):
        code, lines = self.conn.reply()
        if code == 421:
            self.conn.eof_after_close()
            raise Done()
        if code != 220 or not lines[0].startswith(b"220 " + HOSTNAME.encode()):
            raise Failure("unexpected", "greeting %r" % lines[0])

    def _step(self):
        rng = self.rng
        if rng.random() < 0.03:
            self._hang_up()
        if not self.greeted and rng.random() < 0.8:
            return self._replies([ehlo(rng)])
        choice = rng.choices(
            ("transaction", "mail", "rcpt", "data", "bdat", "auth", "starttls", "simple",
             "noise", "pipeline", "ehlo"),
            (30, 4, 4, 3, 3, 8, 8, 8, 10, 8, 3))[0]
        getattr(self, "_step_" + choice)()

    def _step_ehlo(self):
        self._replies([ehlo(self.rng)])

    def _step_mail(self):
        self._replies([mail_cmd(self.rng)])

    def _step_rcpt(self):
        self._replies([rcpt_cmd(self.rng)])

    def _step_simple(self):
        self._replies([simple_cmd(self.rng)])

    def _step_noise(self):
        self._replies([noise_cmd(self.rng) for _ in range(self.rng.randint(1, 4))])

    def _step_data(self):
        self._data([])

    def _step_bdat(self):
        self._bdat([])

    def _step_pipeline(self):
        """Many commands of all kinds in one write; a mode-switching one only last."""
        rng = self.rng
        cmds = [rng.choice((ehlo, mail_cmd, rcpt_cmd, simple_cmd, noise_cmd))(rng)
                for _ in range(rng.randint(2, 12))]
        cmds = [c for c in cmds if c.kind != "QUIT"] or [noise_cmd(rng)]
        if rng.random() < 0.3:
            cmds.append(bdat_cmd(rng, last=rng.random() < 0.5))
        last = rng.random()
        if last < 0.15:
            return self._data(cmds)
        if last < 0.2:
            cmds.append(Cmd(b"QUIT\r\n", "QUIT"))
        self._replies(cmds)

    def _step_transaction(self):
        """A mostly valid transaction, pipelined or one command at a time."""
        rng = self.rng
        cmds = [] if self.greeted and rng.random() < 0.7 else [ehlo(rng)]
        sender = "" if rng.random() < 0.05 else "%s@client.test" % rng.choice(LOCALS[:4])
        cmds.append(Cmd(("MAIL FROM:<%s>%s\r\n" % (
            sender, mail_params(rng) if rng.random() < 0.3 else "")).encode(), "MAIL"))
        for _ in range(rng.choice((1, 1, 1, 2, 3, MAX_RECIPIENTS + 1))):
            address = ("%s@%s" % (rng.choice(("b", "c", "d")), rng.choice(
                ("relay.test", "far.example"))) if rng.random() < 0.9 else mailbox(rng))
            params = rcpt_params(rng) if rng.random() < 0.2 else ""
            cmds.append(Cmd(("RCPT TO:<%s>%s\r\n" % (address, params)).encode("utf-8"), "RCPT"))
        pipelined = rng.random() < 0.7
        if not pipelined:
            for cmd in cmds:
                self._replies([cmd])
            cmds = []
        if rng.random() < 0.7:
            self._data(cmds)
        else:
            self._bdat(cmds)

    def _data(self, cmds):
        rng = self.rng
        cmds = cmds + [Cmd(case(rng, "DATA").encode() + b"\r\n", "DATA")]
        _, code = self._replies(cmds)
        if code != 354:
            return
        body = content(rng) + b"\r\n.\r\n"
        if rng.random() < 0.05:
            cut = rng.randint(0, len(body) - 1)
            self.conn.send(body[:cut])
            self._hang_up(rng.choice(("close", "reset")))
        # Sent in a few pieces, so the terminator is sometimes split across reads.
        cuts = min(len(body) - 1, rng.choice((0, 0, 1, 3)))
        pieces = sorted(rng.sample(range(1, len(body)), cuts))
        for start, end in zip([0] + pieces, pieces + [len(body)]):
            self.conn.send(body[start:end])
            if pieces:
                gevent.sleep(0)
        code, _ = self._after_content(Cmd(b"", "END"))
        if code == 250:
            self.stats.messages_accepted += 1
        self.in_txn, self.rcpts = False, 0

    def _after_content(self, cmd):
        try:
            code, lines = self.conn.reply()
        except Closed:
            if self.conn.closing_reply is not None:
                raise Done() from None
            raise Failure("missing", "no reply after the message content") from None
        self._check(cmd, code, lines)
        if code in CLOSING:
            self.conn.eof_after_close()
            self.stats.server_closes += 1
            raise Done()
        return code, lines

    def _bdat(self, cmds):
        rng = self.rng
        chunks = rng.choice((1, 1, 2, 3))
        for i in range(chunks):
            cmds.append(bdat_cmd(rng, last=i == chunks - 1 and rng.random() < 0.9))
        r = rng.random()
        if r < 0.04:
            # A size the client will never send: hang up partway through the chunk.
            cmds.append(Cmd(b"BDAT %d LAST\r\n" % rng.choice((MESSAGE_SIZE * 3, 9999999999))
                            + b"x" * rng.randint(0, 5000), "BDAT"))
            self.conn.send(b"".join(c.wire for c in cmds))
            self._hang_up(rng.choice(("close", "reset")))
        if r < 0.08:
            cmds.append(Cmd(b"BDAT 10 LAST\r\nshort", "BDAT"))     # cut inside the chunk
            self.conn.send(b"".join(c.wire for c in cmds))
            self._hang_up(rng.choice(("close", "reset")))
        self._replies(cmds)

    def _step_auth(self):
        rng = self.rng
        cmd = auth_cmd(rng)
        mechanism = cmd.wire.split(b" ")[1].strip().upper().decode("latin-1")
        _, code = self._replies([cmd])
        step = 1 if b" " in cmd.wire.strip()[5:] and mechanism == "LOGIN" else 0
        while code == 334:
            if rng.random() < 0.05:
                self._hang_up()
            answer = Cmd(auth_response(rng, mechanism, step) + b"\r\n", "AUTH")
            step += 1
            _, code = self._replies([answer])
        if code == 235:
            self.in_txn = False

    def _step_starttls(self):
        rng = self.rng
        if not self.greeted and rng.random() < 0.7:
            self._replies([ehlo(rng)])
        cmd = Cmd(case(rng, "STARTTLS").encode() + b"\r\n", "STARTTLS")
        # CVE-2011-0411: commands pipelined behind STARTTLS must not be obeyed after a 220;
        # after a refusal they are ordinary commands, each with its reply.
        injected = [] if rng.random() < 0.9 else rng.choice(
            [[Cmd(b"HELP\r\n", codes={214, 421})],
             [Cmd(b"VRFY x\r\n"), Cmd(b"HELP\r\n", codes={214, 421})]])
        cmd.wire += b"".join(c.wire for c in injected)
        _, code = self._replies([cmd])
        if code != 220:
            if injected:
                self._replies(injected, send=False)
            return
        r = rng.random()
        if r < 0.7:
            self._handshake(tolerate_failure=bool(injected))
            self.greeted, self.in_txn, self.rcpts = False, False, 0
        elif r < 0.8:
            self.conn.send(rng.choice([b"EHLO after.starttls\r\n", noise_bytes(rng, 200),
                                       b"\x16\x03\x01\x02\x00" + noise_bytes(rng, 100)]))
            self._hang_up("close")
        elif r < 0.9:
            self._cut_handshake()
        else:
            self._hang_up(rng.choice(("close", "reset")))

    def _client_context(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def _handshake(self, tolerate_failure=False):
        sock = self.conn.sock
        try:
            sock.settimeout(self.timeout)
            self.conn.sock = self._client_context().wrap_socket(sock, server_hostname=HOSTNAME)
        except (OSError, ssl.SSLError) as exc:
            if tolerate_failure:
                # The injected bytes reached the server after it began the handshake.
                self.stats.our_disconnects += 1
                raise Done() from None
            raise Failure("missing", "TLS handshake failed: %s" % exc) from None
        self.tls = True
        self.stats.tls_handshakes += 1
        self.transcript.append(("*", b"TLS on"))
        if tolerate_failure:
            # Were the injected commands obeyed, their replies would come before EHLO's.
            self._replies([Cmd(b"EHLO tls.test\r\n", "EHLO", codes={250, 421})])

    def _cut_handshake(self):
        """Send part of a real ClientHello, then hang up."""
        incoming, outgoing = stdssl.MemoryBIO(), stdssl.MemoryBIO()
        context = stdssl.SSLContext(stdssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, stdssl.CERT_NONE
        tls = context.wrap_bio(incoming, outgoing)
        try:
            tls.do_handshake()
        except stdssl.SSLWantReadError:
            pass
        hello = outgoing.read()
        self.conn.send(hello[:self.rng.randint(0, len(hello) - 1)])
        self._hang_up(self.rng.choice(("close", "reset")))

    def _finish(self):
        rng = self.rng
        if rng.random() < 0.75:
            self._replies([Cmd(case(rng, "QUIT").encode() + b"\r\n", "QUIT", codes={221})])
            raise Failure("unexpected", "QUIT did not end the session")
        self._hang_up()


def run_sessions(ports, seed, indexes, concurrency, timeout, stats=None):
    """Run the sessions numbered `indexes` (an iterator) against `ports` ({mode: port}),
    `concurrency` at a time, in gevent greenlets; returns the Stats."""
    from gevent.pool import Pool
    stats = stats or Stats()
    pool = Pool(concurrency)

    def one(index):
        rng = random.Random("%s:%d" % (seed, index))
        try:
            Session(rng, ports, stats, timeout, index).run()
        except Exception as exc:        # a fuzzer bug, not the server's: count it, go on
            stats.client_errors += 1
            if len(stats.failures) < 20:
                stats.failures.append(("client_error", index, repr(exc), []))

    for index in indexes:
        pool.spawn(one, index)
    pool.join()
    return stats


def replay(ports, seed, index, timeout=30):
    """Play session `index` of `seed` once; returns (Stats, transcript)."""
    stats = Stats()
    session = Session(random.Random("%s:%d" % (seed, index)), ports, stats, timeout, index)
    session.run()
    return stats, session.transcript

