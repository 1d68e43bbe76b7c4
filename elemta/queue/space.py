"""Room for new mail: free space on the spool's file system and in the queue index.

Asked by the smtpd at MAIL FROM, as Postfix's smtpd checks queue_minfree: when room runs
short, new mail gets 452 4.3.1 before its content is sent, and the room left is kept for
the work that empties the queue (delivery workers claiming messages, recording results and
queueing bounces), so a full spool or index never keeps mail from leaving. A write that
meets a full disk or index anyway fails with ENOSPC, which the smtpd answers 452 4.3.1 too
(elemta.smtpd.session). See also elemta.queue.queue (commit) and queue.min_free_space,
queue.index_map_size in elemta.conf(5).
"""

import os
from typing import Optional

# Postfix's smtpd_space_multf: free space must exceed 1.5 times the largest message.
SIZE_FACTOR = 1.5
# The part of queue.index_map_size new mail may not use: delivery writes there too (every
# claim and result rewrites records, copy-on-write, and a page freed is reused only once
# no reader still sees it) and must never find it full. A tenth, but at least 1 MiB (a
# batch of results takes hundreds of KB) and at most half.
INDEX_RESERVE = 0.1
INDEX_RESERVE_MIN = 1024 * 1024


def free_bytes(path):
    """Bytes an unprivileged writer may still use on the file system holding path."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def reserve_bytes(min_free_space: Optional[int], message_size: int) -> int:
    """Free bytes below which new mail is refused (see RoomCheck)."""
    if min_free_space is None:
        return int(SIZE_FACTOR * message_size)
    return min_free_space


def file_system_bytes(path):
    """(available to an unprivileged writer, total size) of path's file system."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize


class RoomCheck:
    """Whether a new message may come in (one per process; cheap enough for every MAIL).

    min_free_space: bytes the spool's file system keeps free, None for Postfix's default
    (1.5 times limits.message_size), 0 for no reserve at all."""

    def __init__(self, queue, min_free_space: Optional[int], message_size: int):
        self.queue = queue
        self.reserve = reserve_bytes(min_free_space, message_size)
        self._rule = ("1.5 times limits.message_size" if min_free_space is None
                      else "queue.min_free_space")

    def shortage(self, declared_size: Optional[int] = None) -> Optional[str]:
        """None when there is room for a message (of declared_size bytes, the SIZE=
        parameter, if given); else the reason, for the log line of the refusal."""
        try:
            free = free_bytes(self.queue.spool_dir)
        except OSError as error:
            return "cannot tell the spool's free space: %s" % error
        if free <= self.reserve:
            return "%d bytes free in the spool's file system, %s keeps %d" % (
                free, self._rule, self.reserve)
        if declared_size is not None and (declared_size >= free - self.reserve
                                          or SIZE_FACTOR * declared_size >= free):
            return "SIZE=%d does not fit in the %d bytes free in the spool's file system" % (
                declared_size, free)
        try:
            used, limit = self.queue.index.usage()
        except Exception as error:        # lmdb.Error: the commit will tell the client
            return "cannot tell how full the queue index is: %s" % error
        reserve = index_reserve(limit)
        if used >= limit - reserve:
            return ("queue index %d%% full (%d of queue.index_map_size %d bytes; the last "
                    "%d bytes are kept for delivery)" % (100 * used // limit, used, limit,
                                                         reserve))
        return None


def index_reserve(map_size):
    """Bytes of the index kept for delivery (see INDEX_RESERVE)."""
    return int(min(map_size / 2, max(map_size * INDEX_RESERVE, INDEX_RESERVE_MIN)))
