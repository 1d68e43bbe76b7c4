"""The spool: one file per queued message, the truth the index is rebuilt from.

The only module that knows the spool file format. Used by every process that touches the queue
(smtpd and pickup write, delivery reads and removes, elemtactl reads), always through
elemta.queue.queue.Queue or directly for reading. See also elemta.queue.index (the LMDB index)
and elemta.queue.queue (which makes files and records durable together).

Layout under spool_dir:

    tmp/<qid>.tmp          a message being received; locked (flock) by its writer while open
    messages/<c>/<qid>     accepted messages; <c> is the qid's last character (random: 32
                           evenly filled directories, as Postfix's hash_queue_depth = 1)
    corrupt/<qid>[.n]      truncated or unreadable files set aside by reconcile, never deleted
    hold/<qid>             a marker: the message is on hold (as Postfix's hold queue, but
                           the message file stays where it is). The marker, not the index,
                           is the truth: reconcile and reindex rebuild the hold state from it.
                           It holds one line of JSON, who held it and why (model.Hold);
                           an older Elemta's markers are empty (reason unknown)

A message file is:

    b"ELEMTA-QUEUE 1\\n"                      magic and format version
    envelope as one line of ASCII JSON, b"\\n"  (its "size" is filled in from the footer)
    the content, byte for byte
    b"\\nELEMTA-END %020d %08x\\n"             content length and CRC-32 of the content

A file cut short anywhere (crash, full disk) fails the footer check, so it is never mistaken
for a whole message. The CRC catches blocks that never reached the disk in a file that has
its full length: it is checked when the content is read to the end (see open_content).
"""

import dataclasses
import fcntl
import io
import json
import logging
import os
import re
import zlib

from elemta.queue.ids import ALPHABET, is_queue_id
from elemta.util.eugid import open_nofollow
from elemta.util.text import printable
from elemta.queue.model import Envelope, Hold, Recipient

log = logging.getLogger(__name__)

MAGIC = b"ELEMTA-QUEUE 1\n"
FOOTER_FORMAT = b"\nELEMTA-END %020d %08x\n"
FOOTER_LENGTH = len(FOOTER_FORMAT % (0, 0))
_FOOTER_RE = re.compile(rb"\nELEMTA-END (\d{20}) ([0-9a-f]{8})\n\Z")
# An envelope line longer than this is treated as damage, not read into memory.
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024
WRITE_BUFFER = 64 * 1024
READ_BUFFER = 64 * 1024
TEMP_SUFFIX = ".tmp"
# A hold marker is one short JSON line; anything longer is not ours (and is not read whole).
MAX_MARKER = 8192


class CorruptSpoolFile(ValueError):
    """A spool file that is truncated, damaged or not a spool file at all."""


def envelope_to_dict(envelope):
    """The envelope as plain JSON-able data (also used by elemta.queue.index).

    A shallow copy, not dataclasses.asdict: asdict deep-copies every field and cost
    more than the rest of queueing a small message together.
    """
    data = dict(vars(envelope))
    data["recipients"] = [dict(vars(r)) for r in envelope.recipients]
    data["extra"] = dict(envelope.extra)
    return data


# json.dumps(value, separators=(",", ":")) without a JSONEncoder made per call (per message).
_compact_json = json.JSONEncoder(separators=(",", ":")).encode

_FIELD_NAMES = {}      # dataclass -> frozenset of its field names (looked up per record)


def _known_fields(cls, data):
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    if names.issuperset(data):
        return dict(data)
    return {k: v for k, v in data.items() if k in names}


def envelope_from_dict(data):
    """Inverse of envelope_to_dict. Unknown keys (from a newer Elemta) are ignored."""
    fields = _known_fields(Envelope, data)
    recipients = []
    for item in fields.get("recipients", ()):
        recipient = _known_fields(Recipient, item)
        if recipient.get("notify") is not None:
            recipient["notify"] = tuple(recipient["notify"])
        recipients.append(Recipient(**recipient))
    fields["recipients"] = recipients
    return Envelope(**fields)


class SpoolWriter:
    """One message being written to tmp/. Made by SpoolStore.create.

    write() streams content straight to the file (only a small buffer in memory); finish()
    seals it with the footer; Queue.commit renames it into messages/ and makes it durable.
    abort() throws it away at any point before commit.
    """

    def __init__(self, envelope, temp_path, file):
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self.temp_path = temp_path
        self.size = 0
        self.finished = False
        self.committed = False
        self.hold = None         # a model.Hold: enter the queue on hold (a quarantine)
        self._file = file
        self._crc = 0
        self._content_offset = None      # where the content starts (set by create)

    def write(self, data):
        """Append content bytes."""
        if self._file is None:
            raise ValueError("spool writer for %s is closed" % self.queue_id)
        self._file.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self.size += len(data)

    def replace_envelope(self, envelope):
        """Give the message being written a new envelope, its content kept: the
        recipients of a message a header or body check REDIRECTs change after the
        content has streamed in. The envelope line heads the file, so the file is
        written again (a temp file copied from this one, renamed over it): blocking disk
        work, to be run in a thread. Raises OSError (the message is then to be aborted)."""
        if self._file is None:
            raise ValueError("spool writer for %s is closed" % self.queue_id)
        self._file.flush()
        line = _compact_json(envelope_to_dict(envelope)).encode("ascii")
        new_path = self.temp_path + ".new"
        source = open_nofollow(self.temp_path, os.O_RDONLY)
        try:
            offset = self._content_offset
            fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o600)
            file = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                file.write(MAGIC + line + b"\n")
                while True:
                    chunk = os.pread(source, READ_BUFFER, offset)
                    if not chunk:
                        break
                    file.write(chunk)
                    offset += len(chunk)
                file.flush()
                os.rename(new_path, self.temp_path)
            except BaseException:
                _close_quietly(file)
                try:
                    os.unlink(new_path)
                except FileNotFoundError:
                    pass
                raise
        finally:
            os.close(source)
        _close_quietly(self._file)
        self._file, self.envelope = file, envelope
        self._content_offset = len(MAGIC) + len(line) + 1

    def finish(self):
        """Write the footer, flush and close (no fsync: Queue.commit makes it durable)."""
        if self._file is None:
            raise ValueError("spool writer for %s is closed" % self.queue_id)
        file, self._file = self._file, None
        try:
            file.write(FOOTER_FORMAT % (self.size, self._crc))
            file.flush()
        finally:
            _close_quietly(file)
        self.envelope.size = self.size
        self.finished = True

    def abort(self):
        """Remove the temp file. Safe to call twice, after a failed write, or after commit."""
        if self._file is not None:
            file, self._file = self._file, None
            _close_quietly(file)
        self.finished = False
        if not self.committed:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass

    def _mark_committed(self):
        self.committed = True


def _close_quietly(file):
    try:
        file.close()
    except OSError:
        pass  # a failed flush at close (full disk) leaves a temp file that abort removes


class _ContentWindow(io.RawIOBase):
    """The content bytes of a spool file, read with pread; checks the CRC at the end.

    The CRC is checked only when the content was read from its start to its end in order;
    seeking elsewhere than the start turns the check off.
    """

    def __init__(self, fd, offset, length, crc, name):
        super().__init__()
        self._fd = fd
        self._offset = offset
        self._length = length
        self._expected_crc = crc
        self._crc = 0
        self._verify = True
        self._pos = 0
        self.name = name

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        remaining = self._length - self._pos
        if remaining <= 0 or len(buffer) == 0:
            return 0
        with memoryview(buffer) as view:
            want = min(len(view), remaining)
            data = os.pread(self._fd, want, self._offset + self._pos)
            if not data:
                raise CorruptSpoolFile("%s: shorter than its footer says" % self.name)
            n = len(data)
            view[:n] = data
        self._pos += n
        if self._verify:
            self._crc = zlib.crc32(data, self._crc)
            if self._pos == self._length and self._crc != self._expected_crc:
                raise CorruptSpoolFile("%s: content checksum mismatch" % self.name)
        return n

    def seek(self, pos, whence=io.SEEK_SET):
        if whence == io.SEEK_CUR:
            pos += self._pos
        elif whence == io.SEEK_END:
            pos += self._length
        if pos < 0:
            raise ValueError("negative seek position")
        if pos != self._pos:
            self._verify = pos == 0
            self._crc = 0
        self._pos = pos
        return pos

    def tell(self):
        return self._pos

    def close(self):
        if not self.closed:
            os.close(self._fd)
        super().close()


def _make_private_dir(path, owner):
    """mkdir 0700; when root (elemtactl) creates it, give it to the spool's owner, so the
    daemon's unprivileged workers can still use it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(path, owner.st_uid, owner.st_gid)


class SpoolStore:
    """The spool directory: creates, reads, lists and removes message files."""

    def __init__(self, spool_dir):
        self.spool_dir = os.path.abspath(spool_dir)
        self.tmp_dir = os.path.join(self.spool_dir, "tmp")
        self.messages_dir = os.path.join(self.spool_dir, "messages")
        self.corrupt_dir = os.path.join(self.spool_dir, "corrupt")
        self.hold_dir = os.path.join(self.spool_dir, "hold")
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        owner = os.stat(self.spool_dir)
        for path in ([self.tmp_dir, self.messages_dir, self.corrupt_dir, self.hold_dir]
                     + [os.path.join(self.messages_dir, c) for c in ALPHABET]):
            _make_private_dir(path, owner)

    # -- naming

    def path(self, queue_id):
        """Where an accepted message's file lives. Raises ValueError for a non-id."""
        if not is_queue_id(queue_id):
            raise ValueError("not a queue id: %r" % (queue_id,))
        return os.path.join(self.messages_dir, queue_id[-1], queue_id)

    def directory(self, queue_id):
        """The fan-out directory holding this message (to fsync after a rename)."""
        return os.path.dirname(self.path(queue_id))

    # -- writing

    def create(self, envelope):
        """Start a message: a locked temp file with the header written. Returns a SpoolWriter."""
        temp_path = os.path.join(self.tmp_dir, envelope.queue_id + TEMP_SUFFIX)
        self.path(envelope.queue_id)  # validates the id before it names a file
        fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        file = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
        try:
            # Held until finish() closes the file: reconcile skips a temp file still locked.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            file.write(MAGIC)
            line = _compact_json(envelope_to_dict(envelope))
            file.write(line.encode("ascii") + b"\n")
        except BaseException:
            _close_quietly(file)
            os.unlink(temp_path)
            raise
        writer = SpoolWriter(envelope, temp_path, file)
        writer._content_offset = len(MAGIC) + len(line) + 1
        return writer

    def install(self, writer):
        """Rename a finished writer's temp file into messages/. Returns the final path."""
        if not writer.finished:
            raise ValueError("spool writer for %s is not finished" % writer.queue_id)
        final_path = self.path(writer.queue_id)
        os.rename(writer.temp_path, final_path)
        writer._mark_committed()
        return final_path

    # -- reading

    def _layout(self, queue_id, file, whole_envelope=True):
        """Parse and check a whole file's framing: (envelope, content offset, length, crc).
        Without whole_envelope the envelope line is only checked to be a JSON object
        naming this queue id, and None stands for the envelope: a reader of the content
        (a delivery, message after message) has the envelope from the index already."""
        name = self.path(queue_id)
        file_size = os.fstat(file.fileno()).st_size
        if file.read(len(MAGIC)) != MAGIC:
            raise CorruptSpoolFile("%s: bad magic or unknown version" % name)
        line = file.readline(MAX_ENVELOPE_BYTES)
        if not line.endswith(b"\n"):
            raise CorruptSpoolFile("%s: envelope line cut short" % name)
        offset = len(MAGIC) + len(line)
        length = file_size - offset - FOOTER_LENGTH
        if length < 0:
            raise CorruptSpoolFile("%s: truncated (no room for the footer)" % name)
        file.seek(file_size - FOOTER_LENGTH)
        match = _FOOTER_RE.match(file.read(FOOTER_LENGTH))
        if match is None:
            raise CorruptSpoolFile("%s: truncated (no footer)" % name)
        if int(match.group(1)) != length:
            raise CorruptSpoolFile("%s: footer length %s, found %d content bytes"
                                   % (name, int(match.group(1)), length))
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            envelope = envelope_from_dict(data) if whole_envelope else None
        except (ValueError, TypeError, AttributeError) as e:
            raise CorruptSpoolFile("%s: bad envelope: %s" % (name, e))
        if data.get("queue_id") != queue_id:
            raise CorruptSpoolFile("%s: holds queue id %s"
                                   % (name, printable(str(data.get("queue_id")))))
        if envelope is not None:
            envelope.size = length
        return envelope, offset, length, int(match.group(2), 16)

    def _open_message(self, queue_id):
        """The message file opened for reading, never through a link, and only if it is
        a plain file with one name (whatever a link or hard link planted in the spool
        points at is not shown or sent as a queued message). A root reader (the local
        agent) also takes only a file of the spool's owner or root: the spool's owner
        could otherwise point root at a file it may not read. Raises OSError
        (elemta.util.eugid.UnsafePath for such a file)."""
        path = self.path(queue_id)
        owners = {0, os.stat(self.spool_dir).st_uid} if os.geteuid() == 0 else None
        return os.fdopen(open_nofollow(path, os.O_RDONLY, owners=owners), "rb")

    def read_envelope(self, queue_id):
        """The message's Envelope (size = content length). Raises CorruptSpoolFile,
        FileNotFoundError."""
        with self._open_message(queue_id) as file:
            return self._layout(queue_id, file)[0]

    def open_content(self, queue_id):
        """A binary file object (io.BufferedReader) over the content only, never whole in
        memory. Reading it to the end raises CorruptSpoolFile if the CRC does not match.
        The caller closes it."""
        path = self.path(queue_id)
        file = self._open_message(queue_id)
        try:
            _, offset, length, crc = self._layout(queue_id, file, whole_envelope=False)
            fd = os.dup(file.fileno())
        finally:
            file.close()
        return io.BufferedReader(_ContentWindow(fd, offset, length, crc, path), READ_BUFFER)

    def is_complete(self, queue_id):
        """True if the file exists and its framing and envelope are whole."""
        try:
            self.read_envelope(queue_id)
        except (OSError, CorruptSpoolFile):
            return False
        return True

    def iter_queue_ids(self):
        """Ids of all files in messages/ (complete or not), in no particular order."""
        for c in ALPHABET:
            with os.scandir(os.path.join(self.messages_dir, c)) as entries:
                for entry in entries:
                    if is_queue_id(entry.name):
                        yield entry.name

    # -- removing

    def remove(self, queue_id):
        """Delete a message file. Returns False if it was already gone."""
        try:
            os.unlink(self.path(queue_id))
        except FileNotFoundError:
            return False
        return True

    # -- hold markers

    def hold_path(self, queue_id):
        """The hold marker of a message. Raises ValueError for a non-id."""
        if not is_queue_id(queue_id):
            raise ValueError("not a queue id: %r" % (queue_id,))
        return os.path.join(self.hold_dir, queue_id)

    def mark_held(self, queue_id, hold=None, replace=False):
        """Put a message on hold: create its marker holding `hold` (a model.Hold; the
        caller flushes hold_dir). A marker already there keeps what it says (the first
        to hold a message gave the reason that matters) unless replace. The reason is
        not flushed on its own: the index has it too, and a marker left empty by a
        crash still holds the message."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.hold_path(queue_id), flags | (os.O_TRUNC if replace else 0), 0o600)
        try:
            if hold is not None and (replace or os.fstat(fd).st_size == 0):
                os.write(fd, json.dumps(hold.to_dict(), separators=(",", ":")).encode(
                    "ascii") + b"\n")
        finally:
            os.close(fd)

    def read_hold(self, queue_id):
        """The model.Hold a marker records, or None (no marker, an empty or unreadable
        one). Read without following a link, at most MAX_MARKER bytes."""
        try:
            fd = os.open(self.hold_path(queue_id),
                         os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            data = os.read(fd, MAX_MARKER)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            return Hold.from_dict(json.loads(data.decode("ascii")))
        except ValueError:
            return None

    def unmark_held(self, queue_id):
        """Take a message off hold. Returns False if it was not on hold."""
        try:
            os.unlink(self.hold_path(queue_id))
        except FileNotFoundError:
            return False
        return True

    def is_held(self, queue_id):
        return os.path.exists(self.hold_path(queue_id))

    def iter_held(self):
        """Ids with a hold marker, in no particular order."""
        with os.scandir(self.hold_dir) as entries:
            for entry in entries:
                if is_queue_id(entry.name):
                    yield entry.name

    def quarantine(self, queue_id):
        """Move a damaged message file to corrupt/ (never deleted). Returns the new path."""
        target = os.path.join(self.corrupt_dir, queue_id)
        n = 0
        while os.path.exists(target):
            n += 1
            target = os.path.join(self.corrupt_dir, "%s.%d" % (queue_id, n))
        os.rename(self.path(queue_id), target)
        return target

    def clean_tmp(self):
        """Remove temp files no writer holds any more (left by a crash or kill -9).

        A temp file still locked by a live writer, in any process, is left alone. Returns
        the names removed.
        """
        removed = []
        with os.scandir(self.tmp_dir) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            path = os.path.join(self.tmp_dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        return removed
