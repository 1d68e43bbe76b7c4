"""The journal log target (logging.target: journal): each record sent to systemd-journald
over its native protocol, with the facts of the event as fields of their own.

Used by every process through elemta.util.logs (the master makes the handler; children
inherit its socket). One datagram per record to journald's socket (logging.journal_socket,
/run/systemd/journal/socket): KEY=value lines, and for a value holding a newline the
binary-safe form (KEY, newline, its length as 64-bit little endian, the value, newline).
A record too big for one datagram goes in a sealed memfd whose descriptor is sent
instead (SCM_RIGHTS), as systemd's "Native Journal Protocol" document says.

The fields: MESSAGE (the text line's message, a traceback after it as the text format
writes it), PRIORITY (syslog's number for the level), SYSLOG_IDENTIFIER (elemta/smtpd,
as Postfix's postfix/smtpd), SYSLOG_FACILITY (logging.syslog_facility), SYSLOG_PID,
CODE_FILE, CODE_LINE, CODE_FUNC, and every key of the JSON format's object
(elemta.util.logjson, built once by its formatter) in upper case after ELEMTA_:
ELEMTA_QUEUE_ID, ELEMTA_EVENT, ELEMTA_FROM, ELEMTA_TO, ELEMTA_STATUS, ... and
ELEMTA_PROCESS. So `journalctl ELEMTA_QUEUE_ID=...` finds one message's lines and
`journalctl -o short` shows the Postfix-style lines pflogsumm and elemtactl report read.

Our own sender rather than python3-systemd: that library is a C extension built against
libsystemd (no wheel on PyPI), and the protocol is a few lines of framing.
See also: elemta.util.logs, elemta.util.logjson.
"""

import array
import fcntl
import logging
import os
import socket
import struct
import sys
import tempfile

from elemta.util.logjson import JsonFormatter

SOCKET = "/run/systemd/journal/socket"

# syslog(3)'s priorities for the logging levels.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
               logging.CRITICAL: 2}
# JSON keys journald learns otherwise (PRIORITY, SYSLOG_*, its own timestamp), or that
# become MESSAGE.
_NOT_FIELDS = frozenset(("time", "level", "pid", "program", "message", "exception"))
# Errors of a datagram journald cannot take in one piece: send it in a memfd instead.
_TOO_BIG = (getattr(os, "EMSGSIZE", 90), getattr(os, "ENOBUFS", 105))


def check(path):
    """Raise OSError now if no journald listens at path (the handler would only complain
    on every line later)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(path)
        except OSError as error:
            raise OSError(error.errno, "no journald at %s (%s)" % (path, error.strerror))


def field(name, value):
    """One field in the native protocol's framing (bytes)."""
    if not isinstance(value, bytes):
        value = str(value).encode("utf-8", "backslashreplace")
    name = name.encode("ascii")
    if b"\n" in value:
        return b"%s\n%s%s\n" % (name, struct.pack("<Q", len(value)), value)
    return b"%s=%s\n" % (name, value)


class JournalHandler(logging.Handler):
    """Sends each record to journald; see the module docstring for the fields."""

    def __init__(self, path=SOCKET, facility=2):
        super().__init__()
        check(path)
        self.path = path
        self.facility = facility
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # A stalled journald delays a worker by this at most, never for good.
        self.socket.settimeout(5.0)
        self._objects = JsonFormatter()      # the JSON format's keys, built once
        self._names = {}                     # JSON key -> ELEMTA_KEY
        self._identifiers = {}               # logger name -> elemta/component

    def entry(self, record):
        """The record as one datagram's bytes."""
        data = self._objects.record_object(record)
        message = data["message"]
        if "exception" in data:
            message = "%s\n%s" % (message, data["exception"])
        identifier = self._identifiers.get(record.name)
        if identifier is None:
            identifier = self._identifiers[record.name] = record.name.replace(".", "/", 1)
        parts = [field("MESSAGE", message),
                 field("PRIORITY", _PRIORITIES.get(record.levelno, 6)),
                 field("SYSLOG_IDENTIFIER", identifier),
                 field("SYSLOG_FACILITY", self.facility),
                 field("SYSLOG_PID", record.process),
                 field("CODE_FILE", record.pathname),
                 field("CODE_LINE", record.lineno),
                 field("CODE_FUNC", record.funcName)]
        for key, value in data.items():
            if key in _NOT_FIELDS:
                continue
            name = self._names.get(key)
            if name is None:
                name = self._names[key] = "ELEMTA_" + key.upper()
            parts.append(field(name, value))
        return b"".join(parts)

    def emit(self, record):
        try:
            self.send(self.entry(record))
        except Exception as error:    # never the process's end: the line goes to stderr
            self._fall_back(record, error)

    def send(self, data):
        try:
            self.socket.sendto(data, self.path)
        except OSError as error:
            if error.errno not in _TOO_BIG:
                raise
            self._send_in_file(data)

    def _send_in_file(self, data):
        """A record too big for a datagram: its bytes in a sealed memfd (or, where there
        is none, an unlinked file in /dev/shm, which journald also takes), the
        descriptor sent with an empty datagram."""
        try:
            fd = os.memfd_create("elemta-journal", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
            memfd = True
        except (AttributeError, OSError):
            fd = os.dup(tempfile.TemporaryFile(dir="/dev/shm").fileno())
            memfd = False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if memfd:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                            | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self.socket.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def _fall_back(self, record, error):
        """journald could not take the record (stopped, restarting): write the text line
        to stderr, which under systemd reaches the journal by the unit's stdout."""
        try:
            sys.stderr.write("elemta: journal %s: %s; the line was: %s\n" % (
                self.path, getattr(error, "strerror", None) or error, record.getMessage()))
            sys.stderr.flush()
        except Exception:
            pass

    def close(self):
        try:
            self.socket.close()
        finally:
            super().close()
