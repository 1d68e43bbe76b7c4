"""lmdb: tables compiled from a Postfix source file into FILE.lmdb (postmap's job).

Compiled by `elemtactl map compile FILE` (compile_source) and read by every process
that looks up (LmdbTable). The spec names the source file, as Postfix's does:
lmdb:/etc/elemta/virtual reads /etc/elemta/virtual.lmdb; hash:/etc/elemta/virtual
means the same (Postfix's Berkeley DB files are not read: the same source compiles here).

Keys are stored folded (elemta.maps.source.fold: lower case, the domain in A-labels,
so user@bücher.example is stored as user@xn--bcher-kva.example, the form lookups ask
for) and lookups fold theirs the same way.

Compiling is atomic: the entries go into a temporary LMDB file in the same directory,
which is flushed to disk, given the mode and owner of the file it replaces (of the source
file when there is none, as postmap does), renamed over FILE.lmdb, and the directory is
flushed. A reader never sees half a table: it has either the old file or the new one.

A long-running reader notices the replacement without a restart: each lookup compares
the file's inode and mtime with those of the file it has open (one stat, about a
microsecond) and reopens when they differ, so the next lookup after the rename sees
the new table. Tables naming one file share its environment in a process (LMDB
allows one per file). Run as root, compile refuses a directory another user can change (the temporary file is
opened by name). The file is opened read-only without LMDB's lock file (nobody writes a
published table: a new one replaces it whole), so readers need no write access to
the directory. Lookups are a B-tree read in memory, fast enough for the event loop.

A missing or unreadable FILE.lmdb is TableUnavailable: mail waits (451) while the admin
runs the compile; nothing is refused for good.
See also: elemta.maps.source (the source format), elemta.cli.mapcmd, postmap(1),
lmdb_table(5).
"""

import errno
import os
import stat
import tempfile
from typing import Dict, List, Optional, Tuple

import lmdb

from elemta.maps.base import LookupTable, Result, TableError, TableUnavailable
from elemta.maps.source import fold, parse_entries

SUFFIX = ".lmdb"
# LMDB's default maximum key size (mdb_env_get_maxkeysize).
MAX_KEY_BYTES = 511


def database_path(source: str) -> str:
    """The compiled file of a source file: /etc/elemta/virtual -> virtual.lmdb."""
    return source + SUFFIX


def _identity(stat: os.stat_result) -> Tuple[int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns


# path -> (pid, identity, environment): one environment per file and process, shared by
# every table naming it (LMDB allows a file to be open once per process).
_environments: Dict[str, Tuple[int, Tuple[int, int, int], "lmdb.Environment"]] = {}


def _environment(path: str, spec: str, source: str) -> "lmdb.Environment":
    """The environment of the file now at path, reopened if the file was replaced (or if
    this process was forked from the one that opened it)."""
    try:
        identity = _identity(os.stat(path))
    except OSError as error:
        raise TableUnavailable("%s: cannot read %s: %s%s" % (
            spec, path, error.strerror, " (run: elemtactl map compile %s)" % source
            if isinstance(error, FileNotFoundError) else ""))
    pid = os.getpid()
    known = _environments.pop(path, None)
    if known is not None:
        if known[:2] == (pid, identity):
            _environments[path] = known
            return known[2]
        if known[0] == pid:     # one inherited across fork is left alone (LMDB says so)
            known[2].close()
    try:
        env = lmdb.open(path, subdir=False, readonly=True, lock=False, max_dbs=0)
    except lmdb.Error as error:
        raise TableUnavailable("%s: cannot open %s: %s" % (spec, path, error))
    _environments[path] = (pid, identity, env)
    return env


class LmdbTable(LookupTable):
    """A compiled table, reopened when FILE.lmdb is replaced."""

    def __init__(self, source: str, spec: str = "") -> None:
        self.source = source
        self.path = database_path(source)
        self.spec = spec or "lmdb:" + source

    def lookup(self, key: str) -> Result:
        env = _environment(self.path, self.spec, self.source)
        encoded = fold(key).encode("utf-8", "surrogateescape")
        if not encoded or len(encoded) > MAX_KEY_BYTES:
            return None
        try:
            with env.begin(buffers=False) as txn:
                value = txn.get(encoded)
        except lmdb.Error as error:
            raise TableUnavailable("%s: cannot read %s: %s" % (self.spec, self.path, error))
        return None if value is None else value.decode("utf-8", "replace")


def compile_source(source: str, warnings: Optional[List[str]] = None) -> int:
    """Compile the source file into source.lmdb atomically; returns the number of
    entries. Raises TableError naming file:line for a bad line, OSError otherwise. A
    repeated key keeps its first value and adds a warning (file:line) to warnings, as
    postmap does."""
    if warnings is None:
        warnings = []
    try:
        with open(source, encoding="utf-8", errors="surrogateescape") as lines:
            entries = parse_entries(lines, source, warnings)
        source_stat = os.stat(source)
    except UnicodeDecodeError as error:     # surrogateescape: not expected, but say so
        raise TableError("%s: not readable as text: %s" % (source, error))
    for key, _ in entries:
        if len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES:
            raise TableError("%s: key %s...: longer than %d bytes"
                             % (source, key[:40], MAX_KEY_BYTES))
    target = database_path(source)
    directory = os.path.dirname(os.path.abspath(target))
    _refuse_unsafe_directory(directory)
    fd, temporary = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".",
                                     dir=directory)
    os.close(fd)
    try:
        _write_table(temporary, entries)
        _take_over_ownership(temporary, target, source_stat)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.rename(temporary, target)
    except lmdb.Error as error:
        _remove(temporary)
        raise TableError("%s: cannot write %s: %s" % (source, target, error))
    except BaseException:
        _remove(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return len(entries)


def _write_table(path: str, entries) -> None:
    """The entries into a new LMDB file at path, flushed."""
    size = sum(len(k) + len(v) for k, v in entries)
    env = lmdb.open(path, subdir=False, lock=False, max_dbs=0,
                    map_size=(1 << 20) + 16 * size + 256 * len(entries))
    try:
        with env.begin(write=True) as txn:
            for key, value in entries:
                txn.put(key.encode("utf-8", "surrogateescape"),
                        value.encode("utf-8", "surrogateescape"))
        env.sync(True)
    finally:
        env.close()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _refuse_unsafe_directory(directory: str) -> None:
    """As root, refuse a directory another user can change: LMDB opens the temporary file
    by name, and that user could put a link in its place (Postfix's rule: root never
    trusts a path the service user can change). A sticky directory such as /tmp is safe
    (nobody else can replace root's file there)."""
    if os.geteuid() != 0:
        return
    info = os.stat(directory)
    others_write = info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX
    if info.st_uid != 0 or others_write:
        raise PermissionError(errno.EPERM, "the directory can be changed by a user other "
                              "than root: compile as that user, or keep tables in a "
                              "directory only root can change (such as /etc/elemta)",
                              directory)


def _take_over_ownership(temporary: str, target: str, source_stat: os.stat_result) -> None:
    """Give the new file the mode and owner of the file it replaces, or the source's."""
    try:
        model = os.stat(target)
    except FileNotFoundError:
        model = source_stat
    fd = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, model.st_uid, model.st_gid)
        os.fchmod(fd, model.st_mode & 0o7777)
    finally:
        os.close(fd)
