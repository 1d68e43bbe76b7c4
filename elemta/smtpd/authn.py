"""SMTP AUTH checks for the smtpd worker, without blocking the event loop.

The scrypt verify in elemta.util.credentials costs tens of milliseconds of CPU, so it
runs in gevent's thread pool. Failed attempts are counted per client (IPv4 address or
IPv6 /64) in a bounded table (elemta.smtpd.authfailures), and every further attempt
from that client waits auth.failure_delay per recent failure (up to
auth.max_failure_delay) BEFORE it is checked. The wait is the same whether the password
is right or wrong: were only failures delayed, as before, a client could stop waiting
for the answer once a success would have arrived, take the silence for "wrong", and
guess again at full speed on a new connection. A success does not clear the client's
failures either (they expire with the window): an attacker holding one valid account
could otherwise wipe his own penalty between guesses. No single user is locked out.
See also: Dovecot's auth penalty, which also delays the attempt, not the failure.
"""

import logging
import time

import gevent

from elemta.smtpd.authfailures import FailureTable
from elemta.smtpd.clientnet import client_group
from elemta.util.credentials import CredentialsFile
from elemta.util.threads import in_thread

log = logging.getLogger("elemta.smtpd")


class Authenticator:
    """Checks credentials and slows down clients that keep failing."""

    def __init__(self, auth_config):
        self.credentials = CredentialsFile(auth_config.credentials_file)
        self.failure_delay = auth_config.failure_delay
        self.max_failure_delay = auth_config.max_failure_delay
        self._failures = FailureTable()

    def check(self, client_ip, username, password):
        """True if the credentials are right. First waits (cooperatively) the client's
        penalty for its recent failures, whatever the outcome will be."""
        group = client_group(client_ip)
        count = self._failures.failures(group, time.monotonic())
        penalty = min(self.max_failure_delay, self.failure_delay * count)
        if penalty:
            log.info("AUTH from %s waits %.1fs: %d recent failure(s) from %s", client_ip,
                     penalty, count, group)
            gevent.sleep(penalty)
        try:
            ok = in_thread(self.credentials.check, username, password)
        except Exception:
            log.exception("credentials check failed for %s", username)
            ok = False
        if not ok:
            self._failures.record_failure(group, time.monotonic())
        return ok
