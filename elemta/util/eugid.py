"""Root acting as another user for a moment, and opening paths without following links.

Postfix's rule: a process running as root never trusts a path the mail system's user
can change. The spool belongs to master.user, who can replace any name in it with a
symbolic link (or a directory of links) at any time, so root works there in one of two
ways:

  acting_as(uid, gid)      for a block of work: the effective user and group become the
                           spool owner's (and the supplementary groups just that group),
                           so the kernel checks every path as that user; whatever a
                           planted link points to, root's power is not lent to it.
                           Postfix's set_eugid(). Restored on the way out.
  open_nofollow(...)       for one file or directory root must open itself: O_NOFOLLOW,
                           then the open descriptor is checked (type, owner, link count)
                           and changed with fchown/fchmod, never by name again.

Used by the master (spool/master.lock, the metrics directory), the maildrop and local
agent set-up, and the local agent's reading of queue files. The CLI drops root for good
instead (elemta.cli.queuecmd). See also: elemta.local.privileges (forked work as a user).
"""

import errno
import os
import stat
from contextlib import contextmanager


class UnsafePath(OSError):
    """A path in a directory another user controls is not what it must be."""

    def __str__(self):
        return "%s %s" % (self.filename, self.strerror)


@contextmanager
def acting_as(uid, gid):
    """Run the block with effective ids uid:gid when this process is root; a no-op
    otherwise (or when uid is root). Single-threaded callers only: the ids are the
    whole process's."""
    if os.geteuid() != 0 or uid is None or uid == 0:
        yield
        return
    saved_gid, saved_groups = os.getegid(), os.getgroups()
    os.setgroups([gid])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(saved_gid)
        os.setgroups(saved_groups)


def open_nofollow(path, flags, mode=0o600, dir_fd=None, kind=stat.S_IFREG, owners=None,
                  shown=None):
    """os.open without following a link in the last component; the descriptor is then
    checked: the wanted kind (regular file or directory), a single link for files (no
    hard link to someone else's file), and an owner in owners (when given). Raises
    UnsafePath naming the path (or shown, the full name of a path relative to dir_fd),
    and closes what it opened."""
    shown = shown or path
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if kind == stat.S_IFDIR:
        flags |= os.O_DIRECTORY
    else:
        flags |= os.O_NONBLOCK        # a planted FIFO must not hang us; no effect on files
    try:
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR) or (
                error.errno == errno.ENXIO and kind == stat.S_IFREG):
            raise UnsafePath(error.errno, "is a symbolic link or not a %s, refused"
                             % _KIND_NAMES[kind], shown) from None
        raise
    try:
        info = os.fstat(fd)
        if stat.S_IFMT(info.st_mode) != kind:
            raise UnsafePath(errno.EINVAL, "is not a %s, refused" % _KIND_NAMES[kind], shown)
        if kind == stat.S_IFREG and info.st_nlink != 1:
            raise UnsafePath(errno.EMLINK, "has %d hard links, refused" % info.st_nlink, shown)
        if owners is not None and info.st_uid not in owners:
            raise UnsafePath(errno.EPERM, "is owned by uid %d, refused" % info.st_uid, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


_KIND_NAMES = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory"}
