"""A client of Dovecot's authentication protocol, for SMTP AUTH (auth.backend dovecot).

Owned by the smtpd worker: one DovecotAuth per worker, one connection to Dovecot's
auth-client socket (a unix socket or inet:host:port) shared by every session. Requests
are multiplexed by id, as Dovecot's own login processes do: Dovecot delays each failure
(auth_failure_delay, 2 s by default), and a connection serialized by a lock would make
every other client of the worker wait for that guesser. One reader greenlet reads the
replies and hands each to the session waiting for its id. A lost or unusable
connection fails every request under way as temporary (454 4.7.0, never 535) and is
made again on the next request, at most once per RETRY_DELAY.

The protocol (Dovecot auth protocol 1.x): the client sends VERSION and CPID, the server
VERSION, MECH lines, SPID, CUID, COOKIE and DONE; then
  AUTH <id> <mech> service=smtp [secured] nologin lip=.. rip=.. [resp=<base64>]
answered by CONT <id> <base64> (the client answers CONT <id> <base64>), OK <id> user=..
or FAIL <id> [reason=..] [temp]. Lines are TAB-separated. Every value Elemta sends is a
number, a fixed word, an IP address or base64, so no client data can add a field or a
line; what comes back is unescaped (Dovecot's tab-escaping) and the login name refused
if it holds a control character.
See also: elemta.smtpd.authn (the Authenticator that uses it), Postfix's
xsasl_dovecot_server.c (smtpd_sasl_type = dovecot).
"""

import base64
import ipaddress
import itertools
import logging
import os
import time
import unicodedata
from typing import Dict, Optional, Tuple

import gevent
from gevent import socket
from gevent.event import AsyncResult
from gevent.lock import Semaphore

from elemta.smtpd.authresult import FAIL, OK, TEMPFAIL, UNSUPPORTED, AuthResult

log = logging.getLogger("elemta.smtpd")

CONNECT_TIMEOUT = 5.0       # seconds to connect and finish the handshake
REQUEST_TIMEOUT = 30.0      # seconds for one AUTH (a slow passdb: LDAP, SQL)
RETRY_DELAY = 1.0           # seconds between attempts to connect while Dovecot is away
MAX_LINE = 16384            # the protocol's expected line bound (auth protocol 1.3)
MAX_USERNAME_BYTES = 255    # RFC 4616: authcid is at most 255 octets


class DovecotProtocolError(Exception):
    """The auth server said something this client cannot use; the connection is dropped."""


# Dovecot's tab-escaping (lib/strescape.c): \001 then 0 NUL, 1 \001, t TAB, r CR, n LF.
_UNESCAPES = {"0": "\0", "1": "\001", "t": "\t", "r": "\r", "n": "\n"}


def tab_unescape(value):
    """A parameter value as Dovecot meant it (\\001 + x; an unknown x stands for itself)."""
    if "\001" not in value:
        return value
    out, chars = [], iter(value)
    for char in chars:
        if char == "\001":
            char = next(chars, "")
            char = _UNESCAPES.get(char, char)
        out.append(char)
    return "".join(out)


def parse_params(fields):
    """{name: unescaped value} of optional parameters; a boolean one maps to True."""
    params = {}
    for field in fields:
        name, eq, value = field.partition("=")
        params[name] = tab_unescape(value) if eq else True
    return params


def login_name_error(user):
    """Why a login name from Dovecot cannot be recorded, or None if it can."""
    if not user:
        return "empty user name"
    if len(user.encode("utf-8", "surrogateescape")) > MAX_USERNAME_BYTES:
        return "user name longer than %d bytes" % MAX_USERNAME_BYTES
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in user):
        return "user name with a control character"
    return None


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _ip(value):
    """value if it is an IP address (so it cannot carry a TAB), else None."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


class _Request:
    """One AUTH under way: the responses still to send on CONT, and the reply slot."""

    def __init__(self, responses):
        self.responses = list(responses)
        self.result = AsyncResult()


class DovecotAuth:
    """The worker's connection to Dovecot's auth service (see the module docstring)."""

    def __init__(self, address, connect_timeout=CONNECT_TIMEOUT,
                 request_timeout=REQUEST_TIMEOUT):
        """address: ("unix", path, None) or ("inet", host, port)
        (elemta.config.schema.parse_dovecot_socket)."""
        self.address = address
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._sock = None
        self._reader = None
        self._mechanisms: Optional[Tuple[str, ...]] = None
        self._pending: Dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._connecting = Semaphore()
        self._writing = Semaphore()
        self._next_attempt = 0.0
        self._last_error = ""

    @property
    def where(self):
        kind, host, port = self.address
        return host if kind == "unix" else "inet:%s:%d" % (host, port)

    # ---- what the sessions call -------------------------------------------------------

    def mechanisms(self):
        """Dovecot's mechanisms (upper case) as of the last handshake, or None while
        they are unknown (never connected). Never waits: a connection is started in
        the background when there is none."""
        if self._sock is None and not self._connecting.locked():
            gevent.spawn(self._connected)
        return self._mechanisms

    def authenticate(self, mechanism, username, password, local_ip, remote_ip, secured):
        """Ask Dovecot about PLAIN or LOGIN credentials; an AuthResult."""
        if not self._connected():
            return AuthResult(TEMPFAIL, reason="cannot connect to %s: %s"
                              % (self.where, self._last_error))
        if mechanism not in self._mechanisms:
            return AuthResult(UNSUPPORTED, reason="Dovecot does not offer %s" % mechanism)
        user = username.encode("utf-8", "surrogateescape")
        secret = password.encode("utf-8", "surrogateescape")
        if mechanism == "PLAIN":
            # No authorization identity: the protocol core refused one that differs.
            initial, responses = b"\0" + user + b"\0" + secret, ()
        else:   # LOGIN: Dovecot asks "Username:" then "Password:" with CONT
            initial, responses = None, (user, secret)
        fields = ["AUTH", None, mechanism, "service=smtp", "nologin"]
        if secured:
            fields.append("secured")
        for name, value in (("lip", _ip(local_ip)), ("rip", _ip(remote_ip))):
            if value:
                fields.append("%s=%s" % (name, value))
        if initial is not None:
            fields.append("resp=" + _b64(initial))
        return self._request(fields, responses)

    def close(self):
        self._drop("closed")

    # ---- requests ---------------------------------------------------------------------

    def _request(self, fields, responses):
        request_id = next(self._ids)
        fields[1] = str(request_id)
        request = _Request(responses)
        self._pending[request_id] = request
        try:
            self._send("\t".join(fields))
            return request.result.get(timeout=self.request_timeout)
        except gevent.Timeout:
            return AuthResult(TEMPFAIL, reason="no answer from %s within %gs"
                              % (self.where, self.request_timeout))
        except OSError as error:
            self._drop("write failed: %s" % (error.strerror or error))
            return AuthResult(TEMPFAIL, reason="lost the connection to %s" % self.where)
        finally:
            self._pending.pop(request_id, None)

    def _send(self, line):
        sock = self._sock
        if sock is None:
            raise ConnectionResetError("not connected")
        with self._writing:
            sock.sendall(line.encode("ascii") + b"\n")

    def _on_reply(self, command, fields):
        """One OK, FAIL or CONT line from the reader."""
        if not fields or not (fields[0].isascii() and fields[0].isdigit()):
            raise DovecotProtocolError("%s without a request id" % command)
        request = self._pending.get(int(fields[0]))
        if request is None:
            return                  # timed out meanwhile: nobody waits for it
        if command == "CONT":
            if not request.responses:
                request.result.set(AuthResult(TEMPFAIL, reason="Dovecot asked for more "
                                              "than PLAIN or LOGIN sends"))
                self._pending.pop(int(fields[0]), None)
                return
            self._send("CONT\t%s\t%s" % (fields[0], _b64(request.responses.pop(0))))
            return
        params = parse_params(fields[1:])
        if command == "OK":
            user = params.get("user")
            problem = login_name_error(user) if isinstance(user, str) else "no user name"
            if problem:
                log.error("Dovecot auth at %s said OK with an unusable login name (%s): "
                          "refused", self.where, problem)
                request.result.set(AuthResult(TEMPFAIL, reason="unusable login name "
                                              "from Dovecot"))
            else:
                request.result.set(AuthResult(OK, user=user))
            return
        reason = params.get("reason")
        reason = reason if isinstance(reason, str) else ""
        outcome = TEMPFAIL if "temp" in params or params.get("code") == "temp_fail" else FAIL
        if outcome == TEMPFAIL and not reason:
            reason = "Dovecot reports a temporary failure (its log says why)"
        request.result.set(AuthResult(outcome, reason=reason))

    # ---- the connection ---------------------------------------------------------------

    def _connected(self):
        """True once there is a connection (made now if needed and not too soon after
        the last failed attempt); waits for an attempt another greenlet is making."""
        if self._sock is not None:
            return True
        with self._connecting:
            if self._sock is not None:
                return True
            if time.monotonic() < self._next_attempt:
                return False
            try:
                self._connect()
                return True
            except (OSError, DovecotProtocolError, gevent.Timeout) as error:
                self._next_attempt = time.monotonic() + RETRY_DELAY
                if isinstance(error, gevent.Timeout):
                    why = "no handshake within %gs" % self.connect_timeout
                else:
                    why = getattr(error, "strerror", None) or str(error)
                if why != self._last_error:
                    log.warning("cannot use Dovecot auth at %s: %s", self.where, why)
                self._last_error = why
                return False

    def _connect(self):
        kind, host, port = self.address
        sock = None
        try:
            with gevent.Timeout(self.connect_timeout):
                if kind == "unix":
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.connect(host)
                else:
                    sock = socket.create_connection((host, port))
                reader = _AuthLineReader(sock)
                sock.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
                mechanisms = self._handshake(reader)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self._sock, self._mechanisms = sock, mechanisms
        self._last_error = ""
        self._reader = gevent.spawn(self._read_replies, sock, reader)
        log.info("connected to Dovecot auth at %s: mechanisms %s", self.where,
                 " ".join(mechanisms) or "(none)")
        if "PLAIN" not in mechanisms and "LOGIN" not in mechanisms:
            log.warning("Dovecot auth at %s offers neither PLAIN nor LOGIN: no AUTH is "
                        "offered (add them to Dovecot's auth_mechanisms)", self.where)

    @staticmethod
    def _handshake(reader):
        """Read the server's handshake up to DONE; Dovecot's mechanisms."""
        mechanisms = []
        version_seen = False
        while True:
            line = reader.line()
            if line is None:
                raise DovecotProtocolError("connection closed during the handshake")
            command, _, rest = line.partition("\t")
            fields = rest.split("\t") if rest else []
            if command == "VERSION":
                if not fields or fields[0] != "1":
                    raise DovecotProtocolError("unsupported auth protocol version %s"
                                        % ".".join(fields))
                version_seen = True
            elif command == "MECH" and fields:
                mechanisms.append(fields[0].upper())
            elif command == "DONE":
                if not version_seen:
                    raise DovecotProtocolError("handshake without VERSION")
                return tuple(mechanisms)
            # SPID, CUID, COOKIE and anything newer: not needed for SMTP AUTH.

    def _read_replies(self, sock, reader):
        """The reader greenlet: dispatch replies until the connection ends."""
        why = "connection closed by Dovecot"
        try:
            while True:
                line = reader.line()
                if line is None:
                    break
                command, _, rest = line.partition("\t")
                if command in ("OK", "FAIL", "CONT"):
                    self._on_reply(command, rest.split("\t") if rest else [])
        except (OSError, DovecotProtocolError) as error:
            why = getattr(error, "strerror", None) or str(error)
        if self._sock is sock:
            self._drop(why)

    def _drop(self, why):
        """Forget the connection; every request under way fails temporarily."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        log.warning("connection to Dovecot auth at %s lost: %s", self.where, why)
        sock.close()
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.result.set(AuthResult(TEMPFAIL, reason="lost the connection to %s"
                                          % self.where))
        reader, self._reader = self._reader, None
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=False)


class _AuthLineReader:
    """LF-terminated lines from a socket, each at most MAX_LINE bytes."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()

    def line(self):
        """The next line (str, without LF), or None at the end of the stream."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                raw = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                # Not UTF-8 (a passdb in Latin-1): kept as surrogates, which
                # login_name_error refuses and printable() shows as "?".
                return raw.decode("utf-8", "surrogateescape")
            if len(self.buffer) > MAX_LINE:
                raise DovecotProtocolError("a line longer than %d bytes" % MAX_LINE)
            data = self.sock.recv(4096)
            if not data:
                return None
            self.buffer += data
