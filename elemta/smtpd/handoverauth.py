"""AUTH on a handover listener: only the cluster's hand-over credential logs in.

Owned by the smtpd worker, for its listeners of mode handover: the port where the other
nodes of the cluster hand over a drained node's queue (elemtactl drain). A Postfix site
would run a second smtpd in master.cf for this, with its own mynetworks and
smtpd_client_restrictions = permit_sasl_authenticated, reject; here the listener takes
connections only from cluster.peer_networks (elemta.smtpd.server refuses the others at
connect) and relaying only after AUTH with the credential derived from the cluster's api
token (elemta.cluster.credential). So relay.mynetworks can stay loopback: the pod or
node network needs no right to relay, and a host inside cluster.peer_networks without
the token (a rogue pod) can neither relay nor pose as a node. No user of auth.backend
logs in here, and the hand-over login logs in nowhere else.

The check is one HMAC comparison in constant time: nothing to run in a thread. Failures
still count in the users' AUTH failure table and delay the client's next attempts
(elemta.smtpd.authn.FailurePenalty), and the protocol core's error limit ends a session
that keeps failing: a pod inside peer_networks gets no cheap oracle for a weak token.
See also: elemta.smtpd.authn (the users' AUTH on other listeners).
"""

import hmac
import logging

from elemta.cluster.credential import HANDOVER_LOGIN, handover_password
from elemta.smtp.protocol import AUTH_MECHANISMS
from elemta.smtpd.authresult import FAIL, OK, TEMPFAIL, AuthResult
from elemta.util.apitoken import read_token

log = logging.getLogger("elemta.smtpd")


class HandoverAuthenticator:
    """The hand-over login's check, in the shape of elemta.smtpd.authn.Authenticator."""

    def __init__(self, config, penalty):
        self.api = config.api
        self.penalty = penalty

    def mechanisms(self):
        return AUTH_MECHANISMS

    def authenticate(self, client_ip, local_ip, mechanism, username, password, secured):
        return self.penalty.check(client_ip, lambda: self._check(username, password))

    def _check(self, username, password):
        # Read at each login: a rotated token (the Secret updated) needs no restart.
        token, problem = read_token(self.api)
        if token is None:
            log.error("handover listener: %s: no node can hand over mail here", problem)
            return AuthResult(TEMPFAIL, reason="the cluster's api token cannot be read")
        expected = handover_password(token).encode("ascii")
        given = password.encode("utf-8", "surrogateescape") \
            if isinstance(password, str) else bytes(password)
        if username == HANDOVER_LOGIN and hmac.compare_digest(expected, given):
            return AuthResult(OK, user=HANDOVER_LOGIN)
        return AuthResult(FAIL, reason="not the cluster's hand-over credential")

    def close(self):
        pass
