"""The ACME state directory: its layout, who may write where, and reading and writing what
lies in it. The one module that knows this on-disk format.

    state_directory/        root, 0755: the service user cannot rename or replace what is
                            in it (design.md: root never trusts a path it can change)
      account/              master.user, 0700: <id>.key.pem, the account key (JWK as PEM),
                            and <id>.json, the account's URL, per ACME directory URL
      live/<name>/          master.user, 0700: privkey.pem (0600) and fullchain.pem,
                            replaced by rename, the key first (a reader that finds a pair
                            that does not match tries again: elemta.smtpd.certwatch)
      challenges/           master.user, 0700: one file per pending HTTP-01 token holding
                            its key authorization, written by the acme child and read by
                            the acme-http child; for TLS-ALPN-01, <host name>.alpn.pem
                            (0600) per pending name: the validation certificate and its
                            key, read by the acme-tls child

Root (the master, before it forks) only makes the directory and its three subdirectories,
working on descriptors opened with O_NOFOLLOW; everything inside them is written and
read by master.user. See also: elemta.acme (the client), elemta.smtpd.certwatch.
"""

import errno
import hashlib
import os
import re
import stat

SUBDIRECTORIES = ("account", "live", "challenges")
KEY_FILE, CHAIN_FILE = "privkey.pem", "fullchain.pem"
# RFC 8555 section 8.1: a token is base64url, at least 128 bits of entropy.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# A host name as a TLS client's SNI may give it, before it names a file (lower case).
_HOST_NAME = re.compile(r"^(?!.*\.\.)[a-z0-9][a-z0-9.-]{0,252}$")
ALPN_SUFFIX = ".alpn.pem"


class StoreError(Exception):
    """The state directory cannot be used; the text names the path and why."""


def live_files(state_directory, name):
    """(fullchain.pem, privkey.pem) of the certificate called name."""
    folder = os.path.join(state_directory, "live", name)
    return os.path.join(folder, CHAIN_FILE), os.path.join(folder, KEY_FILE)


# ---- as root, in the master before it forks -------------------------------------------

def prepare(state_directory, uid, gid):
    """Make state_directory (root's, 0755) and its subdirectories (uid:gid, 0700). The
    directory itself must not be a link, nor writable by anyone but its owner, who must
    be root (or, when not run as root, the caller); raises StoreError."""
    os.makedirs(os.path.dirname(state_directory), exist_ok=True)
    try:
        os.mkdir(state_directory, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError("acme.state_directory %s: cannot create it: %s"
                         % (state_directory, exc.strerror)) from None
    top = _open_directory(state_directory, None, "acme.state_directory")
    try:
        info = os.fstat(top)
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o022:
            raise StoreError("acme.state_directory %s must be owned by %s and writable by "
                             "it alone (owner uid %d, mode %04o)"
                             % (state_directory, "root" if os.geteuid() == 0 else
                                "uid %d" % os.geteuid(), info.st_uid,
                                stat.S_IMODE(info.st_mode)))
        for name in SUBDIRECTORIES:
            try:
                os.mkdir(name, 0o700, dir_fd=top)
            except FileExistsError:
                pass
            fd = _open_directory(name, top, "acme.state_directory " + state_directory)
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, uid, gid)
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    finally:
        os.close(top)


def _open_directory(path, dir_fd, what):
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        reason = "a symbolic link or not a directory" if exc.errno in (
            errno.ELOOP, errno.ENOTDIR) else exc.strerror
        raise StoreError("%s: %s: %s" % (what, path, reason)) from None


# ---- as master.user ---------------------------------------------------------------------

def write_file(path, data, mode):
    """Replace path by data atomically (temporary file, fsync, rename, fsync of the
    directory), created with mode."""
    folder = os.path.dirname(path)
    temporary = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path):
    """The bytes of path, never through a symbolic link; None if it is not there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)   # no FIFO hangs
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


class Store:
    """The state directory as master.user sees it."""

    def __init__(self, state_directory):
        self.root = state_directory

    def account_files(self, directory_url):
        """(key path, account path) of the account at the ACME server directory_url."""
        name = hashlib.sha256(directory_url.encode()).hexdigest()[:16]
        folder = os.path.join(self.root, "account")
        return (os.path.join(folder, name + ".key.pem"),
                os.path.join(folder, name + ".json"))

    def live_files(self, name):
        return live_files(self.root, name)

    def save_certificate(self, name, key_pem, chain_pem):
        """Install a new key and chain for name (the key first)."""
        chain_path, key_path = self.live_files(name)
        try:
            os.mkdir(os.path.dirname(chain_path), 0o700)
        except FileExistsError:
            pass
        write_file(key_path, key_pem, 0o600)
        write_file(chain_path, chain_pem, 0o644)

    def certificate(self, name):
        """What is known of the certificate called name (CertificateInfo), or None if
        there is none (or it cannot be read)."""
        chain = read_file(self.live_files(name)[0])
        if chain is None:
            return None
        try:
            return CertificateInfo.from_pem(chain)
        except ValueError:
            return None

    # ---- HTTP-01 challenges -------------------------------------------------------------

    def challenge_path(self, token):
        """The file of token, or None if token is not a well-formed ACME token."""
        if not _TOKEN.match(token):
            return None
        return os.path.join(self.root, "challenges", token)

    def put_challenge(self, token, key_authorization):
        path = self.challenge_path(token)
        if path is None:
            raise ValueError("not an ACME token: %r" % token)
        write_file(path, key_authorization.encode("ascii"), 0o600)

    def remove_challenge(self, token):
        path = self.challenge_path(token)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def challenge(self, token):
        """The key authorization for token, as bytes, or None."""
        path = self.challenge_path(token)
        return read_file(path) if path is not None else None

    # ---- TLS-ALPN-01 validation certificates (RFC 8737) ----------------------------------

    def alpn_certificate_path(self, name):
        """The file of the validation certificate for host name, or None if name is not
        a plausible host name (it comes from the internet, as SNI)."""
        name = (name or "").lower().rstrip(".")
        if not _HOST_NAME.match(name):
            return None
        return os.path.join(self.root, "challenges", name + ALPN_SUFFIX)

    def put_alpn_certificate(self, name, pem):
        """Install pem (certificate and key) as the validation certificate for name."""
        path = self.alpn_certificate_path(name)
        if path is None:
            raise ValueError("not a host name: %r" % name)
        write_file(path, pem, 0o600)

    def remove_alpn_certificate(self, name):
        path = self.alpn_certificate_path(name)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def has_alpn_certificate(self, name):
        path = self.alpn_certificate_path(name)
        return path is not None and os.path.isfile(path) and not os.path.islink(path)


class CertificateInfo:
    """The facts of a certificate an admin and the renewal schedule need."""

    def __init__(self, names, issuer, serial, not_before, not_after):
        self.names = names              # subjectAltName DNS names, in order
        self.issuer = issuer            # the issuer's distinguished name, RFC 4514
        self.serial = serial            # hexadecimal
        self.not_before = not_before    # Unix times
        self.not_after = not_after

    @classmethod
    def from_pem(cls, data):
        """Of the first certificate in data (PEM); raises ValueError."""
        from cryptography import x509
        cert = x509.load_pem_x509_certificate(data)
        try:
            names = cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        return cls(list(names), cert.issuer.rfc4514_string(), "%x" % cert.serial_number,
                   _timestamp(cert, "not_valid_before"), _timestamp(cert, "not_valid_after"))

    def renewal_time(self, fraction):
        """When fraction of its lifetime has passed."""
        return self.not_before + fraction * (self.not_after - self.not_before)


def _timestamp(cert, attribute):
    # The *_utc attributes are cryptography >= 42; the older ones are naive UTC.
    aware = getattr(cert, attribute + "_utc", None)
    if aware is not None:
        return aware.timestamp()
    import calendar
    return float(calendar.timegm(getattr(cert, attribute).utctimetuple()))
