"""The server-side TLS context for STARTTLS and smtps, from the tls config section.

Owned by the smtpd worker: built when a worker starts, and again whenever the certificate
or key file changes (elemta.smtpd.certwatch: the ACME client's renewals, certbot's, an
admin's); so is elemta_tls_certificate_expiry_timestamp_seconds (certificate_expiry),
which therefore tells what the workers serve, not what lies on disk.
"""

import logging

from gevent import ssl

log = logging.getLogger("elemta.smtpd")

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class CertificateError(Exception):
    """tls.cert_file and tls.key_file cannot be used; the text names them and why."""


def server_context(tls_config, cert_file, key_file):
    """An SSLContext serving cert_file and key_file with tls_config's settings; raises
    CertificateError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls_config.min_version]
    try:
        context.load_cert_chain(cert_file, key_file)
    except OSError as exc:     # missing, unreadable, or not a matching PEM pair (SSLError)
        what = ("the ACME certificate %s with its key %s" if tls_config.acme
                else "tls.cert_file %s with tls.key_file %s") % (cert_file, key_file)
        raise CertificateError("cannot load %s: %s" % (what, exc.strerror or exc)) from None
    # SMTP clients rarely present certificates; we do not ask for them.
    context.verify_mode = ssl.CERT_NONE
    return context


def certificate_expiry(cert_file):
    """When the first certificate in cert_file (the server's own; the chain follows it)
    expires, as a Unix time; None if it cannot be read (logged: the metric is missing,
    never the worker). cryptography parses it: the ssl module cannot say what a context
    serves."""
    from cryptography import x509
    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as exc:
        log.warning("tls.cert_file %s: cannot read its expiry time: %s",
                    cert_file, getattr(exc, "strerror", None) or exc)
        return None
    # not_valid_after_utc is cryptography >= 42; the older not_valid_after is naive UTC.
    after = getattr(cert, "not_valid_after_utc", None)
    if after is None:
        import calendar
        return float(calendar.timegm(cert.not_valid_after.utctimetuple()))
    return after.timestamp()


def describe(sslsock):
    """A short text for the Received header and logs: version, cipher, bits."""
    cipher = sslsock.cipher()
    if not cipher:
        return None
    name, version, bits = cipher
    return "using %s with cipher %s (%s/%s bits)" % (sslsock.version() or version, name,
                                                     bits, bits)
