"""The certificate the smtpd serves, swapped for a new one when its files change.

Owned by the smtpd worker (elemta.smtpd.server holds one; the worker's watch, every
second, calls check()). A renewal by the ACME client (tls.acme), by certbot or by an
admin replaces the files; the next check loads them into a new SSLContext and new
sessions get it, while sessions already under way keep theirs: no restart, no reload,
no session refused or cut. A pair that cannot be loaded (half written, a key that does
not match) is logged once and the context in use stays; the next change is tried again.
With tls.acme, the certificate may not exist yet: STARTTLS is then not offered until it
does. See also: elemta.smtpd.tls, elemta.certs.store, elemta.acme.
"""

import logging
import os

from elemta import metrics
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
        self._seen = None             # the files' identity when last loaded or tried
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

    def check(self):
        """Load the files again if they changed; True when a new context serves."""
        if not (self.cert_file and self.key_file):
            return False
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
        expiry = certificate_expiry(self.cert_file)
        if expiry is not None:
            metrics.TLS_CERTIFICATE_EXPIRY.labels(self.cert_file).set(expiry)

    def _identity(self):
        """What tells a changed file pair: inode, size and change time of each; None
        while either is missing."""
        try:
            return tuple((info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
                         for info in map(os.stat, (self.cert_file, self.key_file)))
        except OSError:
            return None
