"""What an AUTH backend answers: the outcome of one authentication.

Owned by the smtpd worker: the backends (elemta.smtpd.authn's credentials file,
elemta.smtpd.dovecot_auth) return it, the session turns it into the reply.
"""

from dataclasses import dataclass
from typing import Optional

OK = "ok"                   # authenticated as `user`: 235 2.7.0
FAIL = "fail"               # wrong credentials: 535 5.7.8, counted for the slow-down
TEMPFAIL = "tempfail"       # the backend could not decide (Dovecot down): 454 4.7.0
UNSUPPORTED = "unsupported"  # the backend no longer offers the mechanism: 504 5.5.4


@dataclass(frozen=True)
class AuthResult:
    """outcome is one of OK, FAIL, TEMPFAIL, UNSUPPORTED; user is the login name to
    record (the backend's canonical one); reason is for the log, never the client."""
    outcome: str
    user: Optional[str] = None
    reason: str = ""
