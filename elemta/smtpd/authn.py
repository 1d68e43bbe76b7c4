"""SMTP AUTH checks for the smtpd worker, without blocking the event loop.

The scrypt verify in elemta.util.credentials costs tens of milliseconds of CPU, so it
runs in gevent's thread pool. Failed attempts are counted per client address and each
further failure is answered more slowly (up to a bound), which makes password guessing
slow without letting one client lock out a user.
"""

import logging
import time

import gevent

from elemta.util.credentials import CredentialsFile
from elemta.util.threads import in_thread

log = logging.getLogger("elemta.smtpd")

# Failures older than this are forgotten (seconds).
FAILURE_WINDOW = 600.0


class Authenticator:
    """Checks credentials and slows down clients that keep failing."""

    def __init__(self, auth_config):
        self.credentials = CredentialsFile(auth_config.credentials_file)
        self.failure_delay = auth_config.failure_delay
        self.max_failure_delay = auth_config.max_failure_delay
        self._failures = {}     # client ip -> (count, time of last failure)

    def check(self, client_ip, username, password):
        """True if the credentials are right. Sleeps (cooperatively) after a failure."""
        try:
            ok = in_thread(self.credentials.check, username, password)
        except Exception:
            log.exception("credentials check failed for %s", username)
            ok = False
        now = time.monotonic()
        count, last = self._failures.get(client_ip, (0, now))
        if now - last > FAILURE_WINDOW:
            count = 0
        if ok:
            self._failures.pop(client_ip, None)
            return True
        count += 1
        self._failures[client_ip] = (count, now)
        if len(self._failures) > 100000:      # bound the table under a distributed attack
            self._failures.clear()
        gevent.sleep(min(self.max_failure_delay, self.failure_delay * count))
        return False

    def failures(self, client_ip):
        return self._failures.get(client_ip, (0, 0))[0]
