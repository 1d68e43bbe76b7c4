"""The maildrop: where elemta-sendmail leaves local submissions for the pickup process.

Shared by two processes: elemta-sendmail (running as whatever user called it) writes files
here with MaildropWriter; the pickup child (elemta.pickup.worker, the daemon's user) reads
them with read_submission and takes each one's checked queue Envelope from
Submission.queue_envelope, then moves it into the queue. The only module that knows the
maildrop file format, its envelope included. See also elemta.queue.store (the queue's own
files).

Permissions (no setuid or setgid program is needed, so a packaged Python install works):

    spool/             at least 0711: anyone may pass through it, nobody else may list it
    spool/maildrop/    1733, owned by Elemta's user: anyone may create a file, only Elemta
                       may list or read the directory; the sticky bit keeps users from
                       removing or renaming each other's files. This is Postfix's old
                       world-writable maildrop layout (before postdrop became setgid).
    spool/run/         0711; run/pickup.sock is 0666 so any user's sendmail may wake pickup
                       (a hint only: pickup also scans every PICKUP_SCAN seconds)
    spool/public/      0711; public/showq is 0666 so any user's mailq may ask the showq
                       process for the listing (elemta.queue.showq)

The sender's identity is the file's owner (st_uid), which the kernel sets and the user
cannot change; nothing the file says about its author is believed.

A submission is written as a hidden temp file (".tmp-...") with mode 0644, fsync'd, then
renamed to its final name, so pickup never sees a partial file, and the rename is made
durable (sync_rename) before sendmail says the mail is taken. Its layout:

    b"ELEMTA-MAILDROP 1\\n"
    the content, CRLF line endings, byte for byte
    b"\\nELEMTA-ENVELOPE " + one line of ASCII JSON (sender, recipients, DSN) + b"\\n"
    b"ELEMTA-MAILDROP-END %020d %010d\\n"  content length, length of the JSON line

The envelope comes last so sendmail can stream the content while it learns the recipients
(sendmail -t reads them from the headers). Its fields (others are ignored):

    sender      string: "" (the null sender) or a mailbox
    recipients  1..limits.recipients objects {"address": mailbox,
                "notify": null or list of words, "orcpt": "addr-type;address" (optional)}
    ret         null, "FULL" or "HDRS"
    envid       null or the decoded ENVID
    body        "7BIT" or "8BITMIME" (default "7BIT")
    smtputf8    true or false (default false); non-ASCII addresses need true

sendmail runs as any local user, so the envelope is untrusted input, as a client's MAIL and
RCPT are: the same rules apply (elemta.smtp.address for addresses, elemta.smtp.dsn for
NOTIFY, ORCPT and ENVID) and the same limit (limits.recipients, which smtpd enforces at
RCPT). Anything wrong - a field of the wrong type, an unknown NOTIFY word, an ORCPT or ENVID
with a control character, too many recipients - makes the whole submission bad:
BadSubmission names the field and why, pickup logs that once and removes the file.
"""

import errno
import json
import os
import re
import socket
import stat
import time

from elemta.queue.model import Envelope, Recipient
from elemta.smtp.address import AddressError, validate_mailbox
from elemta.smtp.dsn import DsnError, check_envid, check_notify, check_orcpt

MAILDROP_DIR = "maildrop"
RUN_DIR = "run"
SOCKET_NAME = "pickup.sock"
TEMP_PREFIX = ".tmp-"
MAGIC = b"ELEMTA-MAILDROP 1\n"
ENVELOPE_TAG = b"\nELEMTA-ENVELOPE "
FOOTER_FORMAT = b"ELEMTA-MAILDROP-END %020d %010d\n"
FOOTER_LENGTH = len(FOOTER_FORMAT % (0, 0))
_FOOTER_RE = re.compile(rb"\AELEMTA-MAILDROP-END (\d{20}) (\d{10})\n\Z")
MAILDROP_MODE = 0o1733
RUN_MODE = 0o711
PUBLIC_DIR = "public"
PUBLIC_MODE = 0o711
FILE_MODE = 0o644
# An envelope line longer than this is damage (or mischief), not read into memory.
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
COPY_BUFFER = 64 * 1024
# The protocol of a local submission, as its queue Envelope and Received header say.
PROTOCOL = "local"


# Why os.open refused a maildrop entry that can never become a submission.
_NOT_A_SUBMISSION = {errno.ELOOP: "a symbolic link", errno.ENXIO: "a socket",
                     errno.EACCES: "not readable by Elemta's user",
                     errno.EPERM: "not readable by Elemta's user"}


class BadSubmission(ValueError):
    """A maildrop file that is not a complete submission (or not a plain file)."""


def maildrop_dir(spool_dir):
    return os.path.join(os.path.abspath(spool_dir), MAILDROP_DIR)


def socket_path(spool_dir):
    return os.path.join(os.path.abspath(spool_dir), RUN_DIR, SOCKET_NAME)


def prepare(spool_dir, uid=None, gid=None):
    """Create spool/maildrop (1733), spool/run and spool/public (0711) owned by uid:gid,
    and let anyone pass through spool/. Run by the daemon at start-up (as root or as its
    user), and by sendmail run as root when the daemon never ran.

    Everything below spool/ is opened through the spool's descriptor without following
    links and changed with fchown/fchmod: the spool belongs to Elemta's user, who could
    plant a link under either name for root to chown. Raises OSError (UnsafePath for
    a link or a non-directory, naming the path)."""
    from elemta.util.eugid import open_nofollow
    spool_dir = os.path.abspath(spool_dir)
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    spool_fd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        owner = os.fstat(spool_fd)
        uid = owner.st_uid if uid is None else uid
        gid = owner.st_gid if gid is None else gid
        if not owner.st_mode & 0o001:
            os.fchmod(spool_fd, stat.S_IMODE(owner.st_mode) | 0o711)
        for name, mode in ((MAILDROP_DIR, MAILDROP_MODE), (RUN_DIR, RUN_MODE),
                           (PUBLIC_DIR, PUBLIC_MODE)):
            try:
                os.mkdir(name, 0o700, dir_fd=spool_fd)
            except FileExistsError:
                pass
            fd = open_nofollow(name, os.O_RDONLY, kind=stat.S_IFDIR, dir_fd=spool_fd,
                               shown=os.path.join(spool_dir, name))
            try:
                info = os.fstat(fd)
                if os.geteuid() == 0 and (info.st_uid, info.st_gid) != (uid, gid):
                    os.fchown(fd, uid, gid)
                if name == MAILDROP_DIR or not stat.S_IMODE(info.st_mode) & 0o001:
                    os.fchmod(fd, mode)   # not mkdir's mode: the umask must not apply
            finally:
                os.close(fd)
    finally:
        os.close(spool_fd)


def notify(spool_dir):
    """Wake the pickup process (one datagram). Never blocks, never raises."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.sendto(b"!", socket_path(spool_dir))
    except OSError:
        pass                 # no daemon, or it is busy: its periodic scan will find the file
    finally:
        sock.close()


def sync_rename(dir_fd, fd):
    """Make a rename into the directory dir_fd (an O_PATH descriptor) durable before
    sendmail reports success (exit 0, or 250 to -bs). fd: the renamed file, open.

    Root and Elemta's user can open the directory: fsync it, as POSIX asks. Other users
    cannot (1733 is write-only for them), so fsync the file again instead: ext4, XFS and
    btrfs journal the rename with the file's inode (its ctime changes), and a file's fsync
    commits the journal up to its inode's last change, rename included. Its data is clean
    by then, so either way this costs one journal commit.
    No test can show durability across a power cut here (tests/test_sendmail.py checks
    the order of the system calls with strace)."""
    try:
        readable = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except PermissionError:
        os.fsync(fd)
        return
    try:
        os.fsync(readable)
    finally:
        os.close(readable)


def open_maildrop_dir(spool_dir):
    """spool/maildrop as an O_PATH descriptor (a user may only search a 1733 directory),
    never through a link: the spool is Elemta's user's, who could plant one there for
    a root sendmail to write through. Every name inside is then used relative to it."""
    path = maildrop_dir(spool_dir)
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            from elemta.util.eugid import UnsafePath
            raise UnsafePath(exc.errno, "is a symbolic link or not a directory, refused",
                             path) from None
        raise


class MaildropWriter:
    """One submission being written by sendmail: write(content), then finish(envelope)."""

    def __init__(self, spool_dir):
        self.directory = maildrop_dir(spool_dir)
        # Time first, so pickup takes older submissions first.
        self.name = "%014x-%d-%s" % (int(time.time() * 1000000), os.getpid(),
                                     os.urandom(6).hex())
        self.temp_name = TEMP_PREFIX + self.name
        self.path = os.path.join(self.directory, self.name)
        self._dir_fd = open_maildrop_dir(spool_dir)
        try:
            fd = os.open(self.temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600, dir_fd=self._dir_fd)
        except BaseException:
            os.close(self._dir_fd)
            raise
        os.fchmod(fd, FILE_MODE)         # readable by Elemta's user whatever the umask
        self._file = os.fdopen(fd, "wb", buffering=COPY_BUFFER)
        self._file.write(MAGIC)
        self.size = 0
        self.eight_bit = False

    def write(self, data):
        if not self.eight_bit and not data.isascii():
            self.eight_bit = True
        self._file.write(data)
        self.size += len(data)

    def finish(self, sender, recipients, ret=None, envid=None, body=None):
        """Seal the file with its envelope, make it durable and give it its final name
        (pickup may take it from then on); returns that name. recipients:
        elemta.queue.model.Recipient (address, notify, orcpt). body: the declared BODY
        (None for none); the content's own 8-bit bytes make it 8BITMIME anyway."""
        eight_bit = self.eight_bit or body not in (None, "7BIT")
        line = _envelope_line(sender, recipients, ret, envid,
                              "8BITMIME" if eight_bit else "7BIT")
        self._file.write(ENVELOPE_TAG + line + b"\n")
        self._file.write(FOOTER_FORMAT % (self.size, len(line)))
        self._file.flush()
        os.fsync(self._file.fileno())       # the content is on disk before it has a name
        os.rename(self.temp_name, self.name, src_dir_fd=self._dir_fd,
                  dst_dir_fd=self._dir_fd)
        try:
            sync_rename(self._dir_fd, self._file.fileno())
        except OSError:
            # Not durable: take the name back, so the failure sendmail reports is true.
            try:
                os.unlink(self.name, dir_fd=self._dir_fd)
            except OSError:
                pass
            raise
        finally:
            self._file.close()
            self._file = None
            os.close(self._dir_fd)
            self._dir_fd = None
        return self.name

    def abort(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._dir_fd is not None:
            try:
                os.unlink(self.temp_name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            os.close(self._dir_fd)
            self._dir_fd = None


def _envelope_line(sender, recipients, ret, envid, body):
    """The envelope as its one line of ASCII JSON (see the module docstring)."""
    items = []
    for recipient in recipients:
        item = {"address": recipient.address,
                "notify": list(recipient.notify) if recipient.notify else None}
        if recipient.orcpt is not None:
            item["orcpt"] = recipient.orcpt
        items.append(item)
    smtputf8 = not all(a.isascii() for a in [sender] + [r.address for r in recipients])
    envelope = {"sender": sender, "recipients": items, "ret": ret, "envid": envid,
                "body": body, "smtputf8": smtputf8}
    return json.dumps(envelope, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class Submission:
    """A maildrop file opened by pickup: who wrote it, its envelope, its content."""

    def __init__(self, path, file, uid, fields, content_length):
        self.path = path
        self.uid = uid
        self.content_length = content_length
        self._fields = fields            # the envelope's JSON object, not yet checked
        self._file = file

    def queue_envelope(self, queue_id, arrival, max_recipients):
        """The submission's queue Envelope, every field checked (see the module
        docstring); raises BadSubmission naming the file, its writer and the problem."""
        try:
            return _checked_envelope(self._fields, self.uid, queue_id, arrival,
                                     max_recipients)
        except (_BadField, DsnError) as exc:
            raise BadSubmission("%s (uid %d): bad envelope: %s"
                                % (self.path, self.uid, exc)) from None

    def iter_content(self):
        """The content in blocks."""
        self._file.seek(len(MAGIC))
        left = self.content_length
        while left:
            block = self._file.read(min(COPY_BUFFER, left))
            if not block:
                raise BadSubmission("%s: shorter than its footer says" % self.path)
            left -= len(block)
            yield block

    def close(self):
        self._file.close()


def iter_names(spool_dir):
    """Names of complete submissions waiting in the maildrop, oldest name first."""
    return sorted(n for n in os.listdir(maildrop_dir(spool_dir))
                  if not n.startswith("."))


def iter_hidden(spool_dir):
    """Paths of the hidden entries: sendmail's temp files (TEMP_PREFIX), and whatever
    else a user left under a hidden name (pickup removes them when a day old)."""
    directory = maildrop_dir(spool_dir)
    return [os.path.join(directory, n) for n in os.listdir(directory)
            if n.startswith(".")]


def read_submission(path):
    """Open and check one maildrop file; returns a Submission (close it). Raises
    BadSubmission for anything but a complete plain file with one link (a user could
    leave a symlink, a FIFO, a socket, a file pickup may not read or a hard link to
    someone else's file here), and FileNotFoundError if it is gone; another OSError is
    a passing trouble (EMFILE, EIO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _NOT_A_SUBMISSION:
            raise BadSubmission("%s: %s" % (path, _NOT_A_SUBMISSION[exc.errno])) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):      # checked first: fdopen refuses a directory
            raise BadSubmission("%s: not a regular file" % path)
    except BaseException:
        os.close(fd)
        raise
    file = os.fdopen(fd, "rb")
    try:
        if info.st_nlink != 1:
            raise BadSubmission("%s: has %d links" % (path, info.st_nlink))
        if file.read(len(MAGIC)) != MAGIC:
            raise BadSubmission("%s: not a maildrop file" % path)
        if info.st_size < len(MAGIC) + len(ENVELOPE_TAG) + 1 + FOOTER_LENGTH:
            raise BadSubmission("%s: truncated" % path)
        file.seek(info.st_size - FOOTER_LENGTH)
        match = _FOOTER_RE.match(file.read(FOOTER_LENGTH))
        if match is None:
            raise BadSubmission("%s: no footer (incomplete)" % path)
        content_length, envelope_length = int(match.group(1)), int(match.group(2))
        expected = (len(MAGIC) + content_length + len(ENVELOPE_TAG) + envelope_length + 1
                    + FOOTER_LENGTH)
        if expected != info.st_size or envelope_length > MAX_ENVELOPE_BYTES:
            raise BadSubmission("%s: lengths do not match its size" % path)
        file.seek(len(MAGIC) + content_length)
        raw = file.read(len(ENVELOPE_TAG) + envelope_length + 1)
        if not raw.startswith(ENVELOPE_TAG) or not raw.endswith(b"\n"):
            raise BadSubmission("%s: damaged envelope" % path)
        try:
            envelope = json.loads(raw[len(ENVELOPE_TAG):-1].decode("ascii"))
        except (ValueError, RecursionError):       # deep nesting: [[[[...]]]]
            raise BadSubmission("%s: damaged envelope (not JSON)" % path) from None
        if not isinstance(envelope, dict):
            raise BadSubmission("%s: damaged envelope (not a JSON object)" % path)
        return Submission(path, file, info.st_uid, envelope, content_length)
    except BaseException:
        file.close()
        raise


# -- checking an envelope: pickup's door

class _BadField(ValueError):
    """One envelope field's problem; str() is the reason."""


def _checked_envelope(data, uid, queue_id, arrival, max_recipients):
    smtputf8 = data.get("smtputf8", False)
    if not isinstance(smtputf8, bool):
        raise _BadField("smtputf8 must be true or false, not %s" % _shown(smtputf8))
    sender = data.get("sender", "")
    if not isinstance(sender, str):
        raise _BadField("sender must be a string, not %s" % _shown(sender))
    if sender:
        _check_address(sender, smtputf8, "sender")
    items = data.get("recipients")
    if not isinstance(items, list) or not items:
        raise _BadField("recipients must be a non-empty list, not %s" % _shown(items))
    if len(items) > max_recipients:
        # The limit smtpd applies at RCPT (452 4.5.3): a local user gets no more.
        raise _BadField("%d recipients, more than limits.recipients (%d)"
                        % (len(items), max_recipients))
    recipients = [_checked_recipient(item, position, smtputf8)
                  for position, item in enumerate(items)]
    ret = data.get("ret")
    if ret not in (None, "FULL", "HDRS"):
        raise _BadField("ret must be null, FULL or HDRS, not %s" % _shown(ret))
    envid = data.get("envid")
    if envid is not None:
        check_envid(envid)
    body = data.get("body", "7BIT")
    if body not in ("7BIT", "8BITMIME"):
        raise _BadField("body must be 7BIT or 8BITMIME, not %s" % _shown(body))
    return Envelope(queue_id=queue_id, sender=sender, recipients=recipients,
                    arrival=arrival, body=body, smtputf8=smtputf8, ret=ret, envid=envid,
                    client_address="", client_helo="", protocol=PROTOCOL,
                    extra={"uid": uid})


def _checked_recipient(item, position, smtputf8):
    where = "recipient %d" % position
    if not isinstance(item, dict):
        raise _BadField("%s: not a JSON object: %s" % (where, _shown(item)))
    address = item.get("address")
    if not isinstance(address, str):
        raise _BadField("%s: address must be a string, not %s" % (where, _shown(address)))
    _check_address(address, smtputf8, where)
    notify, orcpt = item.get("notify"), item.get("orcpt")
    try:
        if notify is not None:
            notify = check_notify(notify)
        if orcpt is not None:
            check_orcpt(orcpt)
    except DsnError as exc:
        raise _BadField("%s: %s" % (where, exc)) from None
    return Recipient(address, notify or None, orcpt)


def _check_address(address, smtputf8, what):
    try:
        validate_mailbox(address, utf8=smtputf8)
    except AddressError as exc:
        raise _BadField("%s %s: %s" % (what, _shown(address), exc)) from None


def _shown(value):
    """A value for the log line: short, its control characters escaped (repr)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
