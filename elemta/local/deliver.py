"""One recipient of one queued message, start to end: read the message from the spool,
expand aliases and .forward files, write every mailbox, file and command as its user,
queue one new message for the addresses outside the local domains, and say what happened.

Runs in a process the local agent forks for each recipient (elemta.local.agent): it is
still root (when the agent is), and forks again, through elemta.local.privileges, for
each piece of work done as a user. What it answers, as (status, reply):

    sent      250 2.0.0 delivered to mailbox | maildir | file: /path | command: cmd,
              forwarded as <queue id> (joined with ", " when there are several)
    bounced   the first permanent failure (550 5.1.1 unknown user, 550 5.4.6 mail
              forwarding loop, 550 5.7.1 mail to command is restricted, a command's
              sysexits.h code...): the sender gets a DSN
    deferred  the first temporary failure (a mailbox that cannot be locked, EX_TEMPFAIL,
              an unreadable .forward...): the recipient is tried again, whole

Where a mailbox is (local.home_mailbox): "" is mbox in mail_spool_directory/USER, written
by the user with the spool directory's group added when that directory is group-writable
(as Debian's setgid-mail tools do: /var/mail is root:mail 2775); "Maildir/" (ends in /)
is a Maildir in the home directory; anything else is an mbox file in the home directory.
A new mbox file is 0600 and owned by the user, as Postfix makes it.
See also: elemta.local.expand, elemta.local.mailbox, elemta.local.command.
"""

import errno
import itertools
import logging
import os
import pwd
import stat
import time
from types import SimpleNamespace

from elemta.addressing.normal import normal_address
from elemta.addressing.resolve import Addressing
from elemta.addressing.virtual import AliasExpansionError, VirtualAliases, expanded_recipients
from elemta.local import command as commands
from elemta.local.expand import (COMMAND, FAILED, FILE, FORWARD, MAILBOX, Expander,
                                 InsecureFile, Lookups, TemporaryLookupError, summarize)
from elemta.local.mailbox import (DEV_NULL, DeliveryFailure, MessageCopy, deliver_maildir,
                                  deliver_mbox)
from elemta.local.privileges import ChildFailed, is_root, run_as
from elemta.maps import TableUnavailable
from elemta.queue import wakeup
from elemta.queue.ids import new_queue_id
from elemta.queue.model import BOUNCED, RCPT_DEFERRED, SENT, Envelope, Recipient
from elemta.queue.queue import Queue
from elemta.util.text import printable

log = logging.getLogger("elemta.local")

# A .forward or :include: file larger than this is not read.
MAX_LIST_FILE = 1024 * 1024
# Headers read for Delivered-To, at most.
MAX_HEADER_BYTES = 1024 * 1024
MBOX, MAILDIR = "mbox", "maildir"


def delivered_to_headers(content):
    """The addresses of the message's Delivered-To: headers, lower case."""
    found, current, size = [], None, 0
    content.seek(0)
    for line in content:
        size += len(line)
        text = line.rstrip(b"\r\n")
        if not text or size > MAX_HEADER_BYTES:
            break
        if text[:1] in (b" ", b"\t") and current is not None:
            current += b" " + text.strip()
            continue
        if current is not None:
            found.append(current)
        current = text
    if current is not None and size <= MAX_HEADER_BYTES:
        found.append(current)
    values = []
    for header in found:
        name, colon, value = header.partition(b":")
        if colon and name.strip().lower() == b"delivered-to":
            values.append(value.decode("utf-8", "replace").strip().strip("<>").lower())
    return values


def _original_address(recipient):
    """The address an ORCPT names ("rfc822;a@b" -> "a@b"), else the recipient's own."""
    orcpt = recipient.get("orcpt")
    if orcpt and ";" in orcpt:
        return orcpt.split(";", 1)[1]
    return recipient["address"]


# ---- reading .forward and :include: files (in a process that became the user) ---------

def read_forward_as_user(home, names, uid):
    """{"text", "path"} of the first .forward found, {"ignored": why}, {"error": why} or
    None. Postfix's rules: a regular file owned by the user or root, not group- or
    world-writable."""
    for name in names:
        path = os.path.join(home, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            if error.errno == errno.EACCES:
                return {"ignored": "cannot read %s: %s" % (path, error.strerror)}
            return {"error": "cannot read %s: %s" % (path, error.strerror)}
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return {"ignored": "%s is not a regular file" % path}
            if st.st_uid not in (0, uid):
                return {"ignored": "%s is owned by uid %d, not by its user"
                                   % (path, st.st_uid)}
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return {"ignored": "%s is group or world writable" % path}
            return {"text": f.read(MAX_LIST_FILE).decode("utf-8", "replace"), "path": path}
    return None


def read_include_as_user(path):
    """{"text", "owner"} of an :include: file, {"refused": why} or {"error": why}.
    Postfix's rules (local/include.c): a regular file (a link to one is fine) that others
    cannot write, since whoever can write it chooses where the mail goes and which
    commands run with its owner's rights. Postfix refuses only world-writable files;
    group-writable ones are refused too, as for .forward files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        return {"error": "cannot read :include: file %s: %s" % (path, error.strerror)}
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return {"refused": ":include: file %s is not a regular file" % path}
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return {"refused": ":include: file %s is %s writable (mode %04o): refused; "
                               "chmod go-w it" % (
                                   path, "world" if st.st_mode & stat.S_IWOTH else "group",
                                   stat.S_IMODE(st.st_mode))}
        return {"text": f.read(MAX_LIST_FILE).decode("utf-8", "replace"),
                "owner": st.st_uid}


class SystemLookups(Lookups):
    """Users from the password database; files read by a process that became the user."""

    def __init__(self, warn):
        self.warn = warn

    def user(self, name):
        try:
            return pwd.getpwnam(name)
        except (KeyError, UnicodeEncodeError, ValueError):
            return None

    def user_by_uid(self, uid):
        try:
            return pwd.getpwuid(uid)
        except KeyError:
            return None

    def read_forward(self, user, extension, delimiter="+"):
        names = [".forward"]
        # A plain file name in the home, never a path (".forward+a/b" would look below
        # a directory): such an extension falls back to .forward. The delimiter is the
        # one the address used (Postfix's $recipient_delimiter in forward_path).
        if extension and delimiter and "/" not in extension and \
                not extension.startswith("."):
            names.insert(0, ".forward" + delimiter + extension)
        try:
            found = run_as(user, read_forward_as_user, user.pw_dir, names, user.pw_uid)
        except ChildFailed as error:
            raise TemporaryLookupError(str(error)) from None
        if found is None:
            return None
        if "error" in found:
            raise TemporaryLookupError(found["error"])
        if "ignored" in found:
            self.warn("%s: ignored, delivering to the mailbox" % found["ignored"])
            return None
        return found["text"], found["path"]

    def read_include(self, path, rights):
        try:
            found = run_as(rights, read_include_as_user, path)
        except ChildFailed as error:
            raise TemporaryLookupError(str(error)) from None
        if "error" in found:
            raise TemporaryLookupError(found["error"])
        if "refused" in found:
            raise InsecureFile(found["refused"])
        return found["text"], found["owner"]


# ---- one recipient ---------------------------------------------------------------------

class RecipientDelivery:
    """Delivers one recipient ({"address", "orcpt", "notify"}) of one queued message."""

    def __init__(self, config, addressing, aliases, store, queue_id, recipient):
        self.config = config
        self.local = config.local
        self.addressing = addressing
        self.aliases = aliases
        self.store = store
        self.queue_id = queue_id
        self.recipient = recipient
        self.envelope = None
        self.copy = None

    def warn(self, message):
        log.warning("%s: to=<%s>: %s", self.queue_id, self.recipient["address"], message)

    def run(self):
        """(status, reply) for the recipient."""
        try:
            self.envelope = self.store.read_envelope(self.queue_id)
            content = self.store.open_content(self.queue_id)
        except (OSError, ValueError) as error:
            return RCPT_DEFERRED, "451 4.3.0 cannot read queue file %s: %s" % (
                self.queue_id, error)
        with content:
            # Delivered-To in the form the loop check compares ("root"@x is root@x).
            self.copy = MessageCopy(content, self.envelope.sender,
                                    normal_address(self.recipient["address"]),
                                    _original_address(self.recipient), self.envelope.arrival)
            expander = Expander(self.local, self.addressing, self.aliases,
                                SystemLookups(self.warn), delivered_to_headers(content),
                                self.warn)
            targets = expander.expand(self.recipient["address"])
            results, forwards = [], []
            for target in targets:
                if target.kind == FAILED:
                    results.append((target.status, target.value))
                elif target.kind == FORWARD:
                    forwards.append(target.value)
                else:
                    results.append(self.deliver_target(target))
            if forwards and not any(status == RCPT_DEFERRED for status, _ in results):
                results.append(self.forward(forwards))
        return summarize(results)

    def deliver_target(self, target):
        try:
            if target.kind == MAILBOX:
                return self.mailbox(target)
            if target.kind == FILE:
                return self.file(target)
            if target.kind == COMMAND:
                return self.command(target)
        except ChildFailed as error:
            return RCPT_DEFERRED, "451 4.3.0 %s" % error
        raise ValueError("unknown target kind %r" % target.kind)

    def mailbox(self, target):
        user = pwd.getpwnam(target.value)
        home_mailbox = self.local.home_mailbox
        groups = ()
        if not home_mailbox:
            spool = self.local.mail_spool_directory
            path, kind = os.path.join(spool, user.pw_name), MBOX
            try:
                st = os.stat(spool)
                if st.st_mode & stat.S_IWGRP and not st.st_mode & stat.S_IWOTH:
                    groups = (st.st_gid,)
            except OSError as error:
                return RCPT_DEFERRED, "451 4.3.0 mail_spool_directory %s: %s" % (
                    spool, error.strerror)
        else:
            path = os.path.join(user.pw_dir, home_mailbox)
            kind = MAILDIR if home_mailbox.endswith("/") else MBOX
        owner = user.pw_uid if is_root() else None
        return tuple(run_as(user, self._write, kind, path, owner, True, "mailbox",
                            extra_groups=groups))

    def file(self, target):
        if target.value == DEV_NULL:
            return SENT, "250 2.0.0 delivered to file: %s" % DEV_NULL
        user = pwd.getpwnam(target.rights)
        kind = MAILDIR if target.value.endswith("/") else MBOX
        return tuple(run_as(user, self._write, kind, target.value, None, False,
                            "file: %s" % target.value))

    def command(self, target):
        user = pwd.getpwnam(target.rights)
        local, _, domain = target.recipient.rpartition("@")
        env = commands.command_environment(
            target.user, target.recipient, local, target.extension, domain,
            self.envelope.sender, _original_address(self.recipient), user.pw_dir,
            user.pw_shell)
        return tuple(run_as(user, self._run_command, target.value, env, user.pw_dir))

    # -- in the process that became the user

    def _write(self, kind, path, owner, dot_lock_required, what):
        try:
            if kind == MAILDIR:
                deliver_maildir(path, self.copy)
                return SENT, "250 2.0.0 delivered to %s" % (
                    "maildir" if what == "mailbox" else what)
            deliver_mbox(path, self.copy, owner, dot_lock_required)
            return SENT, "250 2.0.0 delivered to %s" % what
        except DeliveryFailure as failure:
            return (RCPT_DEFERRED if failure.temporary else BOUNCED,
                    "%s %s %s" % ("451" if failure.temporary else "550", failure.status,
                                  failure.text))
        except OSError as error:
            return _os_failure(error, path)

    def _run_command(self, command, env, home):
        cwd = home if home and os.path.isdir(home) and os.access(home, os.X_OK) else "/"
        return commands.run_command(command, self.copy.plain_bytes(from_line=True), env,
                                    cwd, self.local.command_timeout)

    # -- addresses outside the local domains

    def forward(self, addresses):
        """Queue one new message (same sender, Delivered-To added) for addresses, as the
        spool's owner, their virtual aliases expanded first as for any mail queued
        (elemta.addressing.virtual; Postfix's local forwards through cleanup).
        (status, reply)."""
        try:
            targets = self._virtual_targets(addresses)
        except (TableUnavailable, AliasExpansionError) as error:
            log.warning("%s: to=<%s>: cannot forward to %s: %s", self.queue_id,
                        self.recipient["address"], ", ".join("<%s>" % a for a in addresses),
                        error)
            if getattr(error, "permanent", False):     # an alias result too long
                return BOUNCED, "%d %s cannot expand the forwarded addresses: %s" % (
                    error.code, error.status, error)
            return RCPT_DEFERRED, "451 4.3.0 cannot expand the forwarded addresses: %s" % (
                error,)
        spool = self.config.queue.spool_dir
        st = os.stat(spool)
        try:
            name = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            name = str(st.st_uid)
        owner = SimpleNamespace(pw_name=name, pw_uid=st.st_uid, pw_gid=st.st_gid)
        try:
            queue_id = run_as(owner, self._queue_forward, targets)
        except ChildFailed as error:
            return RCPT_DEFERRED, "451 4.3.0 cannot queue the forwarded message: %s" % error
        log.info("%s: to=<%s>: forwarded as %s to %s", self.queue_id,
                 self.recipient["address"], queue_id,
                 ", ".join("<%s>" % a for a in addresses))
        return SENT, "250 2.0.0 forwarded as %s" % queue_id

    def _virtual_targets(self, addresses):
        """The addresses with their virtual aliases expanded (a list of the same when
        virtual.alias_maps is unset); raises TableUnavailable or AliasExpansionError."""
        aliases = VirtualAliases.from_config(self.config, Addressing.from_config(self.config))
        if aliases is None:
            return list(addresses)
        return [r.address for r in expanded_recipients(
            [Recipient(a) for a in addresses], aliases.expand)]

    def _queue_forward(self, addresses):
        envelope, original = self.envelope, self.recipient
        notify = original.get("notify")
        orcpt = original.get("orcpt") or "rfc822;%s" % original["address"]
        forwarded = Envelope(
            queue_id=new_queue_id(), sender=envelope.sender,
            recipients=[Recipient(a, tuple(notify) if notify else None, orcpt)
                        for a in addresses],
            arrival=time.time(), body=envelope.body, smtputf8=envelope.smtputf8,
            ret=envelope.ret, envid=envelope.envid, client_address="",
            client_helo=self.config.hostname, protocol="local",
            # What the sender asked of every hop goes on with the copy (RFC 8689 4.1:
            # REQUIRETLS is not dropped by forwarding), as do its priority and the
            # message-level marks in extra (a double bounce forwarded stays one, so its
            # failure cannot start a bounce loop).
            requiretls=envelope.requiretls, priority=envelope.priority,
            extra=dict(envelope.extra))
        with Queue.from_config(self.config.queue) as queue:
            content = self.copy.content
            content.seek(0)
            delivered_to = ("Delivered-To: %s\r\n"
                            % printable(normal_address(original["address"])))
            queue.add(forwarded, itertools.chain(
                [delivered_to.encode("utf-8")], iter(lambda: content.read(65536), b"")))
        wakeup.notify(self.config.queue.spool_dir)
        return forwarded.queue_id


def _os_failure(error, path):
    """(status, reply) for a mailbox or file that could not be written."""
    if error.errno in (errno.EDQUOT, errno.EFBIG):
        return BOUNCED, "552 5.2.2 mailbox full: %s: %s" % (path, error.strerror)
    hint = ""
    if error.errno in (errno.EACCES, errno.EPERM) and not is_root():
        hint = " (the local delivery agent is not running as root, so it works as %s)" % (
            pwd.getpwuid(os.getuid()).pw_name)
    return RCPT_DEFERRED, "451 4.2.0 cannot write %s: %s%s" % (
        path, error.strerror or error, hint)
