"""LMTP delivery (RFC 2033) of one group of recipients, to lmtp:[host]:port or
lmtp:unix:/path next hops (Dovecot's LMTP, for instance), as Postfix's lmtp does.

Owned by the delivery worker; the same interface as elemta.delivery.smtp_transport.
Not written yet: every recipient is deferred with a reason that says so.
"""

from elemta.queue.model import RCPT_DEFERRED

NOT_IMPLEMENTED = "451 4.3.0 LMTP delivery is not implemented yet"


class LMTPTransport:
    """Delivers over LMTP for one worker."""

    def __init__(self, config, store):
        self.config = config
        self.store = store

    def close(self):
        pass

    def deliver(self, record, destination, items):
        return {index: (RCPT_DEFERRED, NOT_IMPLEMENTED, destination.key)
                for index, _ in items}
