"""Mailbox writers: append to an mbox file, or drop a file into a Maildir, as Postfix's
local(8) writes them.

Runs in a process that has already become the mailbox's user (elemta.local.privileges
forks it for the local agent), so every file is created and written with that user's
rights. What lands in the mailbox:

    mbox     "From sender asctime" line, Return-Path:, X-Original-To:, Delivered-To:, the
             message with LF line ends and body lines starting "From " quoted as ">From ",
             then an empty line. The file is opened O_APPEND (never through a symbolic
             link, never with a second hard link, never owned by someone else), locked by
             a dot-lock (name.lock) and by fcntl, fsync'd, and cut back to its old size if
             anything fails half-way.
    Maildir  the same headers and message, no From_ line and no quoting, written to
             tmp/<unique>, fsync'd, renamed into new/ and new/ fsync'd; the Maildir and
             its tmp, new and cur directories are made when missing.

See also: elemta.local.deliver (which picks the path), man/newaliases.1.
"""

import errno
import fcntl
import os
import socket
import stat
import time

from elemta.util.text import printable

# Postfix's deliver_lock_attempts, deliver_lock_delay and stale_lock_time.
LOCK_ATTEMPTS = 20
LOCK_DELAY = 1.0
STALE_LOCK_TIME = 500.0
WRITE_CHUNK = 64 * 1024
DEV_NULL = "/dev/null"


class DeliveryFailure(Exception):
    """A delivery that did not happen: temporary (defer) or not (bounce), with the RFC
    3463 status and the text of the reply."""

    def __init__(self, temporary, status, text):
        super().__init__(text)
        self.temporary = temporary
        self.status = status
        self.text = text


class MessageCopy:
    """What a mailbox, file or command receives: the queued content and who it is for.

    content: a binary file object over the queued content (CRLF lines), read from its
    start each time lines() is called."""

    def __init__(self, content, sender, delivered_to, original_recipient, arrival):
        self.content = content
        self.sender = sender
        self.delivered_to = delivered_to
        self.original_recipient = original_recipient
        self.arrival = arrival

    def from_line(self):
        """The mbox separator: "From sender Thu Nov 24 17:22:00 2022" (Postfix's)."""
        return ("From %s %s\n" % (printable(self.sender) or "MAILER-DAEMON",
                                  time.asctime(time.localtime(self.arrival)))).encode("utf-8")

    def delivery_headers(self):
        """Return-Path, X-Original-To and Delivered-To, as local(8) prepends them. The
        envelope values go through printable(): a line break in one (an ORCPT from an
        old queue file) would splice a forged message into an mbox."""
        return ("Return-Path: <%s>\nX-Original-To: %s\nDelivered-To: %s\n"
                % (printable(self.sender), printable(self.original_recipient),
                   printable(self.delivered_to))).encode("utf-8")

    def lines(self):
        """The content's lines with LF line ends; the last one always ends in LF."""
        self.content.seek(0)
        for line in self.content:
            if line.endswith(b"\r\n"):
                line = line[:-2] + b"\n"
            elif not line.endswith(b"\n"):
                line += b"\n"
            yield line

    def mbox_bytes(self):
        """The whole mbox entry, in chunks: From_ line, headers, quoted message, blank."""
        chunk = bytearray(self.from_line() + self.delivery_headers())
        for line in self.lines():
            if line.startswith(b"From "):
                chunk += b">"
            chunk += line
            if len(chunk) >= WRITE_CHUNK:
                yield bytes(chunk)
                chunk.clear()
        chunk += b"\n"
        yield bytes(chunk)

    def plain_bytes(self, from_line=False):
        """Headers and message, unquoted (Maildir; with from_line for commands)."""
        chunk = bytearray((self.from_line() if from_line else b"") + self.delivery_headers())
        for line in self.lines():
            chunk += line
            if len(chunk) >= WRITE_CHUNK:
                yield bytes(chunk)
                chunk.clear()
        yield bytes(chunk)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# ---- mbox -------------------------------------------------------------------------------

def dot_lock(path, required=True):
    """Take path.lock (O_EXCL), waiting for another holder and removing a lock older
    than STALE_LOCK_TIME. Returns the lock's path, or None when it could not be made
    and is not required (a file in a directory the user may not write)."""
    lock = path + ".lock"
    for attempt in range(LOCK_ATTEMPTS):
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
            return lock
        except FileExistsError:
            try:
                if time.time() - os.stat(lock).st_mtime > STALE_LOCK_TIME:
                    os.unlink(lock)
                    continue
            except FileNotFoundError:
                continue
        except OSError as error:
            if not required:
                return None
            raise DeliveryFailure(True, "4.2.0", "cannot create the lock file %s: %s"
                                  % (lock, error.strerror)) from None
        if attempt + 1 < LOCK_ATTEMPTS:
            time.sleep(LOCK_DELAY)
    raise DeliveryFailure(True, "4.2.0", "cannot lock %s: %s exists" % (path, lock))


def _fcntl_lock(fd, path):
    for attempt in range(LOCK_ATTEMPTS):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if attempt + 1 < LOCK_ATTEMPTS:
            time.sleep(LOCK_DELAY)
    raise DeliveryFailure(True, "4.2.0", "cannot lock %s: another process holds it" % path)


def open_mbox(path, owner=None):
    """Open (creating 0600) an mbox file to append to; refuse a symbolic link, a file
    with other hard links, a non-regular file, and one not owned by `owner` (a uid)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DeliveryFailure(True, "4.2.0", "%s is a symbolic link" % path) from None
        raise
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_nlink > 1:
            problem = "has more than one hard link"
        elif owner is not None and st.st_uid != owner:
            problem = "is owned by uid %d, not by the recipient (uid %d)" % (st.st_uid, owner)
        if problem:
            raise DeliveryFailure(True, "4.2.0", "%s %s" % (path, problem))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def deliver_mbox(path, copy, owner=None, dot_lock_required=True):
    """Append copy to the mbox file at path, locked (dot-lock, then fcntl), fsync'd; on
    any failure the file is cut back to its size before. Raises DeliveryFailure or
    OSError."""
    lock = dot_lock(path, dot_lock_required)
    try:
        fd = open_mbox(path, owner)
        try:
            _fcntl_lock(fd, path)
            size = os.fstat(fd).st_size
            try:
                for chunk in copy.mbox_bytes():
                    write_all(fd, chunk)
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)            # also lets go of the fcntl lock
    finally:
        if lock is not None:
            try:
                os.unlink(lock)
            except OSError:
                pass


# ---- Maildir ----------------------------------------------------------------------------

_counter = 0


def unique_name(now=None):
    """A Maildir file name no other delivery can pick: time, microseconds, pid, a
    per-process counter and the host name (with / and : escaped, as Maildir says)."""
    global _counter
    _counter += 1
    now = time.time() if now is None else now
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return "%d.M%dP%dQ%d.%s" % (int(now), int(now * 1e6) % 1000000, os.getpid(),
                                _counter, host)


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_maildir(directory):
    """Create directory/{tmp,new,cur} (0700) where missing; the parent must exist."""
    made = []
    for path in (directory,) + tuple(os.path.join(directory, sub)
                                     for sub in ("tmp", "new", "cur")):
        try:
            os.mkdir(path, 0o700)
            made.append(path)
        except FileExistsError:
            pass
    for path in made:
        _fsync_directory(os.path.dirname(path.rstrip("/")))


def deliver_maildir(directory, copy):
    """Write copy into the Maildir at directory: tmp/ first, fsync, then new/. Returns
    the new file's path. Raises DeliveryFailure or OSError."""
    directory = directory.rstrip("/")
    make_maildir(directory)
    name = unique_name()
    temp = os.path.join(directory, "tmp", name)
    final = os.path.join(directory, "new", name)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            for chunk in copy.plain_bytes():
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    _fsync_directory(os.path.join(directory, "new"))
    return final
