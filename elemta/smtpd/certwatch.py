"""The certificate the smtpd serves, swapped for a new one when its files change.

Owned by the smtpd worker (elemta.smtpd.server holds one; the worker's watch, every
second, calls check()). A renewal by the ACME client (tls.acme), by certbot or by an
admin replaces the files; the next check loads them into a new SSLContext and new
sessions get it, while sessions already under way keep theirs: no restart, no reload,
no session refused or cut. A pair that cannot be loaded (half written, a key that does
not match) is logged once and the context in use stays; the next change is tried again.
With tls.acme, the certificate may not exist yet: STARTTLS is then not offered until it
does. A tls.cert_file 14, then 3 days from its expiry is warned of in the log, once each
by one of the workers (elemta.certs.expiry.WarningMarks; the acme process warns of the
certificates it manages). See also: elemta.smtpd.tls, elemta.certs.store, elemta.acme.
"""

import logging
import os
import time

from elemta import metrics
from elemta.certs.expiry import WarningMarks, crossed
from elemta.certs.store import CertificateInfo
from elemta.queue.wakeup import run_dir
from elemta.smtpd.tls import CertificateError, certificate_expiry, server_context

log = logging.getLogger("elemta.smtpd")


class CertificateWatch:
    """The SSLContext of the configured certificate, or None while there is none."""

    def __init__(self, config):
        """Loads the certificate now; raises CertificateError if tls.cert_file and
        tls.key_file cannot be loaded (a worker's boot failure). An ACME certificate
        that is not there yet is no error."""
        self.tls = config.tls
        self.cert_file, self.key_file = config.tls_files
        self.context = None
        self.expiry = None            # the served certificate's notAfter, when known
        self._seen = None             # the files' identity when last loaded or tried
        self.marks = WarningMarks(run_dir(config.queue.spool_dir))
        if not (self.cert_file and self.key_file):
            return
        self._seen = self._identity()
        if not self.tls.acme:
            self._load()
        elif self._seen is None:
            log.warning("tls.acme %s: no certificate yet (%s); STARTTLS is offered once "
                        "the acme process has obtained it", self.tls.acme, self.cert_file)
        else:
            try:
                self._load()
            except CertificateError as exc:   # the acme process will replace it
                log.warning("%s; STARTTLS is not offered until the acme process installs "
                            "a certificate", exc)

    def check(self, now=None):
        """Load the files again if they changed; True when a new context serves. Warns
        of a file certificate close to its expiry."""
        if not (self.cert_file and self.key_file):
            return False
        self.warn_of_expiry(time.time() if now is None else now)
        identity = self._identity()
        if identity == self._seen or identity is None:
            return False
        self._seen = identity
        try:
            self._load()
        except CertificateError as exc:
            log.warning("%s; the certificate in use stays", exc)
            return False
        log.info("new certificate %s loaded; new sessions get it", self.cert_file)
        return True

    def _load(self):
        self.context = server_context(self.tls, self.cert_file, self.key_file)
        self.expiry = certificate_expiry(self.cert_file)
        if self.expiry is not None:
            metrics.TLS_CERTIFICATE_EXPIRY.labels(self.cert_file).set(self.expiry)

    def warn_of_expiry(self, now):
        """A warning when the tls.cert_file served comes within 14, then 3 days of its
        expiry, by whichever worker sees it first (ACME ones: the acme process's)."""
        if self.tls.acme or self.expiry is None:
            return
        threshold = crossed(self.expiry, now)
        if threshold is None or not self.marks.claim(self.cert_file, self.expiry,
                                                     threshold):
            return
        try:
            with open(self.cert_file, "rb") as f:
                names = ", ".join(CertificateInfo.from_pem(f.read()).names) or "no DNS name"
        except (OSError, ValueError):
            names = "names unknown"
        left = self.expiry - now
        log.warning("tls.cert_file %s (%s) %s (%s): replace it (certbot renew, or a new "
                    "file); the smtpd workers pick the new one up by themselves",
                    self.cert_file, names, "expires in %.1f days" % (left / 86400)
                    if left > 0 else "has expired",
                    time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expiry)))

    def _identity(self):
        """What tells a changed file pair: inode, size and change time of each; None
        while either is missing."""
        try:
            return tuple((info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
                         for info in map(os.stat, (self.cert_file, self.key_file)))
        except OSError:
            return None
