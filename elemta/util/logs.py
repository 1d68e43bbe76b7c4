"""Logging set-up for every Elemta process: stderr, syslog (mail facility), journald
(native fields, elemta.util.journal) or a file, as Postfix-style text lines or as JSON
objects.

The master calls setup() once; forked children inherit the handlers and say which process
they are (set_process). A file target is reopened on SIGUSR1 (reopen()), so logrotate can
move it away, as admins do with Postfix's maillog. An exception passed to a log call reads
as text (ReadableErrors), never as a Python repr.

Text lines are Postfix's syslog lines, so pflogsumm and admins' scripts read them:
"Dec  6 03:01:36 host elemta/smtpd[5071]: QUEUEID: client=...", the level written only
when it is worth saying ("warning: ", "error: ", "fatal: "), as Postfix does. The program
name is the logger's component (elemta.queue -> elemta/queue), which for the lines
pflogsumm counts matches Postfix's programs: smtpd logs client= and rejects, the queue
logs from=<...>, size= (Postfix's qmgr), delivery logs to=<...>, status=.

JSON (logging.format: json; elemta.util.logjson) carries the same message plus the facts
the log call passed as extra= fields (queue_id, from, to, status, ...), never parsed back
out of the text.
"""

import logging
import logging.handlers
import socket
import sys

from elemta.util.logjson import JsonFormatter, set_process  # noqa: F401 (re-exported)

SYSLOG_SOCKET = "/dev/log"
_handler = None
# Postfix's words for the levels; info (and debug) lines carry none.
_SEVERITY = {logging.WARNING: "warning: ", logging.ERROR: "error: ",
             logging.CRITICAL: "fatal: "}


class PostfixFormatter(logging.Formatter):
    """"[Mmm dd hh:mm:ss host ]elemta/component[pid]: [warning: ]message": the time and
    host only where no syslog daemon adds them (stderr, a file)."""

    def __init__(self, stamped):
        super().__init__(None, "%b %d %H:%M:%S")
        self._stamped = stamped
        self._host = socket.gethostname().split(".")[0] or "localhost"
        self._programs = {}         # logger name -> "elemta/component", made once each
        self._second = None         # the time stamp, made once a second (format runs
        self._stamp = ""            # under the handler's lock)

    def usesTime(self):
        return self._stamped

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:
            self._stamp = super().formatTime(record, datefmt)
            self._second = second
        return self._stamp

    def formatMessage(self, record):
        program = self._programs.get(record.name)
        if program is None:
            program = self._programs[record.name] = record.name.replace(".", "/", 1)
        line = "%s[%d]: %s%s" % (program, record.process,
                                 _SEVERITY.get(record.levelno, ""), record.message)
        return "%s %s %s" % (record.asctime, self._host, line) if self._stamped else line


def setup(logging_config):
    """Send the "elemta" loggers to the configured target, in the configured format."""
    global _handler
    _skip_unused_record_fields()
    target = logging_config.target
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    elif target == "journal":
        from elemta.util.journal import JournalHandler
        handler = JournalHandler(
            logging_config.journal_socket,
            logging.handlers.SysLogHandler.facility_names[logging_config.syslog_facility])
    elif target == "syslog":
        _check_syslog(SYSLOG_SOCKET)
        facility = logging.handlers.SysLogHandler.facility_names[
            logging_config.syslog_facility]
        handler = logging.handlers.SysLogHandler(SYSLOG_SOCKET, facility=facility)
    else:
        handler = logging.handlers.WatchedFileHandler(target)
    if target == "journal":
        pass                        # fields, not a line: elemta.util.journal
    elif getattr(logging_config, "format", "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PostfixFormatter(stamped=target != "syslog"))
    handler.addFilter(ReadableErrors())
    root = logging.getLogger("elemta")
    root.handlers[:] = [handler]
    root.setLevel(logging_config.level.upper())
    root.propagate = False
    _handler = handler


def _skip_unused_record_fields():
    """Keep every log call from working out what no line shows: the caller's file, line
    and function (a walk up the stack; logging's documented switch is _srcfile), and the
    thread's and multiprocessing's names. The workers log several lines per message, so
    this is a few percent of their CPU (issue #20). The pid (record.process) is kept."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


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
    """Reopen the log file (SIGUSR1); a no-op for stderr, syslog and the journal."""
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
