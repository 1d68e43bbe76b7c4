"""Local delivery of one group of recipients (Postfix's local): aliases, .forward files,
mbox and Maildir mailboxes, commands and files.

Owned by the delivery worker; the same interface as elemta.delivery.smtp_transport.
Not written yet: every recipient is deferred with a reason that says so.
"""

from elemta.queue.model import RCPT_DEFERRED

NOT_IMPLEMENTED = "451 4.3.0 local delivery is not implemented yet"


class LocalTransport:
    """Delivers to local mailboxes for one worker."""

    def __init__(self, config, store):
        self.config = config
        self.store = store

    def close(self):
        pass

    def deliver(self, record, destination, items):
        return {index: (RCPT_DEFERRED, NOT_IMPLEMENTED, "local") for index, _ in items}
