"""Reading Postfix's queue files, so `elemtactl import-postfix-queue` can take over its mail.

Owned by no process: used by elemtactl (elemta.cli.pfimport) once, when Elemta replaces
Postfix. Knows Postfix's record format (src/global/record.c, rec_type.h) and nothing of
Elemta's own files: the caller queues what this returns through elemta.queue.

A Postfix queue file is a list of records: one type byte, the length as a base-128 number
(low 7 bits first, the high bit says "more"), then the data. The groups are envelope
(C size, T time, S sender, R recipients, O/o/n DSN, A attributes ...), then M, the content
as N (a line) and L (part of a long line) records, then X, the extracted group (more
recipients: postdrop's sendmail writes them here), then E. A 'p' record points to where
reading goes on (cleanup's header rewrites). A recipient Postfix has delivered or cancelled
has had its R record's type rewritten in place ('D', '/'): those are not to be sent again.
"""

import os
import stat
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

# The queues that hold mail Postfix accepted, in the order its mail moves through them.
STATES = ("maildrop", "incoming", "active", "deferred", "hold")

REC_SIZE, REC_TIME, REC_FROM, REC_RCPT, REC_ORCP = b"C", b"T", b"S", b"R", b"O"
REC_DONE, REC_DRCP, REC_KILL = b"D", b"/", b"K"
REC_MESG, REC_NORM, REC_CONT, REC_XTRA, REC_END, REC_PTR = b"M", b"N", b"L", b"X", b"E", b"p"
REC_DSN_RET, REC_DSN_ENVID, REC_DSN_ORCPT, REC_DSN_NOTIFY = b"<", b"i", b"o", b"n"

# DSN NOTIFY bits as Postfix stores them (src/global/dsn_mask.h).
_NOTIFY_BITS = ((1, "NEVER"), (2, "SUCCESS"), (4, "FAILURE"), (8, "DELAY"))
# A record longer than this is damage, not mail (Postfix's line_length_limit is 2048;
# long lines are cut into L records well below this).
MAX_RECORD = 1 << 20
MAX_POINTERS = 10000


class DamagedQueueFile(ValueError):
    """A Postfix queue file that cannot be read as one: str() says where and why."""


@dataclass
class PostfixRecipient:
    address: str
    notify: Optional[Tuple[str, ...]] = None
    orcpt: Optional[str] = None


@dataclass
class PostfixMessage:
    """What one queue file holds: the envelope still to do and the content."""
    path: str
    queue_id: str
    state: str
    uid: int                           # the file's owner: the submitting user (maildrop)
    sender: str = ""
    arrival: Optional[float] = None
    recipients: List[PostfixRecipient] = field(default_factory=list)
    done: int = 0                      # recipients Postfix already delivered or cancelled
    content: bytes = b""               # CRLF line endings, as Elemta stores content
    ret: Optional[str] = None
    envid: Optional[str] = None


def iter_queue_files(queue_dir):
    """(state, path) of every file under the queues of STATES, oldest state first. A queue
    directory that is missing is skipped; one that cannot be listed raises OSError."""
    for state in STATES:
        top = os.path.join(queue_dir, state)
        if not os.path.isdir(top):
            continue
        found = []
        for directory, subdirs, names in os.walk(top, onerror=_raise):
            subdirs.sort()
            found.extend(os.path.join(directory, n) for n in names)
        for path in sorted(found):
            yield state, path


def _raise(exc):
    raise exc


def read_queue_file(path, state):
    """Parse one queue file. Raises DamagedQueueFile (the path and the reason) or OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DamagedQueueFile("%s: not a regular file" % path)
        data = file.read()
    message = PostfixMessage(path=path, queue_id=os.path.basename(path), state=state,
                             uid=info.st_uid)
    try:
        _parse(data, message)
    except DamagedQueueFile as exc:
        raise DamagedQueueFile("%s: %s" % (path, exc)) from None
    return message


def _records(data):
    """(type, payload) of each record, following 'p' pointers as Postfix's readers do."""
    offset, jumps = 0, 0
    while True:
        if offset >= len(data):
            raise DamagedQueueFile("truncated at byte %d (no end record)" % offset)
        kind = data[offset:offset + 1]
        length, shift, offset = 0, 0, offset + 1
        while True:
            if offset >= len(data):
                raise DamagedQueueFile("truncated in a record length at byte %d" % offset)
            byte = data[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 35:
                raise DamagedQueueFile("bad record length at byte %d" % offset)
        if length > MAX_RECORD or offset + length > len(data):
            raise DamagedQueueFile("truncated: record %r at byte %d runs past the end"
                                   % (kind.decode("latin-1"), offset))
        payload = data[offset:offset + length]
        offset += length
        if kind == REC_PTR:
            try:
                target = int(payload.strip() or b"0")
            except ValueError:
                raise DamagedQueueFile("bad pointer record %r" % payload) from None
            if target:
                jumps += 1
                if jumps > MAX_POINTERS or target >= len(data):
                    raise DamagedQueueFile("bad pointer record to byte %d" % target)
                offset = target
            continue
        yield kind, payload
        if kind == REC_END:
            return


def _text(payload, what):
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedQueueFile("%s is not UTF-8" % what) from None
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise DamagedQueueFile("%s has a control character" % what)
    return text


def _parse(data, message):
    lines, partial = [], []
    section = "envelope"
    notify = orcpt = None
    seen_sender = False
    for kind, payload in _records(data):
        if kind == REC_MESG:
            section = "content"
        elif kind == REC_XTRA:
            section = "extracted"
        elif section == "content" and kind in (REC_NORM, REC_CONT):
            partial.append(payload)
            if kind == REC_NORM:
                lines.append(b"".join(partial))
                partial = []
        elif kind == REC_TIME:
            try:
                message.arrival = float(payload.split()[0])
            except (ValueError, IndexError):
                raise DamagedQueueFile("bad time record %r" % payload) from None
        elif kind == REC_FROM:
            message.sender = _text(payload, "the sender")
            seen_sender = True
        elif kind == REC_DSN_NOTIFY:
            try:
                bits = int(payload)
            except ValueError:
                raise DamagedQueueFile("bad DSN notify record %r" % payload) from None
            notify = tuple(word for bit, word in _NOTIFY_BITS if bits & bit) or None
        elif kind == REC_DSN_ORCPT:
            orcpt = _text(payload, "an original recipient") or None
        elif kind == REC_DSN_RET:
            message.ret = {b"1": "FULL", b"2": "HDRS"}.get(payload.strip())
        elif kind == REC_DSN_ENVID:
            message.envid = _text(payload, "the ENVID") or None
        elif kind == REC_RCPT:
            message.recipients.append(PostfixRecipient(
                _text(payload, "a recipient"), notify, orcpt))
            notify = orcpt = None
        elif kind in (REC_DONE, REC_DRCP):
            message.done += 1
            notify = orcpt = None
        elif kind == REC_END:
            break
    if partial:
        lines.append(b"".join(partial))
    if not seen_sender:
        raise DamagedQueueFile("no sender record")
    if not message.recipients:
        if message.done:
            raise DamagedQueueFile("every recipient is already done (Postfix would remove it)")
        raise DamagedQueueFile("no recipients")
    message.content = b"".join(line + b"\r\n" for line in lines)
