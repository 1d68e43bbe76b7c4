"""The client side of Postfix's policy protocol: one pool of connections per policy server.

Owned by the policy_service restriction (elemta.restrictions.policy_service), in the smtpd
worker. A request is name=value lines and an empty line; the answer is name=value lines
(one of them action=...) and an empty line (Postfix SMTPD_POLICY_README). Connections stay
open for the next request, as Postfix keeps its policy connection per smtpd process: here
a worker serves many sessions at once, so each server has a small pool, and a session
asks over the connection it used last when that one is free, so the requests of one
message (same `instance`) reach the same server process, which is what policy servers
like policyd-spf count on to add their header once per message. A connection is closed
after `max_idle` seconds unused, `max_ttl` seconds of life or `request_limit` requests,
and at once after any error or any byte the server sent beyond its answer.

A worker has at most `max_connections` connections to one server, in use and idle (a
gevent semaphore counts the ones in use; a new one is opened only when none is idle): a
worker serving hundreds of sessions must not make a policy server fork hundreds of
processes. A request finding them all in use waits for one, at most `timeout` seconds,
then PolicyUnavailable says so.

Every wait is a gevent socket with the server's `timeout` (connect, send, receive); a
failed attempt is retried `try_limit` times in all, `retry_delay` seconds apart (Postfix's
smtpd_policy_service_* parameters), then PolicyUnavailable says why. An answer without
exactly one action, with a line that is not name=value, or longer than MAX_ANSWER is
PolicyAnswerError: the server is confused, it is not asked again on that connection.
See also: elemta.restrictions.policy_action (what the action means), tests/test_policy_service.py.
"""

import logging
import socket as _socket
import time
from typing import List, Optional, Tuple

import gevent
from gevent import socket
from gevent.lock import BoundedSemaphore

log = logging.getLogger("elemta.restrictions.policy")

# The longest answer read (Postfix's line_length_limit is 2048 per attribute).
MAX_ANSWER = 8192
# Idle connections kept per server at most; more are closed, the oldest first.
MAX_POOLED = 32
RECV_SIZE = 4096


class PolicyUnavailable(Exception):
    """The server could not be asked (refused, reset, timed out) within try_limit."""


class PolicyAnswerError(Exception):
    """The server answered something that is not a policy protocol answer."""


def encode_request(attributes: List[Tuple[str, object]]) -> bytes:
    """name=value lines and the empty line. Values never carry NUL, CR or LF (they are
    replaced by '?'): a value could otherwise end the request early or forge attributes."""
    lines = []
    for name, value in attributes:
        value = "" if value is None else str(value)
        for bad in ("\0", "\r", "\n"):
            value = value.replace(bad, "?")
        lines.append("%s=%s\n" % (name, value))
    return ("".join(lines) + "\n").encode("utf-8", "surrogateescape")


def decode_answer(raw: bytes) -> str:
    """The action of a complete answer (without its final empty line); raises
    PolicyAnswerError."""
    action = None
    text = raw.decode("utf-8", "replace")
    for line in text.split("\n"):
        if line.endswith("\r"):
            line = line[:-1]
        name, equals, value = line.partition("=")
        if not equals or not name.strip():
            raise PolicyAnswerError("not a name=value line: %r" % line[:80])
        if name.strip().lower() == "action":
            if action is not None:
                raise PolicyAnswerError("more than one action in one answer")
            action = value
    if action is None:
        raise PolicyAnswerError("no action in the answer")
    return action


class PolicyConnection:
    """One open connection to a policy server."""

    def __init__(self, sock):
        self.sock = sock
        self.opened = self.last_used = time.monotonic()
        self.requests = 0
        self.usable = True

    def exchange(self, request: bytes, timeout: float) -> str:
        """Send one request, return the action of its answer. Raises OSError (and
        socket.timeout) for I/O trouble, PolicyAnswerError for a confused server; the
        connection is then unusable."""
        self.usable = False               # until the answer is complete and clean
        self.requests += 1
        self.sock.settimeout(timeout)
        self.sock.sendall(request)
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            end = data.find(b"\n\n")
            end_crlf = data.find(b"\r\n\r\n")
            if end_crlf >= 0 and (end < 0 or end_crlf < end):
                answer, rest = data[:end_crlf], data[end_crlf + 4:]
                break
            if end >= 0:
                answer, rest = data[:end], data[end + 2:]
                break
            if len(data) > MAX_ANSWER:
                raise PolicyAnswerError("answer longer than %d bytes" % MAX_ANSWER)
            left = deadline - time.monotonic()
            if left <= 0:
                raise _socket.timeout("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                raise ConnectionError("connection closed by the policy server"
                                      if not data else "connection closed mid-answer")
            data += chunk
        if len(answer) > MAX_ANSWER:
            raise PolicyAnswerError("answer longer than %d bytes" % MAX_ANSWER)
        action = decode_answer(answer)
        self.last_used = time.monotonic()
        self.usable = not rest            # bytes beyond the answer: do not trust it again
        return action

    def close(self):
        self.usable = False
        try:
            self.sock.close()
        except OSError:
            pass


class PolicyClient:
    """The connections to one policy server (a PolicyServerSettings) in this process."""

    def __init__(self, settings):
        self.settings = settings
        self.address = settings.address
        self.idle: List[PolicyConnection] = []
        self._sweeper = None
        # Connections in use; idle ones are opened only when none is idle, so the
        # open ones never outnumber it either.
        self.in_use = BoundedSemaphore(settings.max_connections)

    def ask(self, request: bytes, preferred: Optional[PolicyConnection] = None
            ) -> Tuple[str, PolicyConnection]:
        """(action, the connection used). preferred: the connection this session used
        last, taken again when it is idle. Raises PolicyUnavailable or
        PolicyAnswerError.

        A kept connection the server has closed meanwhile (its own idle timeout) is not
        a failed attempt: the request goes at once over a new connection, once."""
        if not self.in_use.acquire(timeout=self.settings.timeout):
            raise PolicyUnavailable("all %d connections busy for %gs" % (
                self.settings.max_connections, self.settings.timeout))
        try:
            return self._ask(request, preferred)
        finally:
            self.in_use.release()

    def _ask(self, request, preferred):
        settings = self.settings
        problem = "no attempt"
        attempts = 0
        stale_retried = False
        while attempts < settings.try_limit:
            if attempts and not stale_retried:
                gevent.sleep(settings.retry_delay)
            stale_retried = False
            connection = self._take(preferred)
            reused = connection is not None
            preferred = None
            try:
                if connection is None:
                    connection = self._connect()
                action = connection.exchange(request, settings.timeout)
            except PolicyAnswerError:
                if connection is not None:
                    connection.close()
                raise
            except (OSError, _socket.timeout) as error:
                if connection is not None:
                    connection.close()
                if reused and isinstance(error, ConnectionError):
                    stale_retried = True
                    log.debug("policy server %s closed a kept connection (%s); asking "
                              "over a new one", self.address, _describe(error))
                    continue
                attempts += 1
                problem = _describe(error)
                continue
            except BaseException:          # the plugin's own deadline (gevent.Timeout)
                if connection is not None:
                    connection.close()
                raise
            self._give_back(connection)
            return action, connection
        raise PolicyUnavailable("%s after %d attempt%s" % (
            problem, settings.try_limit, "" if settings.try_limit == 1 else "s"))

    def _connect(self):
        kind, _, rest = self.address.partition(":")
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = rest
        else:
            host, _, port = rest.rpartition(":")
            host = host[1:-1] if host.startswith("[") else host
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            target = (host, int(port))
        sock.settimeout(self.settings.timeout)
        try:
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        return PolicyConnection(sock)

    def _expired(self, connection, now):
        settings = self.settings
        return (not connection.usable
                or now - connection.last_used >= settings.max_idle
                or now - connection.opened >= settings.max_ttl
                or (settings.request_limit and connection.requests >= settings.request_limit))

    def _take(self, preferred):
        """An idle, still fresh connection (the preferred one if it is idle), or None."""
        self.sweep()
        if preferred is not None and preferred in self.idle:
            self.idle.remove(preferred)
            return preferred
        return self.idle.pop() if self.idle else None

    def _give_back(self, connection):
        if self._expired(connection, time.monotonic()):
            connection.close()
            return
        self.idle.append(connection)
        while len(self.idle) > min(MAX_POOLED, self.settings.max_connections):
            self.idle.pop(0).close()
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep_forever)

    def sweep(self):
        """Close the idle connections past max_idle, max_ttl or request_limit."""
        now = time.monotonic()
        for connection in [c for c in self.idle if self._expired(c, now)]:
            self.idle.remove(connection)
            connection.close()

    def _sweep_forever(self):
        """Close idle connections on time even when no mail comes (Postfix's max_idle),
        so a policy server does not keep a process per forgotten connection."""
        pause = max(0.5, min(self.settings.max_idle, self.settings.max_ttl) / 4.0)
        while True:
            gevent.sleep(pause)
            self.sweep()

    def close(self):
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None
        while self.idle:
            self.idle.pop().close()


def _describe(error):
    if isinstance(error, _socket.timeout):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
