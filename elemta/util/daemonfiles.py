"""Files made for the daemon: readable by its workers (master.user) and by nobody else.

Used by the admin tools that write secrets the workers read after dropping privileges:
`elemtactl dkim keygen` (elemta.plugins.dkim.generate_key) and `elemtactl user add`
(elemta.util.credentials). Owned by no daemon process.

The choice is root:<service group> 0640, the way Debian shares private keys with a
daemon (root:ssl-cert 0640): the workers, which run as master.user with no
supplementary groups (elemta.master.drop_privileges), read the file through its group,
and cannot rewrite it, chmod it or replace it, so a compromised worker cannot add
itself an AUTH user or swap a signing key. (Postfix can leave its keys root-only 0600
because its smtpd reads them as root before dropping privileges; Elemta's workers read
them afterwards.) Work is done on the open descriptor (fchown, fchmod), never by name.
See also: elemta.cli.filecheck (the check of the result, as master.user).
"""

import os
import stat
from typing import Optional, Tuple

# The (uid, gid) the workers run as: elemta.master.resolve_user(config.master).
Reader = Tuple[int, int]

SHARED_MODE = 0o640
SHARED_DIRECTORY_MODE = 0o750     # a directory of keys: the workers enter it and read


def readable_by(info: os.stat_result, reader: Reader) -> bool:
    """Whether a process running as exactly uid:gid (no other groups) may read the file
    (or enter the directory)."""
    uid, gid = reader
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISDIR(info.st_mode):
        mode = (mode & 0o111) << 2      # a directory: what counts is search (x)
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(mode & stat.S_IRUSR)
    if info.st_gid == gid:
        return bool(mode & stat.S_IRGRP)
    return bool(mode & stat.S_IROTH)


def let_read(fd: int, reader: Optional[Reader]) -> bool:
    """Make the open file (or directory) readable by `reader` and nobody else but root,
    if it is not already: owner root, group the reader's, mode 0640 (0750) (or, when not
    root, the group alone if this user may give it). True if the reader can read it."""
    info = os.fstat(fd)
    if reader is None or readable_by(info, reader):
        return True
    if os.geteuid() == 0:
        os.fchown(fd, 0, reader[1])
    else:
        try:
            os.fchown(fd, -1, reader[1])     # allowed if we are in that group
        except PermissionError:
            return False
    os.fchmod(fd, SHARED_DIRECTORY_MODE if stat.S_ISDIR(info.st_mode) else SHARED_MODE)
    return readable_by(os.fstat(fd), reader)


def describe(reader: Reader) -> str:
    """'user nobody, group nogroup' for messages."""
    import grp
    import pwd
    uid, gid = reader
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return "user %s, group %s" % (user, group)
