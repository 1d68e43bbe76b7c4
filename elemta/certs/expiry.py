"""When a certificate close to its expiry is warned of in the log: 14, then 3 days before
(once each, not at every check). Shared: the acme child warns of the certificates it
manages (elemta.acme.worker, with ExpiryWarnings: it is one process), the smtpd workers
of a tls.cert_file an admin or certbot looks after (elemta.smtpd.certwatch, with
WarningMarks: one of them warns, through marker files in the spool's run directory).
"""

import hashlib
import os


# Seconds before a certificate's expiry when a warning is logged, once each.
EXPIRY_WARNINGS = (14 * 86400, 3 * 86400)


class ExpiryWarnings:
    """Which expiry warnings were given, per certificate: one when the time left first
    drops to a threshold, not one per check; a new certificate (another notAfter) starts
    over."""

    def __init__(self, thresholds=EXPIRY_WARNINGS):
        self.thresholds = sorted(thresholds, reverse=True)
        self._given = {}            # name -> (not_after, the smallest threshold warned of)

    def due(self, name, not_after, now):
        """The threshold (seconds) whose warning is due now for the certificate, or None."""
        crossed = [t for t in self.thresholds if not_after - now <= t]
        if not crossed:
            self._given.pop(name, None)
            return None
        threshold = crossed[-1]
        given = self._given.get(name)
        if given is not None and given[0] == not_after and given[1] <= threshold:
            return None
        self._given[name] = (not_after, threshold)
        return threshold


def crossed(not_after, now, thresholds=EXPIRY_WARNINGS):
    """The smallest threshold (seconds) the time left has dropped to, or None."""
    below = [t for t in thresholds if not_after - now <= t]
    return min(below) if below else None


class WarningMarks:
    """Expiry warnings shared by processes (the smtpd workers) through marker files in
    directory: the first process to create a (certificate file, notAfter, threshold)
    marker gives the warning, so it is logged once, not once per worker, nor again
    after a worker is recycled or the daemon restarted. A new certificate (another
    notAfter) starts over; its old markers are removed."""

    def __init__(self, directory):
        self.directory = directory
        self._seen = None           # the last (file, not_after, threshold) decided here

    def claim(self, cert_file, not_after, threshold):
        """True when this process is the one to warn."""
        key = (cert_file, not_after, threshold)
        if key == self._seen:
            return False
        self._seen = key
        prefix = "certexpiry-%s-" % hashlib.sha256(cert_file.encode()).hexdigest()[:16]
        name = "%s%d-%d" % (prefix, not_after, threshold)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.directory, name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return False
        except OSError:
            return True             # no marker can be made: better twice than never
        os.close(fd)
        for old in os.listdir(self.directory):
            if old.startswith(prefix) and not old.startswith("%s%d-" % (prefix, not_after)):
                try:
                    os.unlink(os.path.join(self.directory, old))
                except OSError:
                    pass
        return True
