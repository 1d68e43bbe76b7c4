"""When the acme child orders each certificate: at first, when its names change, once
acme.renew_at of its lifetime has passed, and after a failure only when its backoff has
run out (acme.retry_delay, doubling per failure in a row, at most acme.retry_delay_max);
and when it warns that one is close to expiry (ExpiryWarnings, from elemta.certs.expiry:
14 and 3 days before).

Owned by the acme child (elemta.acme.worker); no I/O, so tests feed it times.
"""


def renewal_reason(certificate, info, renew_at, now):
    """Why the certificate (an acme.certificates entry) needs ordering, or None; info is
    what lies on disk (elemta.certs.store.CertificateInfo) or None."""
    if info is None:
        return "none obtained yet"
    if sorted(info.names) != sorted(certificate.domains):
        return "its names changed (has %s)" % ", ".join(info.names)
    if now >= info.renewal_time(renew_at):
        return "%d%% of its lifetime has passed" % round(100 * renew_at)
    return None


class Backoff:
    """Failures in a row per certificate name, and when it may be tried again."""

    def __init__(self, first, most):
        self.first = first
        self.most = most
        self._failures = {}         # name -> (failures in a row, not before)

    def ready(self, name, now):
        return now >= self._failures.get(name, (0, 0))[1]

    def failed(self, name, now):
        """Count a failure; returns (failures in a row, seconds until the next try)."""
        failures = self._failures.get(name, (0, 0))[0] + 1
        delay = min(self.most, self.first * 2 ** min(failures - 1, 32))
        self._failures[name] = (failures, now + delay)
        return failures, delay

    def succeeded(self, name):
        self._failures.pop(name, None)

    def forget(self):
        """A forced renewal (elemtactl cert renew) tries at once."""
        self._failures.clear()

    def next_try(self):
        """The earliest time a failed certificate may be tried again, or None."""
        return min((when for _, when in self._failures.values()), default=None)
