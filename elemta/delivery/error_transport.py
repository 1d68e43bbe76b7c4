"""The error transport: bounces every recipient routed to it, at once, as Postfix's
error(8) does for default_transport = error (Debian's "Local only" mail type).

Owned by the delivery worker (`elemta: delivery`); the same interface as
elemta.delivery.smtp_transport. No connection is made: each recipient is BOUNCED with the
reply the destination carries (elemta.config.schema.parse_default_transport: the
default "550 5.1.2 remote delivery is disabled on this host ..." or error:TEXT), logged
with relay=none, and its sender gets the bounce like any other.
See also: elemta.delivery.routing (ERROR), tests/test_default_transport.py.
"""

from elemta.queue.model import BOUNCED

# The relay named in the log, as Postfix's error(8) lines say.
NO_RELAY = "none"


class ErrorTransport:
    """Bounces recipients with their destination's reply."""

    def deliver(self, record, destination, items):
        """{index: (BOUNCED, reply, "none")} for every (index, Recipient) of items."""
        return {index: (BOUNCED, destination.host, NO_RELAY) for index, _ in items}

    def close(self):
        """Nothing to close: it holds no connection."""
