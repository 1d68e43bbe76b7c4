"""SMTP AUTH checks for the smtpd worker, without blocking the event loop.

Two backends (auth.backend, Postfix's smtpd_sasl_type): `file`, the credentials file
(elemta.util.credentials), whose scrypt verify costs tens of milliseconds of CPU and so
runs in gevent's thread pool; and `dovecot`, Dovecot's auth service
(elemta.smtpd.dovecot_auth), asked over its socket. Either answers an AuthResult
(elemta.smtpd.authresult).

Failed attempts are counted per client (IPv4 address or IPv6 /64) in a bounded table
(elemta.smtpd.authfailures), and every further attempt from that client waits
auth.failure_delay per recent failure (up to auth.max_failure_delay) BEFORE it is
checked, whichever the backend. The wait is the same whether the password is right or
wrong: were only failures delayed, as before, a client could stop waiting for the
answer once a success would have arrived, take the silence for "wrong", and guess again
at full speed on a new connection. A success does not clear the client's failures
either (they expire with the window): an attacker holding one valid account could
otherwise wipe his own penalty between guesses. No single user is locked out. A
temporary failure (Dovecot unreachable) is not counted: the client did nothing wrong.
With cluster.store set the counts are the cluster's (elemta.sharedstate); while that
store is down they are this worker's, or AUTH gets 454 4.7.0 (cluster.store_failure).
See also: Dovecot's auth penalty, which also delays the attempt, not the failure.
"""

import logging
import time

import gevent

from elemta.config.schema import parse_dovecot_socket
from elemta.smtp.protocol import AUTH_MECHANISMS
from elemta.sharedstate.interface import StoreTempfail
from elemta.sharedstate.process import shared_failure_counts
from elemta.smtpd.authfailures import FailureTable
from elemta.smtpd.authresult import FAIL, OK, TEMPFAIL, AuthResult
from elemta.smtpd.clientnet import client_group
from elemta.smtpd.dovecot_auth import DovecotAuth
from elemta.util.credentials import CredentialsFile
from elemta.util.threads import in_thread

log = logging.getLogger("elemta.smtpd")


class CredentialsBackend:
    """auth.backend file: the credentials file, checked in a thread."""

    def __init__(self, path):
        self.credentials = CredentialsFile(path)

    def mechanisms(self):
        return AUTH_MECHANISMS

    def authenticate(self, mechanism, username, password, local_ip, remote_ip, secured):
        try:
            ok = in_thread(self.credentials.check, username, password)
        except Exception:
            log.exception("credentials check failed for %r", username)
            ok = False
        return AuthResult(OK, user=username) if ok else AuthResult(FAIL)

    def close(self):
        pass


class FailurePenalty:
    """The wait before each AUTH of a client that failed recently, and the count of its
    failures: one per worker, shared by the users' AUTH and the handover listeners' (a
    client guessing on one is slowed on the other)."""

    def __init__(self, auth_config):
        self.failure_delay = auth_config.failure_delay
        self.max_failure_delay = auth_config.max_failure_delay
        self._failures = shared_failure_counts(FailureTable())

    def check(self, client_ip, attempt):
        """attempt()'s AuthResult, after the client's penalty for its recent failures
        (whatever the outcome will be); a FAIL is counted."""
        group = client_group(client_ip)
        try:
            count = self._failures.failures(group, time.monotonic())
        except StoreTempfail:
            # cluster.store_failure tempfail: the penalty cannot be known.
            return AuthResult(TEMPFAIL, reason="shared state store unavailable")
        penalty = min(self.max_failure_delay, self.failure_delay * count)
        if penalty:
            log.info("AUTH from %s waits %.1fs: %d recent failure(s) from %s", client_ip,
                     penalty, count, group)
            gevent.sleep(penalty)
        result = attempt()
        if result.outcome == FAIL:
            try:
                self._failures.record_failure(group, time.monotonic())
            except StoreTempfail:
                pass            # the 535 stands; the store was asked just above
        return result


class Authenticator:
    """Checks credentials with the configured backend and slows down clients that keep
    failing."""

    def __init__(self, auth_config, penalty=None):
        if auth_config.backend == "dovecot":
            self.backend = DovecotAuth(parse_dovecot_socket(auth_config.dovecot_socket))
        else:
            self.backend = CredentialsBackend(auth_config.credentials_file)
        self.penalty = penalty if penalty is not None else FailurePenalty(auth_config)
        self.mechanisms()       # Dovecot: connect now, so the first EHLO knows its list

    def mechanisms(self):
        """The mechanisms to offer now. While Dovecot's list is unknown (never reached),
        all of ours: a client then tries AUTH and hears 454 (try later), where an EHLO
        without AUTH would make submission clients give up or send unauthenticated."""
        offered = self.backend.mechanisms()
        return AUTH_MECHANISMS if offered is None else offered

    def authenticate(self, client_ip, local_ip, mechanism, username, password, secured):
        """An AuthResult for these credentials. First waits (cooperatively) the client's
        penalty for its recent failures, whatever the outcome will be."""
        return self.penalty.check(client_ip, lambda: self.backend.authenticate(
            mechanism, username, password, local_ip, client_ip, secured))

    def close(self):
        self.backend.close()
