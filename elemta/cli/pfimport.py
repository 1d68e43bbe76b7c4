"""`elemtactl import-postfix-queue [DIR]`: move the mail Postfix left queued into Elemta.

Run once by root when Elemta replaces Postfix, so no accepted message is stranded in
Postfix's queue (issue #13). Reads Postfix's files with elemta.queue.postfix_import;
writes through elemta.queue like every other door, so an imported message is as durable
as one smtpd or pickup accepted:

  maildrop   Postfix's cleanup never saw it: it becomes an Elemta maildrop submission,
             written as the user who submitted it, and Elemta's pickup queues it exactly
             as it queues a local sendmail (Received header, plugins, the uid rules).
  incoming, active, deferred
             queued as incoming with the sender, the recipients Postfix had not yet
             delivered, the content as Postfix stored it and its arrival time.
  hold       queued on hold.

Each message: copy, commit (the file and the index record fsync'd), and only then remove
Postfix's file. A crash in between leaves the Postfix file: a second run queues it again
(delivered twice at worst, never lost). A damaged file is named with the reason, left in
place, and makes the exit status non-zero; the others go on.

Postfix's files are read as root (they are Postfix's user's); everything written into
Elemta's spool is written acting as the spool's owner (elemta.util.eugid.acting_as), so
root never follows a path the service user could change. See also: man/elemtactl.8.
"""

import os
import shutil
import subprocess
import sys
import time
from os import EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_NOPERM, EX_OK, EX_TEMPFAIL

from elemta.cli.config_finder import find_config
from elemta.cli.failure import Failure
from elemta.queue import postfix_import
from elemta.util.text import printable

PROG = "elemtactl"
DEFAULT_QUEUE_DIRECTORY = "/var/spool/postfix"


def postfix_queue_directory():
    """`postconf -h queue_directory` when postconf is installed, else Postfix's default."""
    postconf = shutil.which("postconf") or (
        "/usr/sbin/postconf" if os.path.exists("/usr/sbin/postconf") else None)
    if postconf is None:
        return DEFAULT_QUEUE_DIRECTORY
    try:
        result = subprocess.run([postconf, "-h", "queue_directory"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_QUEUE_DIRECTORY
    answer = result.stdout.decode("utf-8", "replace").strip()
    return answer if result.returncode == 0 and answer else DEFAULT_QUEUE_DIRECTORY


def running_postfix_master(queue_dir):
    """The pid of a live Postfix master that owns queue_dir, or None. The master holds
    an exclusive lock on pid/master.pid for as long as it runs (`postfix status` asks the
    same lock): a pid file left by a crash, its number reused, is not mistaken for one."""
    import fcntl
    path = os.path.join(queue_dir, "pid", "master.pid")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        try:
            return int(os.read(fd, 64).split()[0])
        except (ValueError, IndexError):
            return 0
    finally:
        os.close(fd)


def cmd_import_postfix_queue(args) -> int:
    """import-postfix-queue: move Postfix's queued mail (maildrop, incoming, active,
    deferred, hold) into Elemta's queue"""
    queue_dir = os.path.abspath(args.dir or postfix_queue_directory())
    if not os.path.isdir(queue_dir):
        raise Failure(EX_NOINPUT, "import-postfix-queue: %s: no such directory" % queue_dir)
    pid = running_postfix_master(queue_dir)
    if pid is not None:
        raise Failure(EX_TEMPFAIL, "import-postfix-queue: Postfix's master (pid %d, %s) is "
                      "running and would keep changing its queue; stop it first (postfix "
                      "stop)" % (pid, os.path.join(queue_dir, "pid", "master.pid")))
    if not args.dry_run and os.geteuid() != 0:
        raise Failure(EX_NOPERM, "import-postfix-queue: run it as root (it reads Postfix's "
                                 "queue and writes Elemta's)")
    config = find_config(getattr(args, "config", None))
    spool_dir = os.path.abspath(args.spool_dir or config.queue.spool_dir)
    importer = None if args.dry_run else _Importer(config, spool_dir)
    counts = {state: 0 for state in postfix_import.STATES}
    damaged = 0
    try:
        try:
            files = list(postfix_import.iter_queue_files(queue_dir))
        except OSError as exc:
            raise Failure(EX_IOERR, "import-postfix-queue: %s: %s"
                          % (exc.filename or queue_dir, exc.strerror or exc))
        for state, path in files:
            as_postfix = _acting_as_owner_of(os.path.join(queue_dir, state))
            try:
                with as_postfix():
                    message = postfix_import.read_queue_file(path, state)
                if state == "maildrop":
                    _as_local_submission(message, config.origin)
                where = "(dry run)" if importer is None else importer.move(message,
                                                                           as_postfix)
            except postfix_import.DamagedQueueFile as exc:
                damaged += 1
                _complain("%s; left in place" % exc)
                continue
            except OSError as exc:
                damaged += 1
                _complain("%s: %s; left in place" % (exc.filename or path,
                                                     exc.strerror or exc))
                continue
            counts[state] += 1
            print("%s -> %s %s from=<%s> nrcpt=%d%s" % (
                printable(message.queue_id), where, state, printable(message.sender),
                len(message.recipients),
                " (%d already delivered)" % message.done if message.done else ""))
    finally:
        if importer is not None:
            importer.close()
    moved = sum(counts.values())
    print("%s %d message(s) from %s: %s%s" % (
        "would move" if args.dry_run else "moved", moved, queue_dir,
        ", ".join("%s %d" % item for item in counts.items()),
        "; %d damaged file(s) left in place" % damaged if damaged else ""))
    return EX_DATAERR if damaged else EX_OK


def _acting_as_owner_of(directory):
    """A context manager: act as the owner of one of Postfix's queue directories (its
    user, postfix). That user can swap a directory under root's feet for a link (to
    /etc, say); acting as it, root reads and removes nothing it could not itself."""
    from elemta.util.eugid import acting_as
    try:
        info = os.lstat(directory)
    except OSError:
        info = None
    return lambda: acting_as(info.st_uid if info else None, info.st_gid if info else None)


def _as_local_submission(message, origin):
    """Qualify a maildrop message's addresses with the mail name as Elemta's sendmail
    does (Postfix's cleanup had not done it yet: `sendmail root` leaves "root") and check
    them, so pickup never finds a bad submission it would have to discard."""
    from elemta.smtp.address import AddressError, validate_mailbox

    def qualified(address):
        return address + "@" + origin if address and "@" not in address else address

    message.sender = qualified(message.sender)
    for recipient in message.recipients:
        recipient.address = qualified(recipient.address)
    for address in [message.sender] + [r.address for r in message.recipients]:
        if not address:
            continue
        try:
            validate_mailbox(address, utf8=True)
        except AddressError as exc:
            raise postfix_import.DamagedQueueFile("%s: bad address <%s>: %s"
                                                  % (message.path, address, exc)) from None


def _complain(message):
    print("%s: import-postfix-queue: %s" % (PROG, printable(message)), file=sys.stderr)


class _Importer:
    """Elemta's side: the queue, opened and written as the spool's owner."""

    def __init__(self, config, spool_dir):
        from elemta.queue import maildrop
        from elemta.queue.queue import Queue
        from elemta.util.eugid import acting_as
        try:
            owner = os.stat(spool_dir)
        except OSError as exc:
            raise Failure(EX_NOINPUT, "import-postfix-queue: Elemta's spool %s: %s"
                          % (spool_dir, exc.strerror or exc))
        self.spool_dir = spool_dir
        self.as_owner = lambda: acting_as(owner.st_uid, owner.st_gid)
        try:
            maildrop.prepare(spool_dir)
            with self.as_owner():
                self.queue = Queue.from_config(config.queue, spool_dir=spool_dir)
        except OSError as exc:
            raise Failure(EX_IOERR, "import-postfix-queue: Elemta's spool %s: %s"
                          % (spool_dir, exc.strerror or exc))
        self.queued = self.dropped = 0

    def move(self, message, as_postfix):
        """Copy and commit one message into Elemta, then remove Postfix's file (acting
        as Postfix's user). Returns where it went ('elemta QUEUEID' or 'elemta maildrop
        NAME')."""
        if message.state == "maildrop":
            where = "elemta maildrop " + self._to_maildrop(message)
            self.dropped += 1
        else:
            where = "elemta " + self._to_queue(message)
            self.queued += 1
        with as_postfix():
            os.unlink(message.path)    # only now: the copy is durable
        return where

    def _to_queue(self, message):
        from elemta.queue.ids import new_queue_id
        from elemta.queue.model import Envelope, Hold, Recipient
        addresses = [message.sender] + [r.address for r in message.recipients]
        envelope = Envelope(
            queue_id=new_queue_id(), sender=message.sender,
            recipients=[Recipient(r.address, r.notify, r.orcpt) for r in message.recipients],
            arrival=message.arrival or time.time(),
            body="7BIT" if message.content.isascii() else "8BITMIME",
            smtputf8=not all(a.isascii() for a in addresses),
            ret=message.ret, envid=message.envid, protocol="ESMTP",
            extra={"postfix_queue_id": message.queue_id})
        with self.as_owner():
            writer = self.queue.start_message(envelope)
            try:
                writer.write(message.content)
                if message.state == "hold":
                    writer.hold = Hold("postfix", "on hold in the Postfix queue it was "
                                       "imported from (%s)" % message.queue_id, time.time())
                writer.finish()
                self.queue.commit([writer])
            except BaseException:
                writer.abort()
                raise
        return writer.queue_id

    def _to_maildrop(self, message):
        """Written as the user who ran Postfix's sendmail (the file's owner), as their
        own sendmail would have: pickup believes the file's owner, not its words."""
        import pwd
        from elemta.queue import maildrop
        from elemta.util.eugid import acting_as
        try:
            gid = pwd.getpwuid(message.uid).pw_gid
        except KeyError:
            gid = message.uid
        with acting_as(message.uid, gid):
            writer = maildrop.MaildropWriter(self.spool_dir)
            try:
                writer.write(message.content)
                # The content's own 8-bit bytes make it 8BITMIME (the writer sees them).
                return writer.finish(message.sender, message.recipients, message.ret,
                                     message.envid)
            except BaseException:
                writer.abort()
                raise

    def close(self):
        from elemta.queue import maildrop, wakeup
        if self.queued:
            wakeup.notify(self.spool_dir)
        if self.dropped:
            maildrop.notify(self.spool_dir)
        with self.as_owner():
            self.queue.close()


def add_command(commands, parser_class, parents):
    doc = cmd_import_postfix_queue.__doc__.split(": ", 1)[1].replace("\n    ", " ")
    sub = commands.add_parser("import-postfix-queue", parents=parents, help=doc,
                              description=doc)
    sub.add_argument("dir", metavar="DIR", nargs="?",
                     help="Postfix's queue directory (default: postconf -h queue_directory, "
                          "else %s)" % DEFAULT_QUEUE_DIRECTORY)
    sub.add_argument("--spool-dir", metavar="DIR",
                     help="Elemta's spool (default: the configuration's queue.spool_dir)")
    sub.add_argument("--dry-run", action="store_true",
                     help="list what would move; change nothing")
    sub.set_defaults(handler=cmd_import_postfix_queue)
