"""`elemtactl queue ...` and `mailq`: list, show, change and summarise the queue.

Runs in the admin's own short-lived process, while Elemta runs or while it is stopped: it
opens the queue's LMDB index like any other process (every write is a short transaction)
and never parses the spool or index formats itself (elemta.queue does). The listing
(mailq, queue list) run by a user who cannot open the spool asks the showq process
instead (elemta.queue.showq), as Postfix's mailq asks showq. Output is Postfix's
where an admin expects Postfix (mailq's layout, postsuper's counts, qshape's table), and one
JSON object per line with --json. Errors are one line on stderr and a sysexits(3) status.

See also: elemta.cli.elemtactl (the other commands), elemta.queue.listing (selection and
counting), elemta.queue.queue (the actions), man/elemtactl.8, man/mailq.1.
"""

import argparse
import json
import os
import re
import sys
import time
# sysexits(3), as the os module names them (elemta.cli.failure).
from os import (EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_NOPERM, EX_NOUSER, EX_OK, EX_PROTOCOL,
                EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE)
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from elemta.cli.config_finder import config_path, find_config
from elemta.cli.failure import Failure
from elemta.queue.model import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN
from elemta.util.text import printable

PROG = "elemtactl"


# Postfix's mailq layout (postqueue/showq_compat.c, long queue ids), widened by the
# four characters our 20-character ids need: id and status mark, size, arrival, address.
ID_WIDTH = 21
HEADINGS = ("-------Queue ID------", "--Size--", "---Arrival Time----",
            "--Sender/Recipient------")
HEADING_FORMAT = "%-21s %8s %-19s %s\n"
SENDER_FORMAT = "%-21s %8d %19.19s %s\n"
# The same line after a separator, from asctime()'s text up to the minute and the
# seconds (%d truncates).
MINUTE_SENDER_FORMAT = "%s%-21s %8d %s%02d %s\n"
RECIPIENT_INDENT = " " * (ID_WIDTH + 1 + 8 + 1 + 19 + 1)
REASON_COLUMN = 76          # a "(reason)" line ends at column 78, as in Postfix
STATUS_MARK = {"active": "*", "hold": "!"}
# Seconds mailq waits for each piece of the showq process's reply.
SHOWQ_TIMEOUT = 60
# mailq's exit status for each kind of showq refusal (elemta.queue.showq).
SHOWQ_STATUS_CODES = {"refused": EX_NOPERM, "busy": EX_TEMPFAIL, "bad request": EX_PROTOCOL,
                      "failed": EX_SOFTWARE}


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# ---------------------------------------------------------------- output

class Output:
    """Buffered UTF-8 output to stdout, whatever the locale; a closed pipe (| head) ends
    the command quietly."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout.buffer
        self._parts: List[bytes] = []
        self._size = 0

    def write(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8", "replace"))

    def write_bytes(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= 65536:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            data, self._parts, self._size = b"".join(self._parts), [], 0
            self.stream.write(data)
        self.stream.flush()


# asctime()'s text up to the seconds, by minute since the epoch (a listing of 100,000
# messages asks for the local time of a few thousand minutes).
_MINUTE_TEXTS: Dict[int, str] = {}


def asctime(seconds: float) -> str:
    """'Tue Nov 24 17:34:06': asctime(3) in local time, without the year. Local time is
    worked out once per minute: time zones are whole minutes away from UTC (one that is
    not, as with leap seconds counted, is worked out each time)."""
    prefix = _MINUTE_TEXTS.get(int(seconds // 60)) or _minute_text(seconds)
    if prefix is None:
        return time.asctime(time.localtime(seconds))[:19]
    return "%s%02d" % (prefix, int(seconds % 60))


def _minute_text(seconds: float) -> Optional[str]:
    """asctime()'s text of the minute holding `seconds`, up to "HH:MM:" (cached in
    _MINUTE_TEXTS), or None where local time is not a whole number of minutes away."""
    minute = int(seconds // 60)
    text = time.asctime(time.localtime(minute * 60))
    if text[17:19] != "00":
        return None
    prefix = _MINUTE_TEXTS[minute] = text[:17]
    return prefix


# ---------------------------------------------------------------- opening the queue

def open_queue(args, create_index: bool = False):
    """The Queue named by --spool-dir or the configuration. Refuses (rather than creates)
    a missing spool or index unless create_index."""
    config = _config(args)
    spool_dir = _usable_spool(args.spool_dir or config.queue.spool_dir)
    from elemta.queue.queue import Queue
    if not create_index and not Queue.has_index(spool_dir):
        raise Failure(EX_NOINPUT, "queue: no index in %s; rebuild it with: %s queue "
                                  "reindex" % (spool_dir, PROG))
    become_spool_owner(spool_dir)
    return Queue.from_config(config.queue, spool_dir=spool_dir)


def open_reader(args):
    """The queue opened for reading alone (elemta.queue.reader.QueueReader): queue list,
    mailq and queue summary start in a fraction of the Queue facade's time. No configuration is
    read when --spool-dir is given and there is no configuration file: only the spool's
    index is needed then."""
    from elemta.queue.reader import QueueReader
    if args.spool_dir and config_path(getattr(args, "config", None)) is None:
        spool_dir, settings = args.spool_dir, {}
    else:
        config = _config(args)
        spool_dir = args.spool_dir or config.queue.spool_dir
        settings = {"map_size": config.queue.index_map_size}
    spool_dir = _usable_spool(spool_dir)
    if not QueueReader.has_index(spool_dir):
        raise Failure(EX_NOINPUT, "queue: no index in %s; rebuild it with: %s queue "
                                  "reindex" % (spool_dir, PROG))
    become_spool_owner(spool_dir)
    return QueueReader(spool_dir, **settings)


def _config(args):
    """The configuration (elemta.cli.config_finder.find_config), read once per command."""
    config = getattr(args, "_loaded_config", None)
    if config is None:
        config = args._loaded_config = find_config(getattr(args, "config", None))
    return config


def _usable_spool(spool_dir: str) -> str:
    """The absolute path of the spool directory; Failure if it is missing or this user
    may not use it."""
    spool_dir = os.path.abspath(spool_dir)
    if not os.path.isdir(spool_dir):
        raise Failure(EX_NOINPUT, "queue: no spool directory %s (is --config right?)"
                      % spool_dir)
    if not os.access(spool_dir, os.R_OK | os.W_OK | os.X_OK):
        raise Failure(EX_NOPERM, "queue: %s: permission denied (run as root or as "
                                 "Elemta's user)" % spool_dir)
    return spool_dir


def log_to_the_mail_log(args) -> None:
    """Send this command's log lines ("QUEUEID: placed on hold (admin action)", from the
    queue) to the daemon's log file or syslog, as postsuper logs what it changes: grep
    QUEUEID then shows who took a message off its course. Opened before open_queue()
    drops root. A daemon that logs to stderr (systemd's journal, a terminal) has no log
    this command can reach: then syslog, which journald also reads, if one listens (with
    none, as in a bare `make run`, the action is not logged: this command's stderr is for
    its one-line errors, which scripts read). A log that cannot be opened must not keep
    the admin from acting."""
    import dataclasses
    from elemta.util import logs
    config = _config(args)
    target = config.logging
    if target.target == "stderr":
        target = dataclasses.replace(target, target="syslog")
    logs.set_process("elemtactl")      # who acted, in the JSON lines' "process"
    try:
        logs.setup(target)
    except OSError:
        pass


def become_spool_owner(spool_dir: str) -> None:
    """Run as root, become the spool's owner (master.user) for good before touching the
    queue, as Postfix's postsuper works as mail_owner: that user can swap any file in the
    spool for a link, so root must not open, create or chown anything there. Whatever
    this command creates is then the daemon's user's, as it must be."""
    if os.geteuid() != 0:
        return
    owner = os.stat(spool_dir)
    if owner.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)


# ---------------------------------------------------------------- selection

def parse_duration(text: str) -> float:
    """'90' or '90s', '30m', '2h', '3d', '1w' -> seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(
            "%r is not a duration (a number with s, m, h, d or w, e.g. 30m)" % text)
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_states(text: str) -> List[str]:
    from elemta.queue.model import STATES
    states = [s.strip().lower() for s in text.split(",") if s.strip()]
    for state in states:
        if state not in STATES:
            raise argparse.ArgumentTypeError("%r is not a queue state (one of %s)"
                                             % (state, ", ".join(STATES)))
    return states


def _selection(args, default_states: Tuple[str, ...] = ()):
    from elemta.queue.listing import Selection
    states = tuple(s for group in (args.state or ()) for s in group) or default_states
    return Selection(now=time.time(), states=tuple(dict.fromkeys(states)),
                     sender=args.sender, recipient=args.recipient, domain=args.domain,
                     older_than=args.older_than, newer_than=args.newer_than)


def _has_filter(args) -> bool:
    return any(v is not None for v in (args.state, args.sender, args.recipient, args.domain,
                                       args.older_than, args.newer_than))


def _queue_ids(words: Iterable[str], command: str = "queue") -> List[str]:
    """Queue ids from the command line ('-' reads them from stdin, one per line or
    separated by spaces); mailq's '*' and '!' marks are ignored, as postsuper does.
    Anything else (a path, a name with '/' or NUL) is refused, named, before the queue
    is opened."""
    from elemta.queue.ids import QUEUE_ID_LENGTH, is_queue_id
    ids = []
    for word in words:
        items = sys.stdin.read().split() if word == "-" else [word]
        for item in items:
            queue_id = item.rstrip("*!")
            if not is_queue_id(queue_id):
                raise Failure(EX_USAGE, "%s: not a queue id: %s (a queue id is %d "
                                        "characters of 0-9 and A-Z, as mailq shows it)"
                              % (command, printable(repr(item)[1:-1]), QUEUE_ID_LENGTH))
            ids.append(queue_id)
    return list(dict.fromkeys(ids))


# ---------------------------------------------------------------- list (mailq)

def cmd_list(args) -> int:
    """queue list: the queue in mailq's layout, or one JSON object per message. Read from
    the index when the caller may (root, Elemta's user: works while Elemta is stopped),
    else asked of the showq process, as Postfix's mailq asks its showq service."""
    from elemta.queue.listing import listed_from_json, record_to_json
    out = Output()
    spool_dir = _readable_spool(args)
    selection = _selection(args)
    if spool_dir is None:
        listing = listing_from_showq(args, selection)
        if args.json:
            _write_json_lines(out, listing)
        else:
            write_mailq(out, map(listed_from_json, listing))
    else:
        with open_reader(args) as queue:
            if args.json:
                _write_json_lines(out, map(record_to_json, queue.records_matching(selection)))
            else:
                write_mailq(out, queue.listed_matching(selection))
    out.flush()
    return EX_OK


def _write_json_lines(out: Output, listing: Iterable[dict]) -> None:
    for listed in listing:
        out.write(json.dumps(listed, ensure_ascii=False) + "\n")


def _readable_spool(args) -> Optional[str]:
    """The spool directory if this user may open the queue itself, else None (mailq by an
    ordinary user: the spool is Elemta's alone)."""
    spool_dir = os.path.abspath(args.spool_dir or _config(args).queue.spool_dir)
    if os.path.isdir(spool_dir) and not os.access(spool_dir, os.R_OK | os.W_OK | os.X_OK):
        args.spool_dir = spool_dir
        return None
    return spool_dir


def listing_from_showq(args, selection) -> Iterator[dict]:
    """The selected messages as the showq process lists them (elemta.queue.showq), for a
    caller who cannot read the spool. Failures are Failures naming the cause: refused
    (EX_NOPERM), Elemta not running (EX_UNAVAILABLE), a reply cut short (EX_PROTOCOL)."""
    import socket
    from elemta.queue import showq
    path = showq.socket_path(args.spool_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(SHOWQ_TIMEOUT)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise Failure(EX_UNAVAILABLE, "cannot ask the showq service at %s: %s (is "
                                          "Elemta running? Only root and Elemta's user "
                                          "can read the queue while it is stopped)"
                          % (path, exc.strerror or exc))
        try:
            sock.sendall(showq.encode_request(selection))
            reply = sock.makefile("rb")
            while True:
                listed = showq.decode_reply_line(reply.readline(showq.MAX_REPLY_LINE))
                if listed is None:
                    return
                yield listed
        except showq.Refused as refused:
            code = SHOWQ_STATUS_CODES.get(refused.status, EX_PROTOCOL)
            raise Failure(code, printable(str(refused)))
        except showq.ShowqError as exc:
            raise Failure(EX_PROTOCOL, "showq service at %s: %s" % (path, exc))
        except socket.timeout:
            raise Failure(EX_TEMPFAIL, "the showq service at %s did not answer within %d "
                                       "seconds" % (path, SHOWQ_TIMEOUT))
        except OSError as exc:
            raise Failure(EX_PROTOCOL, "showq service at %s: %s" % (path,
                                                                   exc.strerror or exc))
    finally:
        sock.close()


def write_mailq(out: Output, listing: Iterable) -> None:
    """Postfix's mailq output for a listing of elemta.queue.index.Listed, read from the
    index or from the showq process (streamed: written a few thousand lines at a time,
    the text already made printable). The loop is mailq's cost per message over a big
    queue: asctime() and the reason lines are inlined and cached here."""
    from elemta.queue.listing import NULL_SENDER
    count = total_size = 0
    lines: List[str] = []
    append = lines.append
    minute_texts = _MINUTE_TEXTS        # float minutes find their int keys: equal hashes
    reason_lines: Dict[str, str] = {}
    separator = HEADING_FORMAT % HEADINGS
    for queue_id, state, size, arrival, sender, recipients in listing:
        prefix = minute_texts.get(arrival // 60) or _minute_text(arrival)
        if prefix is None:
            head = separator + SENDER_FORMAT % (queue_id + STATUS_MARK.get(state, ""), size,
                                                asctime(arrival), sender or NULL_SENDER)
        else:
            head = MINUTE_SENDER_FORMAT % (separator, queue_id + STATUS_MARK.get(state, ""),
                                           size, prefix, arrival % 60, sender or NULL_SENDER)
        separator = "\n"
        if len(recipients) == 1 and not recipients[0][1]:
            append(head + RECIPIENT_INDENT + recipients[0][0] + "\n")  # no reason shown
        else:
            append(head)
            shown_reason = ""
            for address, reason in recipients:
                if reason != shown_reason:
                    shown_reason = reason
                    line = reason_lines.get(reason)
                    if line is None:
                        text = reason or "reason unavailable"
                        line = reason_lines[reason] = "%*s(%s)\n" % (
                            max(0, REASON_COLUMN - len(text)), "", text)
                    append(line)
                append(RECIPIENT_INDENT + address + "\n")
        count += 1
        total_size += size
        if len(lines) >= 4096:
            out.write("".join(lines))
            lines.clear()
    if count == 0:
        append("Mail queue is empty\n")
    else:
        append("\n-- %d Kbytes in %d Request%s.\n"
               % (total_size // 1024, count, "" if count == 1 else "s"))
    out.write("".join(lines))


# ---------------------------------------------------------------- show

def cmd_show(args) -> int:
    """queue show ID...: envelope, delivery state, recipients, headers (--body: all)."""
    from elemta.queue.listing import record_show_json
    ids = _queue_ids(args.ids)
    out = Output()
    status = EX_OK
    with open_queue(args) as queue:
        for n, queue_id in enumerate(ids):
            record = queue.get(queue_id)
            if record is None:
                out.flush()
                _complain("queue: no such message: %s" % queue_id)
                status = EX_NOUSER
                continue
            if args.json:
                out.write(json.dumps(record_show_json(record, queue.store.path(queue_id)),
                                     ensure_ascii=False) + "\n")
                continue
            if n:
                out.write("\n")
            _write_envelope(out, record, queue.store.path(queue_id),
                            queue.store.is_held(queue_id))
            status = max(status, _write_content(out, queue.store, queue_id, args.body))
    out.flush()
    return status


def _complain(message: str) -> None:
    sys.stdout.flush()
    print("%s: %s" % (PROG, message), file=sys.stderr)


def _write_envelope(out: Output, record, spool_path: str, held: bool) -> None:
    envelope = record.envelope
    lines = [("Queue ID", record.queue_id),
             ("State", _state_text(record, held)),
             ("Arrival", time.asctime(time.localtime(envelope.arrival))),
             ("Size", "%d bytes" % envelope.size),
             ("Sender", "<%s>" % envelope.sender)]
    client = envelope.client_helo or "local"
    if envelope.client_address:
        client += " [%s]" % envelope.client_address
    client += ", " + envelope.protocol
    if envelope.auth_user:
        client += ", authenticated as " + envelope.auth_user
    lines.append(("Client", client))
    lines.append(("Body", envelope.body + (", SMTPUTF8" if envelope.smtputf8 else "")))
    dsn = ["RET=" + envelope.ret] if envelope.ret else []
    dsn += ["ENVID=" + envelope.envid] if envelope.envid else []
    if dsn:
        lines.append(("DSN", " ".join(dsn)))
    if envelope.requiretls:
        lines.append(("TLS", "REQUIRETLS (only over verified TLS, RFC 8689)"))
    lines.append(("Priority", "%s%s" % (envelope.priority, " (the default)"
                                        if envelope.priority == PRIORITY_DEFAULT else "")))
    if record.state == "hold" or record.hold is not None:
        lines.append(("Hold", _hold_text(record)))
    if record.last_error:
        lines.append(("Last error", record.last_error))
    lines.append(("Spool file", spool_path))
    for label, value in lines:
        out.write("%-12s%s\n" % (label + ":", printable(str(value))))
    out.write("Recipients:\n")
    for recipient in envelope.recipients:
        out.write("  <%s>  %s\n" % (printable(recipient.address), recipient.status))
        dsn = ["NOTIFY=" + ",".join(recipient.notify)] if recipient.notify else []
        dsn += ["ORCPT=" + recipient.orcpt] if recipient.orcpt else []
        if dsn:
            out.write("    %s\n" % printable(" ".join(dsn)))
        if recipient.last_reply:
            out.write("    last reply: %s\n" % printable(recipient.last_reply))
    if record.history:
        out.write("History:\n")
        for when, address, status, relay, reply in record.history:
            out.write("  %s  <%s>  %s via %s: %s\n" % (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)), printable(address),
                status, printable(relay or "none"), printable(reply or "")))
    if envelope.extra:
        out.write("Extra:      %s\n" % json.dumps(envelope.extra, sort_keys=True))


def _hold_text(record) -> str:
    """'held by clamav: virus found: X (since Tue Nov 24 17:34:06 2025)'."""
    if record.hold is None:
        return "held by unknown (held before Elemta kept who held messages)"
    text = record.hold.describe()
    if record.hold.since:
        text += " (since %s)" % time.asctime(time.localtime(record.hold.since))
    return text


def _state_text(record, held: bool) -> str:
    text = record.state
    if record.attempts:
        text += ", %d attempt%s" % (record.attempts, "" if record.attempts == 1 else "s")
    if record.state in ("incoming", "deferred"):
        due = record.next_attempt
        text += ", due now" if due <= time.time() else ", next attempt %s" % (
            time.asctime(time.localtime(due)))
    if held != (record.state == "hold"):
        text += " (hold marker %s; reconcile at the next start settles it)" % (
            "present" if held else "missing")
    return text


def _write_content(out: Output, store, queue_id: str, whole: bool) -> int:
    """The headers (or with whole, the whole content), CRLF shown as LF."""
    from elemta.queue.store import CorruptSpoolFile
    out.write("\n")
    try:
        with store.open_content(queue_id) as content:
            pending = b""
            while True:
                chunk = content.read(65536)
                if not chunk:
                    break
                data = (pending + chunk).replace(b"\r\n", b"\n")
                pending = b""
                if data.endswith(b"\r"):
                    data, pending = data[:-1], b"\r"
                if not whole:
                    end = _end_of_headers(data)
                    if end is not None:
                        out.write_bytes(data[:end])
                        return EX_OK
                out.write_bytes(data)
            out.write_bytes(pending)
    except FileNotFoundError:
        out.flush()
        _complain("queue: %s: its spool file is gone (delivered or deleted meanwhile)"
                  % queue_id)
        return EX_NOINPUT
    except CorruptSpoolFile as exc:
        out.flush()
        _complain("queue: %s" % exc)
        return EX_DATAERR
    return EX_OK


def _end_of_headers(data: bytes) -> Optional[int]:
    if data.startswith(b"\n"):
        return 0
    at = data.find(b"\n\n")
    return None if at < 0 else at + 1


# ---------------------------------------------------------------- cat (postcat)

CAT_MARK = "*** %s %s ***\n"


def cmd_cat(args) -> int:
    """queue cat ID...: each message as stored, as postcat -q shows it: its envelope,
    then its content byte for byte (--headers, --body: only that part, nothing else).

    The id must name a message in the queue: a path, or anything else that is not a
    queue id, is refused before the spool is touched. Root's reading is done as the
    spool's owner (open_queue drops root for good first: root never opens a path that
    user can change), and the file is opened without following a link whoever reads
    it (Queue.open_message), so a link planted in the spool shows nothing of what it
    points to."""
    from elemta.queue.queue import NoSuchMessage
    from elemta.queue.store import CorruptSpoolFile
    from elemta.util.eugid import UnsafePath
    ids = _queue_ids(args.ids, "queue cat")
    whole = not (args.headers or args.body)
    out = Output()
    status = EX_OK
    with open_queue(args) as queue:
        for queue_id in ids:
            try:
                record, content = queue.open_message(queue_id)
            except NoSuchMessage:
                problem = (EX_NOUSER, "queue cat: no such message: %s" % queue_id)
            except UnsafePath as exc:
                problem = (EX_NOPERM, "queue cat: %s: %s (the spool file must be a plain "
                                      "file, never a link)" % (queue_id, exc))
            except CorruptSpoolFile as exc:
                problem = (EX_DATAERR, "queue cat: %s: %s" % (queue_id, exc))
            else:
                problem = None
                with content:
                    try:
                        if whole:
                            _write_cat_envelope(out, record)
                            out.write(CAT_MARK % ("MESSAGE CONTENTS", queue_id))
                        ended = _copy_parts(out, content, args.headers or whole,
                                            args.body or whole)
                        if whole:
                            out.write(("" if ended else "\n")
                                      + CAT_MARK % ("MESSAGE FILE END", queue_id))
                    except CorruptSpoolFile as exc:
                        problem = (EX_DATAERR, "queue cat: %s: %s" % (queue_id, exc))
            if problem is not None:
                out.flush()
                _complain(problem[1])
                status = max(status, problem[0])
    out.flush()
    return status


def _write_cat_envelope(out: Output, record) -> None:
    """postcat's envelope records, one "name: value" line each, Elemta's names."""
    envelope = record.envelope
    out.write(CAT_MARK % ("ENVELOPE RECORDS", record.queue_id))
    lines = [("queue_id", record.queue_id),
             ("state", _state_text(record, record.state == "hold")),
             ("message_arrival_time", time.asctime(time.localtime(envelope.arrival))),
             ("message_size", str(envelope.size)),
             ("priority", str(envelope.priority)),
             ("sender", envelope.sender)]
    if envelope.client_address or envelope.client_helo:
        lines.append(("client", "%s [%s]" % (envelope.client_helo or "unknown",
                                              envelope.client_address or "unknown")))
    lines.append(("protocol", envelope.protocol))
    if envelope.auth_user:
        lines.append(("sasl_username", envelope.auth_user))
    lines.append(("body_type", envelope.body + (", SMTPUTF8" if envelope.smtputf8 else "")))
    if envelope.ret:
        lines.append(("dsn_ret", envelope.ret))
    if envelope.envid:
        lines.append(("dsn_envid", envelope.envid))
    for recipient in envelope.recipients:
        text = "%s (%s)" % (recipient.address, recipient.status)
        if recipient.notify:
            text += " NOTIFY=" + ",".join(recipient.notify)
        if recipient.orcpt:
            text += " ORCPT=" + recipient.orcpt
        lines.append(("recipient", text))
    for name, value in lines:
        out.write("%s: %s\n" % (name, printable(str(value))))


def _copy_parts(out: Output, content, headers: bool, body: bool) -> bool:
    """Copy the header section (up to the empty line, which is neither part) and/or the
    body (after it) as stored. Reads to the end when the body is wanted (so its CRC is
    checked). Returns whether what was written ends with a line end (or is empty)."""
    ended = True
    at_line_start = True
    while True:                             # the header section, a line at a time
        line = content.readline(65536)
        if not line:
            return ended
        if at_line_start and line in (b"\r\n", b"\n"):
            break                           # the empty line ends the headers
        at_line_start = line.endswith(b"\n")
        if headers:
            out.write_bytes(line)
            ended = at_line_start
    if headers and body:
        out.write_bytes(line)
        ended = True
    if not body:
        return ended
    while True:
        chunk = content.read(65536)
        if not chunk:
            return ended
        out.write_bytes(chunk)
        ended = chunk.endswith(b"\n")


# ---------------------------------------------------------------- actions

# action name -> (Queue method name, postsuper-style total, states --all looks at)
ACTIONS = {
    "hold": ("hold", "Placed on hold", ("incoming", "active", "deferred", "failed")),
    "release": ("release", "Released from hold", ("hold",)),
    "delete": ("delete", "Deleted", ()),
    "requeue": ("requeue", "Requeued", ()),
    "flush": ("flush", "Due now", ("deferred",)),
    "priority": ("set_priority", "Priority changed", ()),
}


def _action(name: str) -> Callable:
    method, total_label, default_states = ACTIONS[name]

    def handler(args) -> int:
        if args.ids and (args.all or _has_filter(args)):
            raise Failure(EX_USAGE, "queue %s: give queue ids or a selection "
                                    "(--all, --from, ...), not both" % name)
        bulk = args.all or _has_filter(args) or (name == "flush" and not args.ids)
        if not bulk and not args.ids:
            raise Failure(EX_USAGE, "queue %s: give queue ids, --all, or a selection "
                                    "such as --from (see %s queue %s --help)"
                          % (name, PROG, name))
        ids = [] if bulk else _queue_ids(args.ids, "queue " + name)
        extra = (args.priority,) if name == "priority" else ()
        from elemta.queue.queue import NO_SUCH_MESSAGE
        success = _success(name)
        out = Output()
        unknown = []
        done = failed = 0
        log_to_the_mail_log(args)
        with open_queue(args) as queue:
            spool_dir = queue.spool_dir
            if bulk:
                ids = list(queue.ids_matching(_selection(args, default_states)))
            for queue_id, outcome in _run_action(args, queue, name, method, ids, extra):
                if outcome == NO_SUCH_MESSAGE:
                    unknown.append(queue_id)
                    continue
                out.write("%s: %s\n" % (queue_id, printable(outcome)))
                done += outcome in success
                failed += outcome.startswith(RESCAN_FAILED)
        out.write("%s%s: %d message%s\n" % (total_label, "".join(" to %d" % n for n in extra),
                                            done, "" if done == 1 else "s"))
        out.flush()
        for queue_id in unknown:
            _complain("queue: no such message: %s" % queue_id)
        if done and name in ("flush", "requeue", "release"):
            from elemta.queue import wakeup
            wakeup.notify(spool_dir)        # running delivery workers look at once
        if failed:
            _complain("queue release --rescan: %d message%s left on hold: a scanner could "
                      "not decide (try again)" % (failed, "" if failed == 1 else "s"))
        return EX_NOUSER if unknown else EX_TEMPFAIL if failed else EX_OK
    handler.__doc__ = "queue %s: by id, --all, or a selection; one line per message." % name
    return handler


# How an outcome of release --rescan that left the message as it was begins.
RESCAN_FAILED = "rescan failed"


def _run_action(args, queue, name: str, method: str, ids: List[str], extra: tuple):
    """(queue_id, outcome) of the action on each message. hold records the admin (and
    --reason); release --rescan runs the content scanners first (elemta.plugins.rescan)."""
    if name == "hold":
        return queue.hold(ids, reason=printable(args.reason or ""))
    if name == "release" and args.rescan:
        return _rescanned(args, queue, ids)
    return getattr(queue, method)(ids, *extra)


def _rescanned(args, queue, ids: List[str]):
    from elemta.plugins.api import PluginConfigError
    from elemta.plugins.rescan import Rescanner
    config = _config(args)
    try:
        rescanner = Rescanner.of(config)
    except PluginConfigError as error:
        raise Failure(EX_SOFTWARE, "queue release --rescan: %s" % error)
    with rescanner:
        yield from rescanner.rescan(queue, ids)


def _success(name: str) -> Tuple[str, ...]:
    """The outcomes meaning the action changed the message."""
    from elemta.queue import queue as q
    return {"hold": (q.HELD,), "release": (q.RELEASED, q.RESCANNED_CLEAN),
            "delete": (q.DELETED,),
            "requeue": (q.REQUEUED,), "flush": (q.FLUSHED,),
            "priority": (q.PRIORITY_CHANGED, q.PRIORITY_CHANGED_ACTIVE)}[name]


def parse_priority(text: str) -> int:
    """A priority as typed: a whole number in the model's range."""
    from elemta.queue.ids import is_queue_id
    from elemta.queue.model import priority_error
    if is_queue_id(text.strip()):
        raise argparse.ArgumentTypeError("%s is a queue id: the priority comes last "
                                         "(queue priority ID... N)" % text.strip())
    try:
        value = int(text.strip())
    except ValueError:
        value = text
    problem = priority_error(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


# ---------------------------------------------------------------- summary, reindex

def cmd_summary(args) -> int:
    """queue summary: messages and Kbytes per state, then qshape's domain-by-age table."""
    with open_reader(args) as queue:
        shape = queue.summarise(_selection(args), by_sender=args.sender_domains)
    out = Output()
    if args.json:
        out.write(json.dumps({
            "states": {state: {"messages": t.messages, "bytes": t.size}
                       for state, t in shape.by_state.items()},
            "bucket_minutes": shape.bucket_limits,
            "total": shape.total,
            "domains": shape.domains,
        }, ensure_ascii=False, sort_keys=True) + "\n")
    else:
        write_summary(out, shape, args.sender_domains)
    out.flush()
    return EX_OK


def write_summary(out: Output, shape, by_sender: bool = False, width: int = 80) -> None:
    out.write("%-10s %10s %10s\n" % ("State", "Messages", "Kbytes"))
    messages = size = 0
    for state, total in shape.by_state.items():
        out.write("%-10s %10d %10d\n" % (state, total.messages, total.size // 1024))
        messages += total.messages
        size += total.size
    out.write("%-10s %10d %10d\n\n" % ("total", messages, size // 1024))
    out.write("%s domains by age in minutes (as qshape%s):\n"
              % ("Sender" if by_sender else "Recipient", " -s" if by_sender else ""))
    for line in qshape_lines(shape, width):
        out.write(line + "\n")


def qshape_lines(shape, width: int = 80, min_domain_width: int = 18) -> Iterator[str]:
    """qshape's table: TOTAL, then domains by count (most first), ages in columns."""
    limits = shape.bucket_limits
    heads = ["T"] + [str(n) for n in limits] + ["%d+" % limits[-1]]
    widths = []
    for head, total in zip(heads, shape.total):
        cell = max(len(str(total)), len(head))
        widths.append(cell + 1 if cell > 2 else 3)
    name_width = max(width - sum(widths), min_domain_width)

    def row(name: str, cells: List) -> str:
        if len(name) > name_width:
            name = "+" + name[len(name) - name_width + 1:]
        return name.rjust(name_width) + "".join(
            str(c).rjust(w) for c, w in zip(cells, widths))

    yield row("", heads)
    yield row("TOTAL", shape.total)
    ranked = sorted(shape.domains.items(), key=lambda kv: (-kv[1][0], len(kv[0]), kv[0]))
    for name, cells in ranked:
        yield row(printable(name), cells)


def cmd_reindex(args) -> int:
    """queue reindex: rebuild the index from the spool files (hold markers kept)."""
    from elemta.queue.model import HOLD
    with open_queue(args, create_index=True) as queue:
        count = queue.reindex()
        held = queue.count_by_state().get(HOLD, 0)
    print("reindexed %d message%s (%d on hold) from %s"
          % (count, "" if count == 1 else "s", held, queue.spool_dir))
    return EX_OK


# ---------------------------------------------------------------- the parser

def _filter_options(parser: argparse.ArgumentParser, for_action: bool = False) -> None:
    group = parser.add_argument_group("selection")
    group.add_argument("--state", action="append", type=parse_states, metavar="STATE",
                       help="only messages in STATE: incoming, active, deferred, hold, "
                            "failed (repeat or separate with commas)")
    group.add_argument("--from", dest="sender", metavar="PATTERN",
                       help="sender matches PATTERN (shell wildcards, any case; '<>' is "
                            "the null sender)")
    group.add_argument("--to", dest="recipient", metavar="PATTERN",
                       help="a recipient not yet delivered matches PATTERN")
    group.add_argument("--domain", metavar="DOMAIN",
                       help="a recipient not yet delivered is at DOMAIN")
    group.add_argument("--older-than", type=parse_duration, metavar="AGE",
                       help="arrived more than AGE ago (e.g. 90s, 30m, 2h, 3d, 1w)")
    group.add_argument("--newer-than", type=parse_duration, metavar="AGE",
                       help="arrived less than AGE ago")
    if for_action:
        group.add_argument("--all", action="store_true",
                           help="every message (that the other options select)")


def add_queue_commands(commands, parser_class, parents: List[argparse.ArgumentParser]
                       ) -> None:
    """Register `queue` and its actions on elemtactl's subcommand parsers."""
    spool = parser_class(add_help=False)
    spool.add_argument("--spool-dir", metavar="DIR",
                       help="the spool directory (default: queue.spool_dir of the "
                            "configuration)")
    parents = list(parents) + [spool]
    queue = commands.add_parser("queue", help="list, show and change queued mail",
                                description="List, show and change queued mail.")
    actions = queue.add_subparsers(dest="queue_command", metavar="ACTION",
                                   parser_class=parser_class)
    actions.required = True

    def add(name, handler, summary):
        sub = actions.add_parser(name, parents=parents, help=summary, description=summary)
        sub.set_defaults(handler=lambda args: run(_on_cluster(name) if getattr(
            args, "cluster", False) else handler, args))
        return sub

    listing = add("list", cmd_list, "list the queue as mailq does (or --json)")
    _filter_options(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per message")

    show = add("show", cmd_show, "show messages: envelope, state, recipients, headers")
    show.add_argument("ids", nargs="+", metavar="ID", help="queue id ('-' reads ids from "
                                                          "standard input)")
    show.add_argument("--body", action="store_true", help="the whole content, not only the "
                                                          "headers")
    show.add_argument("--json", action="store_true", help="the envelope and state as JSON")

    cat = add("cat", cmd_cat, "print messages as stored: envelope, then headers and body "
                              "(postcat -q)")
    cat.add_argument("ids", nargs="+", metavar="ID", help="queue id ('-' reads ids from "
                                                         "standard input)")
    cat.add_argument("--headers", action="store_true", help="only the header section, as "
                                                           "stored")
    cat.add_argument("--body", action="store_true", help="only the body, as stored")

    for name, summary in (("hold", "put messages on hold (never tried until released)"),
                          ("release", "take messages off hold (due now), not scanned "
                                      "again unless --rescan"),
                          ("delete", "delete messages"),
                          ("requeue", "start messages over: due now, attempts reset"),
                          ("flush", "make deferred messages due now (all when no ID)"),
                          ("priority", "set messages' priority: among messages due, the "
                                       "higher is delivered first")):
        sub = add(name, _action(name), summary)
        sub.add_argument("ids", nargs="*", metavar="ID",
                         help="queue id ('-' reads ids from standard input)")
        if name == "hold":
            sub.add_argument("--reason", metavar="TEXT",
                             help="why (shown by queue show and mailq beside \"held by "
                                  "admin\")")
        if name == "release":
            sub.add_argument("--rescan", action="store_true",
                             help="run the content scanners (clamav, rspamd, ...) again "
                                  "first: release only what they find clean, keep the "
                                  "rest on hold with their new reason")
        if name == "priority":
            sub.add_argument("priority", type=parse_priority, metavar="N",
                             help="the new priority: a whole number from %d (last) to %d "
                                  "(first); 0 is the default" % (PRIORITY_MIN, PRIORITY_MAX))
        _filter_options(sub, for_action=True)

    summary = add("summary", cmd_summary, "messages and Kbytes by state; domains by age "
                                          "(qshape)")
    _filter_options(summary)
    summary.add_argument("--sender-domains", action="store_true",
                         help="count sender domains instead of recipient domains")
    summary.add_argument("--json", action="store_true", help="one JSON object")

    add("reindex", cmd_reindex, "rebuild the index from the spool files")


def _on_cluster(name: str) -> Callable:
    """The handler of `elemtactl --cluster queue NAME` (elemta.cli.clustercmd)."""
    def handler(args):
        from elemta.cli import clustercmd
        return clustercmd.run(name, args)
    return handler


# ---------------------------------------------------------------- mailq

class UsageParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one Failure(EX_USAGE), not exit 2."""

    def error(self, message):
        raise Failure(EX_USAGE, "%s (see %s --help)" % (message, self.prog))


def mailq_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="mailq", description="List the mail queue (Postfix's mailq "
                                                    "layout). Same as: elemtactl queue list.")
    parser.add_argument("--config", metavar="FILE", help="Elemta configuration file")
    parser.add_argument("--spool-dir", metavar="DIR", help="the spool directory")
    _filter_options(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per message")
    parser.add_argument("-v", action="store_true", help=argparse.SUPPRESS)  # sendmail's
    return parser


def mailq_main(argv: Optional[List[str]] = None) -> int:
    """mailq [--json] [selection]: `elemtactl queue list` under Postfix's name."""
    try:
        args = mailq_parser().parse_args(argv)
    except Failure as failure:
        print("mailq: %s" % failure, file=sys.stderr)
        return failure.code
    except SystemExit as exc:   # --help
        return exc.code if isinstance(exc.code, int) else EX_USAGE
    return run(cmd_list, args, prog="mailq")


def run(handler: Callable, args, prog: str = "elemtactl") -> int:
    """Run a handler with the error rules: one line on stderr, a sysexits status."""
    global PROG
    PROG = prog
    import lmdb
    try:
        return handler(args)
    except Failure as failure:
        _complain(str(failure))
        return failure.code
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python from complaining
        # when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_OK
    except lmdb.Error as exc:
        _complain("queue: index: %s" % exc)
        return EX_IOERR
    except PermissionError as exc:
        _complain("queue: %s: %s (run as root or as Elemta's user)"
                  % (exc.filename or "", exc.strerror))
        return EX_NOPERM
    except OSError as exc:
        _complain("queue: %s%s" % (exc.filename + ": " if exc.filename else "",
                                   exc.strerror or exc))
        return EX_IOERR
