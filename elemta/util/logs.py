"""Logging set-up for every Elemta process: stderr, syslog (mail facility) or a file.

The master calls setup() once; forked children inherit the handlers. A file target is
reopened on SIGUSR1 (reopen()), so logrotate can move it away, as admins do with
Postfix's maillog. Lines read like Postfix's: "elemta.smtpd[pid]: <qid>: from=<...>", and
an exception passed to a log call reads as text (ReadableErrors), never as a Python repr.
"""

import logging
import logging.handlers
import socket
import sys

FORMAT = "%(name)s[%(process)d]: %(levelname)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"
_handler = None


def setup(logging_config):
    """Send the "elemta" loggers to the configured target."""
    global _handler
    target = logging_config.target
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s " + FORMAT, "%b %d %H:%M:%S"))
    elif target == "syslog":
        _check_syslog(SYSLOG_SOCKET)
        facility = logging.handlers.SysLogHandler.facility_names[
            logging_config.syslog_facility]
        handler = logging.handlers.SysLogHandler(SYSLOG_SOCKET, facility=facility)
        handler.setFormatter(logging.Formatter(FORMAT))
    else:
        handler = logging.handlers.WatchedFileHandler(target)
        handler.setFormatter(logging.Formatter("%(asctime)s " + FORMAT, "%b %d %H:%M:%S"))
    handler.addFilter(ReadableErrors())
    root = logging.getLogger("elemta")
    root.handlers[:] = [handler]
    root.setLevel(logging_config.level.upper())
    root.propagate = False
    _handler = handler


def error_text(exc):
    """An exception as an admin reads it: "/var/spool/x: Permission denied", not
    "[Errno 13] Permission denied: '/var/spool/x'" nor "KeyError('x')"."""
    if isinstance(exc, OSError) and exc.strerror:
        names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
        return "%s: %s" % (" -> ".join(names), exc.strerror) if names else exc.strerror
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


class ReadableErrors(logging.Filter):
    """Renders the exceptions a log call passes as arguments with error_text(): a
    `log.error("...: %s", exc)` anywhere then reads as text, not as Python."""

    def filter(self, record):
        if isinstance(record.args, tuple) and any(
                isinstance(arg, BaseException) for arg in record.args):
            record.args = tuple(error_text(arg) if isinstance(arg, BaseException) else arg
                                for arg in record.args)
        return True


def _check_syslog(path):
    """Raise OSError now if no syslog daemon listens (the handler would only complain
    on every line later)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(path)
                return
            except OSError as exc:
                error = exc
    raise OSError(error.errno, "no syslog daemon at %s (%s)" % (path, error.strerror))


def reopen(*_args):
    """Reopen the log file (SIGUSR1); a no-op for stderr and syslog."""
    handler = _handler
    if isinstance(handler, logging.handlers.WatchedFileHandler):
        handler.acquire()
        try:
            if handler.stream:
                handler.stream.close()
            handler.stream = handler._open()
        finally:
            handler.release()


def streams():
    """File descriptors the logging needs kept open (when daemonizing)."""
    stream = getattr(_handler, "stream", None)
    sock = getattr(_handler, "socket", None)
    return [f.fileno() for f in (stream, sock) if f is not None and hasattr(f, "fileno")]
