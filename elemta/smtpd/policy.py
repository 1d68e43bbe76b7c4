"""RCPT decisions: who may send mail to which domains (the open-relay guard), and which
recipients exist.

Owned by the smtpd worker. Mail to the domains that are ours - local, virtual alias,
virtual mailbox and relay domains (elemta.addressing.resolve) - is accepted from anyone;
mail to any other domain only from a client in mynetworks or one that authenticated.
Everything else is refused with 554 5.7.1, as Postfix's reject_unauth_destination does.
Then the recipient must exist (elemta.addressing.hosted, the answer sendmail -bv gives
too): 550 5.1.1 in Postfix's words, naming the table it is missing from ("User unknown
in virtual mailbox table"); a local one only when local.reject_unknown_users is set
(Postfix's local_recipient_maps). A table that cannot answer is 451 4.3.0 (never a 5xx);
a virtual alias loop 451 4.6.0, as Postfix defers such a message. The relay guard
comes first and reads nothing but the domain: an alias of a remote address does not make
it ours. Canonical rewriting (elemta.addressing.rewrite) comes after the relay guard and
before the rest, as Postfix's cleanup rewrites before it expands virtual aliases: the
rewritten address is the one that must exist, is expanded, and is queued (the one the
client gave stays its ORCPT). A virtual mailbox or relay recipient is queued in the normal
form its table was asked with (elemta.addressing.resolve.queued_address), so its next hop
cannot refuse, after the 250, a spelling the table took (alice@virt.test. for
alice@virt.test).
"""

import ipaddress
import logging
from typing import NamedTuple

from elemta.addressing.hosted import HostedRecipients
from elemta.addressing.normal import has_sender_routing
from elemta.addressing.resolve import LOCAL, OURS, RELAY, Addressing, queued_address
from elemta.addressing.rewrite import AddressRewriter, RewriteError
from elemta.addressing.virtual import AliasExpansionError
from elemta.maps import TableUnavailable
from elemta.smtp.replies import Reply, lookup_failure

# Client addresses whose mynetworks answer a worker remembers; emptied when full.
TRUSTED_CACHE = 4096

log = logging.getLogger("elemta.smtpd")

UNKNOWN_USER = "<%s>: Recipient address rejected: User unknown in %s"
RELAY_DENIED = "<%s>: Relay access denied"
EXPANSION_ERROR = "<%s>: Alias expansion error: %s"
REWRITE_ERROR = "<%s>: Temporary lookup failure: bad canonical map entry"
# A refusal for good by the alias expansion (too long, needs SMTPUTF8): its summary.
REJECTED = "<%s>: Recipient address rejected: %s"
TOO_LONG = "<%s>: %s address rejected: %s address too long"


class PolicyRefusal(NamedTuple):
    """A refusal and the restriction that made it (elemta.restrictions.catalogue)."""
    reply: Reply
    restriction: str


RELAY_GUARD = "reject_unauth_destination"
RECIPIENT_CHECK = "reject_unlisted_recipient"
CANONICAL = "canonical_maps"


class RelayPolicy:
    """Answers "may this client send to this recipient, and does it exist?" for one
    Config."""

    def __init__(self, config):
        self.config = config
        self.addressing = Addressing.from_config(config)
        self.mynetworks = tuple(ipaddress.ip_network(n, strict=False)
                                for n in config.relay.mynetworks)
        self._recipients = None      # made on first use: reads the aliases file, tables
        self._trusted = {}           # client address -> in mynetworks (client_trusted)
        self.rewriter = AddressRewriter.from_config(config, self.addressing)

    def is_local(self, address):
        """True for recipients in a local domain, and for a bare <postmaster>."""
        return self.addressing.is_local(address)

    def client_trusted(self, client_ip):
        """True if client_ip is in mynetworks; remembered per address (it is asked at
        every RCPT; a session's address parsed once, not per recipient)."""
        trusted = self._trusted.get(client_ip)
        if trusted is None:
            if len(self._trusted) >= TRUSTED_CACHE:
                self._trusted.clear()
            trusted = self._trusted[client_ip] = self._in_mynetworks(client_ip)
        return trusted

    def _in_mynetworks(self, client_ip):
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.mynetworks if net.version == ip.version)

    def may_send(self, client_ip, auth_user, recipient):
        """True when the client may send to recipient's domain; raises TableUnavailable
        when a domain table cannot say (only asked for untrusted clients). A stranger may
        not route through a relay domain (user%victim@relay, "u@victim"@relay,
        victim!u@relay): its next hop, often a primary that trusts its backup MX, may
        honour the percent hack and relay on (Postfix's allow_untrusted_routing = no)."""
        if auth_user is not None or self.client_trusted(client_ip):
            return True
        kind = self.addressing.classify(recipient)
        if kind == RELAY and has_sender_routing(recipient):
            return False
        return kind in OURS

    def check_recipient(self, client_ip, auth_user, recipient, smtputf8=True):
        """(PolicyRefusal or None, virtual alias expansion or None) for RCPT TO;
        smtputf8 False for a message sent without SMTPUTF8 (its alias targets must be
        ASCII)."""
        try:
            if not self.may_send(client_ip, auth_user, recipient):
                return PolicyRefusal(Reply(554, "5.7.1", RELAY_DENIED % recipient), RELAY_GUARD), None
        except TableUnavailable as error:
            log.warning("<%s>: lookup failed: %s", recipient, error)
            return PolicyRefusal(lookup_failure(recipient), RECIPIENT_CHECK), None
        return self._resolve(recipient, smtputf8, must_exist=True)

    def added_recipient(self, recipient, smtputf8=True):
        """(PolicyRefusal or None, expansion or None) for a recipient a milter adds at
        the end of data: canonical rewriting and virtual alias expansion as for RCPT TO,
        as Postfix's cleanup treats it, but no relay guard (the milter is the admin's
        own) and no existence check (an unknown one bounces from delivery, as in
        Postfix)."""
        return self._resolve(recipient, smtputf8, must_exist=False)

    def _resolve(self, recipient, smtputf8, must_exist):
        try:
            rewritten = recipient if self.rewriter is None \
                else self.rewriter.recipient(recipient)
            if self._recipients is None:
                self._recipients = HostedRecipients(self.config, self.addressing)
            found = self._recipients.resolve(
                rewritten, smtputf8,
                local_users=must_exist and self.config.local.reject_unknown_users)
        except TableUnavailable as error:
            log.warning("<%s>: lookup failed: %s", recipient, error)
            return PolicyRefusal(lookup_failure(recipient), RECIPIENT_CHECK), None
        except RewriteError as error:
            log.warning("<%s>: %s", recipient, error)
            if error.permanent:
                return PolicyRefusal(Reply(550, "5.1.3", TOO_LONG % (
                    recipient, "Recipient", "canonical")), CANONICAL), None
            return PolicyRefusal(Reply(451, "4.3.0", REWRITE_ERROR % recipient), CANONICAL), None
        except AliasExpansionError as error:
            log.warning("<%s>: %s", recipient, error)
            return PolicyRefusal(Reply(error.code, error.status, (
                REJECTED if error.permanent else EXPANSION_ERROR) % (recipient, error.summary)),
                RECIPIENT_CHECK), None
        if must_exist and not found.known and (found.kind != LOCAL
                                               or self.config.local.reject_unknown_users):
            return PolicyRefusal(Reply(550, "5.1.1", UNKNOWN_USER % (recipient, found.table_name)),
                                 RECIPIENT_CHECK), None
        if found.targets is not None:
            return None, found.targets
        # Queued as rewritten, a hosted one in its normal form (the client's spelling
        # stays its ORCPT): a one-address "expansion".
        queued = queued_address(rewritten, found.kind)
        return None, [queued] if queued != recipient else None

    def rewrite_sender(self, sender):
        """(PolicyRefusal or None, the sender as queued) for MAIL FROM."""
        if self.rewriter is None or not sender:
            return None, sender
        try:
            return None, self.rewriter.sender(sender)
        except TableUnavailable as error:
            log.warning("<%s>: lookup failed: %s", sender, error)
            return PolicyRefusal(lookup_failure(sender), CANONICAL), sender
        except RewriteError as error:
            log.warning("<%s>: %s", sender, error)
            if error.permanent:
                return PolicyRefusal(Reply(550, "5.1.7", TOO_LONG % (
                    sender, "Sender", "canonical")), CANONICAL), sender
            return PolicyRefusal(Reply(451, "4.3.0", REWRITE_ERROR % sender), CANONICAL), sender
