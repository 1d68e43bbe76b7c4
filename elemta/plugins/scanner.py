"""Talking to a content-scanning daemon (clamd, Rspamd) without blocking the event loop.

Owned by the plugins that hand the message to a scanner daemon (elemta.plugins.clamav,
elemta.plugins.rspamd), in whichever process runs them (the smtpd worker and pickup).
Both daemons take the whole message over a stream socket and answer once; what they
share is here, so each plugin module holds only its own protocol:

    address = parse_address("/run/clamav/clamd.ctl")   # or "127.0.0.1:3310", "[::1]:11333"
    with measured("clamav") as scan:                    # metrics: time, failures
        sock = connect(address)
        send_chunks(sock, message.raw, frame=...)
        answer = read_bounded(sock, 4096)
        scan.verdict("clean", "pass")

Every wait goes through gevent sockets, so a slow or dead scanner delays only the
session that asked; the plugin manager's gevent.Timeout (the plugin's `timeout`) bounds
the whole exchange, and measured() counts it as a timeout before letting it go on to the
manager. The message is sent from a memoryview of the bytes already in memory, CHUNK
bytes at a time: a 30 MB message is never copied to be sent.

A scanner that cannot be reached or answers nonsense raises ScannerError with a sentence
that names the scanner and the address; the manager logs it in one line (no traceback)
and answers 451 4.3.0, or carries on with fail_open.

The metrics (elemta.metrics): elemta_scanner_verdicts_total{scanner,result,action},
elemta_scanner_scan_seconds{scanner}, elemta_scanner_failures_total{scanner,kind}
(kind: error or timeout) and, from the rspamd plugin, elemta_rspamd_score.
See also: elemta.plugins.manager (timeouts, fail_open), tests/test_clamav.py,
tests/test_rspamd.py.
"""

import re
import time
from contextlib import contextmanager

import gevent
from gevent import socket

from elemta import metrics
from elemta.plugins.settings import parse_scanner_address as parse_address  # noqa: F401

# Bytes written per send: large enough that a 30 MB message is a few hundred writes,
# small enough that a stalled scanner holds little of our memory in its socket buffer.
CHUNK = 256 * 1024


class ScannerError(Exception):
    """The scanner could not be reached or gave an answer we cannot use."""


def describe(address):
    """An address as parse_address gives it, as an admin writes it."""
    if isinstance(address, str):
        return address
    host, port = address
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def connect(address, scanner):
    """A connected gevent stream socket; ScannerError naming scanner and address when
    nothing answers there."""
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection(address)
    except OSError as error:
        raise ScannerError("cannot connect to %s at %s: %s" % (
            scanner, describe(address), error.strerror or error)) from None


def send_chunks(sock, data, frame=None):
    """Write data in CHUNK-sized slices of one memoryview (no copy of the message).
    frame(length) -> bytes, when given, is written before each slice (clamd's length
    prefix). OSError goes to the caller, who may still read the peer's last word."""
    view = memoryview(data)
    try:
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            if frame is not None:
                sock.sendall(frame(len(piece)))
            sock.sendall(piece)
    finally:
        view.release()


def read_bounded(sock, limit, until=None):
    # type: (socket.socket, int, object) -> bytes
    """What the peer sends until it closes (or, with `until`, up to and including that
    byte string), at most `limit` bytes; ScannerError when it sends more."""
    parts, size = [], 0
    while True:
        piece = sock.recv(min(65536, limit + 1 - size))
        if not piece:
            break
        parts.append(piece)
        size += len(piece)
        if until is not None and until in piece:
            break
        if size > limit:
            raise ScannerError("answer longer than %d bytes" % limit)
    return b"".join(parts)


class Scan:
    """One scan in progress (see measured): record its verdict once it is known."""

    def __init__(self, scanner):
        self.scanner = scanner
        self.started = time.monotonic()
        self.seconds = 0.0

    def verdict(self, result, action):
        """The scanner said `result` (clean, infected, no_action, reject, ...) and
        Elemta does `action` (pass, reject, tempfail, hold, header): count it and the
        time the scan took."""
        self.seconds = time.monotonic() - self.started
        metrics.SCANNER_VERDICTS.labels(self.scanner, result, action).inc()
        metrics.SCANNER_SECONDS.labels(self.scanner).observe(self.seconds)


@contextmanager
def measured(scanner):
    """Count a failure of the block (timeout: the manager's gevent.Timeout went off;
    error: anything else) against scanner, then let it go on to the plugin manager."""
    scan = Scan(scanner)
    try:
        yield scan
    except gevent.Timeout:
        metrics.SCANNER_FAILURES.labels(scanner, "timeout").inc()
        raise
    except Exception:
        metrics.SCANNER_FAILURES.labels(scanner, "error").inc()
        raise


_NOT_A_NAME = re.compile(r"[^\x21-\x7e]+")
_NOT_TEXT = re.compile(r"[^\x20-\x7e]+")


def printable(text, limit=200, spaces=False):
    """A scanner's word (a signature name, a symbol; with spaces, a sentence) made safe
    for a reply, a header or a log line: runs of anything but printable ASCII become one
    '?', cut to limit characters."""
    return (_NOT_TEXT if spaces else _NOT_A_NAME).sub("?", str(text))[:limit].strip()
