"""Relay control: who may send mail to which domains (the open-relay guard).

Owned by the smtpd worker. Mail to a local domain is accepted from anyone; mail to any
other domain only from a client in mynetworks or one that authenticated. Everything else
is refused with 554 5.7.1, as Postfix's reject_unauth_destination does. A local
recipient that is neither an alias nor a user is refused with 550 5.1.1 when
local.reject_unknown_users is set (Postfix's local_recipient_maps). Which addresses are
local and which recipients exist is the addressing layer's one answer
(elemta.addressing.resolve, elemta.addressing.recipients), the same the router, pickup
and sendmail -bv give.
"""

import ipaddress

from elemta.addressing.recipients import LocalRecipients
from elemta.addressing.resolve import Addressing
from elemta.smtp.replies import Reply

UNKNOWN_USER = "<%s>: Recipient address rejected: User unknown in local recipient table"


class RelayPolicy:
    """Answers "may this client send to this recipient?" from the relay config."""

    def __init__(self, relay_config, hostname, origin=None):
        self.addressing = Addressing(hostname, relay_config.local_domains, origin=origin)
        self.mynetworks = tuple(ipaddress.ip_network(n, strict=False)
                                for n in relay_config.mynetworks)
        self._local_recipients = None      # made on first use: reads the aliases file

    def is_local(self, address):
        """True for recipients in a local domain, and for a bare <postmaster>."""
        return self.addressing.is_local(address)

    def client_trusted(self, client_ip):
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.mynetworks if net.version == ip.version)

    def may_send(self, client_ip, auth_user, recipient):
        return (self.is_local(recipient) or auth_user is not None
                or self.client_trusted(client_ip))

    def unknown_local_recipient(self, config, recipient):
        """The 550 5.1.1 Reply for a local recipient with nowhere to go, when
        config.local.reject_unknown_users asks for it; None otherwise."""
        if not config.local.reject_unknown_users or not self.is_local(recipient):
            return None
        if self._local_recipients is None:
            self._local_recipients = LocalRecipients(config.local,
                                                     Addressing.from_config(config))
        if self._local_recipients.find_address(recipient) is not None:
            return None
        return Reply(550, "5.1.1", UNKNOWN_USER % recipient)
