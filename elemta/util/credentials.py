"""The SMTP AUTH credentials file: the one module that reads and writes its format.

Read by the smtpd workers (CredentialsFile.check, run in a gevent threadpool
because scrypt is CPU heavy; hashlib.scrypt releases the GIL), written by
`elemtactl user add/passwd/del` (set_user, delete_user).

The file holds one `username:hash` per line; `#` comments and blank lines are
allowed and kept on rewrite. User names are case-sensitive UTF-8 without ':',
whitespace or control characters. The hash is salted scrypt in a
self-describing form, never plaintext:

    $scrypt$ln=15,r=8,p=1$<salt, base64>$<derived key, base64>

(ln is log2 of the scrypt cost N; base64 is standard and unpadded.)
See also: elemta.cli.elemtactl (the admin commands), elemta.config.schema.AuthSettings.
"""

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import re
import tempfile
import threading
import time
import unicodedata
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from elemta.util import daemonfiles

log = logging.getLogger(__name__)

# scrypt cost: ln=15 (N=32768, r=8: 32 MiB) takes about 60 ms per hash on the
# reference VM, slow enough for offline guessing, fast enough for AUTH.
DEFAULT_LN = 15
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32

# Bounds a stored hash must respect, so an edited file cannot make a verify
# allocate gigabytes or run for minutes.
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
MAX_P = 16
MAX_USERNAME_BYTES = 255   # RFC 4616: authcid is at most 255 octets

FILE_MODE = 0o640          # root (or the admin) writes, the smtpd group reads (daemonfiles)
LOCK_TIMEOUT = 10.0        # seconds elemtactl waits for a concurrent writer
NEW_FILE_HEADER = (b"# Elemta SMTP AUTH credentials: one user:scrypt-hash per line.\n"
                   b"# Manage with elemtactl user add / passwd / del / list.\n")

_HASH_RE = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})"
                      r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)\Z")


class CredentialsError(Exception):
    """A credentials file change that cannot be made; str() says why."""


class UserExists(CredentialsError):
    """set_user(replace=False) found the user already present."""


class NoSuchUser(CredentialsError):
    """set_user(create=False) did not find the user."""


class CredentialsBusy(CredentialsError):
    """Another writer held the file's lock for longer than LOCK_TIMEOUT."""


# ---------------------------------------------------------------- hashing

def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int, dklen: int) -> bytes:
    n = 1 << ln
    # OpenSSL needs 128*r*(N+2) bytes for V plus 128*r*p for B; allow a little slack.
    maxmem = 128 * r * (n + 2) + 128 * r * p + 1024 * 1024
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


def _encode(ln: int, r: int, p: int, salt: bytes, key: bytes) -> str:
    return "$scrypt$ln=%d,r=%d,p=%d$%s$%s" % (ln, r, p, _b64encode(salt), _b64encode(key))


def _decode(encoded: str) -> Optional[Tuple[int, int, int, bytes, bytes]]:
    """(ln, r, p, salt, key) of a stored hash, or None if it is not one we accept."""
    match = _HASH_RE.match(encoded) if isinstance(encoded, str) else None
    if match is None:
        return None
    ln, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not (1 <= ln <= 30 and 1 <= r and 1 <= p <= MAX_P) or 128 * r * (1 << ln) > MAX_SCRYPT_MEMORY:
        return None
    try:
        salt, key = _b64decode(match.group(4)), _b64decode(match.group(5))
    except (binascii.Error, ValueError):
        return None
    if len(salt) < 8 or not 16 <= len(key) <= 64:
        return None
    return ln, r, p, salt, key


def _password_bytes(password: Union[str, bytes]) -> bytes:
    if isinstance(password, bytes):
        return password
    # surrogateescape: a password the smtpd decoded from non-UTF-8 bytes round-trips.
    return password.encode("utf-8", "surrogateescape")


def hash_password(password: str) -> str:
    """A new salted scrypt hash of password, in the $scrypt$ format."""
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(_password_bytes(password), salt, DEFAULT_LN, DEFAULT_R, DEFAULT_P, KEY_BYTES)
    return _encode(DEFAULT_LN, DEFAULT_R, DEFAULT_P, salt, key)


def verify_password(password: str, encoded: str) -> bool:
    """True if password matches the stored hash; False for a mismatch or unknown format.

    Blocking and CPU heavy (one scrypt). The comparison is constant-time.
    """
    decoded = _decode(encoded)
    if decoded is None:
        return False
    ln, r, p, salt, key = decoded
    try:
        candidate = _scrypt(_password_bytes(password), salt, ln, r, p, len(key))
    except (UnicodeError, ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, key)


# A hash no password matches (its key is random bytes, not a scrypt output): verifying
# against it costs what a real user's verify costs, so timing hides who exists.
_DUMMY_HASH = _encode(DEFAULT_LN, DEFAULT_R, DEFAULT_P,
                      os.urandom(SALT_BYTES), os.urandom(KEY_BYTES))


# ---------------------------------------------------------------- names and lines

def username_error(username: str) -> Optional[str]:
    """Why username cannot be stored in the file, or None if it can."""
    if not isinstance(username, str) or not username:
        return "user name is empty"
    try:
        size = len(username.encode("utf-8"))
    except UnicodeError:
        return "user name is not valid UTF-8"
    if size > MAX_USERNAME_BYTES:
        return "user name is longer than %d bytes" % MAX_USERNAME_BYTES
    if username.startswith("#"):
        return "user name may not start with '#' (that line would be a comment)"
    for char in username:
        if char == ":":
            return "user name may not contain ':'"
        if char.isspace():
            return "user name may not contain whitespace"
        if unicodedata.category(char) == "Cc":
            return "user name may not contain control characters"
    return None


def password_error(password: str) -> Optional[str]:
    """Why password cannot be set, or None if it can."""
    if not password:
        return "password is empty"
    if "\0" in password:
        return "password may not contain NUL (AUTH PLAIN could never send it)"
    try:
        _password_bytes(password)
    except UnicodeError:
        return "password is not valid UTF-8"
    return None


def _parse_line(raw: bytes) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(username, hash, problem) of one line; all None for a blank line or comment."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, None, "not valid UTF-8"
    if not text or text.startswith("#"):
        return None, None, None
    username, colon, encoded = text.partition(":")
    if not colon:
        return None, None, "no ':' between user name and hash"
    problem = username_error(username)
    if problem:
        return None, None, problem
    if _decode(encoded) is None:
        return username, None, "hash of user %r is not in the $scrypt$ format" % username
    return username, encoded, None


def _parse(data: bytes, path: str) -> Dict[str, str]:
    """username -> hash; malformed lines and repeated users are skipped with a warning."""
    users = {}  # type: Dict[str, str]
    first_line = {}  # type: Dict[str, int]
    for lineno, raw in enumerate(data.splitlines(), 1):
        username, encoded, problem = _parse_line(raw)
        if problem is None and username in users:
            problem = "user %r already defined on line %d" % (username, first_line[username])
        if problem:
            log.warning("%s, line %d: %s; line skipped", path, lineno, problem)
        elif username is not None:
            users[username] = encoded
            first_line[username] = lineno
    return users


def list_users(path: str) -> List[str]:
    """The user names in the file, in file order. Raises OSError if it cannot be read."""
    with open(path, "rb") as handle:
        return list(_parse(handle.read(), path))


# ---------------------------------------------------------------- the reader

_MISSING = ("missing",)


class CredentialsFile:
    """The credentials file as the smtpd sees it: loaded lazily, reloaded on change.

    check() is thread-safe; it stats the file on every call and re-reads it when
    its inode, size or mtime changed, so `elemtactl user add` needs no reload.
    A missing or unreadable file means no user can authenticate (fail closed).
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._stamp = None  # type: Optional[tuple]
        self._users = {}  # type: Dict[str, str]

    def check(self, username: str, password: str) -> bool:
        """True if username exists and password is right. BLOCKING and CPU heavy."""
        encoded = self._lookup(username)
        if encoded is None:
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, encoded)

    def usernames(self) -> List[str]:
        """The user names currently loaded (after a reload if the file changed)."""
        with self._lock:
            self._refresh()
            return list(self._users)

    def _lookup(self, username: str) -> Optional[str]:
        with self._lock:
            self._refresh()
            return self._users.get(username)

    def _refresh(self) -> None:
        """Re-read the file if it changed since the last read. Caller holds _lock."""
        try:
            stamp = _stamp_of(os.stat(self.path))
            if stamp == self._stamp:
                return
            with open(self.path, "rb") as handle:
                # Stamp what was actually read, in case the file was replaced meanwhile.
                stamp = _stamp_of(os.fstat(handle.fileno()))
                data = handle.read()
        except OSError as exc:
            stamp = _MISSING if exc.errno == errno.ENOENT else ("error", exc.errno)
            if stamp != self._stamp:
                log.warning("credentials file %s: %s; every AUTH will fail",
                            self.path, exc.strerror or exc)
            self._stamp, self._users = stamp, {}
            return
        self._users = _parse(data, self.path)
        self._stamp = stamp
        log.info("credentials file %s: loaded %d users", self.path, len(self._users))


def _stamp_of(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------- the writers

def set_user(path: str, username: str, password: str, *,
             create: bool = True, replace: bool = True,
             reader: Optional[daemonfiles.Reader] = None) -> None:
    """Add username or change its password, rewriting the file atomically.

    create=False raises NoSuchUser if the user is absent (passwd); replace=False
    raises UserExists if present (add). A missing file is created (when create
    is true) with mode 0640. reader, the workers' (uid, gid), must be able to read the
    result: a file that would shut it out becomes root:its group (daemonfiles.let_read);
    the owner of one it can read is kept. Raises ValueError for a bad name or password,
    OSError if the file cannot be read or written, CredentialsBusy on lock timeout.
    """
    for problem in (username_error(username), password_error(password)):
        if problem:
            raise ValueError(problem)
    new_line = ("%s:%s\n" % (username, hash_password(password))).encode("utf-8")

    def change(lines: Optional[List[bytes]]) -> Optional[List[bytes]]:
        if lines is None:
            if not create:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            lines = [NEW_FILE_HEADER]
        out, found = [], False
        for raw in lines:
            if _parse_line(raw)[0] != username:
                out.append(raw)
            elif not found:     # replace the first line of the user, drop repeats
                out.append(new_line)
                found = True
        if found and not replace:
            raise UserExists("user %r already exists" % username)
        if not found:
            if not create:
                raise NoSuchUser("no such user: %r" % username)
            if out and not out[-1].endswith(b"\n"):
                out[-1] += b"\n"
            out.append(new_line)
        return out

    _rewrite(path, change, reader)


def delete_user(path: str, username: str,
                reader: Optional[daemonfiles.Reader] = None) -> bool:
    """Remove every line of username; False (file untouched) if it was not there.

    Raises FileNotFoundError if the file does not exist, other OSError if it
    cannot be rewritten, CredentialsBusy on lock timeout.
    """
    def change(lines: Optional[List[bytes]]) -> Optional[List[bytes]]:
        if lines is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        out = [raw for raw in lines if _parse_line(raw)[0] != username]
        return out if len(out) != len(lines) else None

    return _rewrite(path, change, reader)


def _rewrite(path: str, change: Callable[[Optional[List[bytes]]], Optional[List[bytes]]],
             reader: Optional[daemonfiles.Reader] = None) -> bool:
    """Read-modify-write under a lock; change returns the new lines or None for no change."""
    path = os.path.realpath(path)   # keep a symlink pointing at the rewritten file
    directory = os.path.dirname(path)
    with _locked_directory(directory) as dir_fd:
        try:
            with open(path, "rb") as handle:
                lines = handle.read().splitlines(keepends=True)  # type: Optional[List[bytes]]
                old = os.fstat(handle.fileno())  # type: Optional[os.stat_result]
        except FileNotFoundError:
            lines, old = None, None
        new_lines = change(lines)
        if new_lines is None:
            return False
        _atomic_write(path, b"".join(new_lines), old, dir_fd, reader)
        return True


@contextlib.contextmanager
def _locked_directory(directory: str) -> Iterator[int]:
    """Hold an exclusive flock on the directory, so two writers cannot lose an update.

    The lock is on the directory rather than the file because the file is replaced
    by rename on every write; locking the directory needs no extra lock file.
    """
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CredentialsBusy("%s is locked by another writer" % directory)
                time.sleep(0.05)
        yield dir_fd
    finally:
        os.close(dir_fd)    # closing releases the lock


def _atomic_write(path: str, data: bytes, old: Optional[os.stat_result], dir_fd: int,
                  reader: Optional[daemonfiles.Reader] = None) -> None:
    """Write a temp file beside path, fsync it, rename it over path, fsync the directory."""
    directory, name = os.path.split(path)
    fd, tmp_path = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            if old is not None:
                _keep_owner(handle.fileno(), old)
            os.fchmod(handle.fileno(), FILE_MODE)
            if not daemonfiles.let_read(handle.fileno(), reader):
                raise PermissionError(errno.EACCES, "cannot make it readable by the "
                                      "workers (%s): run as root"
                                      % daemonfiles.describe(reader), path)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    os.fsync(dir_fd)


def _keep_owner(fd: int, old: os.stat_result) -> None:
    """Give the new file the old one's owner and group (the smtpd reads it via the group)."""
    for uid in (old.st_uid, -1):
        try:
            os.fchown(fd, uid, old.st_gid)
            return
        except PermissionError:
            continue
